"""``examples/deploy.py`` runs end to end (``--fast``), and what it writes is what it says."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import torch

import fxcompress

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _deploy_module():
    spec = importlib.util.spec_from_file_location("deploy_example", EXAMPLES / "deploy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_deploy_example_fast(tmp_path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "deploy.py"),
            "--fast",
            "--budget",
            "0.6",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert report["predicted_ms"] <= 0.6 * report["original_ms"]
    assert summary["params_after"] == report["params_after"] < report["params_before"]

    # the saved program is the compressed model: recompute its test accuracy independently
    deploy = _deploy_module()
    x_test, y_test = deploy.striped_images(128, seed=2, size=16)
    program = fxcompress.load(out / "model.pt2")
    with torch.no_grad():
        logits = torch.cat([program(x) for x in x_test.split(1)])
    accuracy = float((logits.argmax(1) == y_test).float().mean())
    # batch 1 here, one batch there: allow a borderline sample to flip
    assert abs(accuracy - summary["accuracy_after"]) <= 1 / 128
    assert accuracy > 0.5  # four classes: far above chance after compression and fine-tuning

    # and onnxruntime runs the exported ONNX file to the same outputs
    session = onnxruntime.InferenceSession(
        str(out / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    name = session.get_inputs()[0].name
    got = np.concatenate([session.run(None, {name: x.numpy()})[0] for x in x_test[:8].split(1)])
    np.testing.assert_allclose(got, logits[:8].numpy(), rtol=1e-4, atol=1e-5)
