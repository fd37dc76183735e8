"""The command line (run as a subprocess) and save/load round trips."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from torch import nn

import fxcompress
from fxcompress.io import load, load_plan, save, save_plan


def _run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fxcompress", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


def test_cli_optimize_writes_program_and_report(tmp_path) -> None:
    out = tmp_path / "r18.pt2"
    proc = _run(
        "optimize",
        "torchvision:resnet18",
        "--budget",
        "0.7",
        "--input-shape",
        "1,3,32,32",
        "--latency",
        "flops",
        "--out",
        str(out),
        "--quiet",
    )
    assert proc.returncode == 0, proc.stderr
    assert "fxcompress report" in proc.stdout
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["predicted_ms"] <= 0.7 * report["original_ms"]
    model = load(out)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 1000)
    shown = _run("report", str(out.with_suffix(".report.json")))
    assert shown.returncode == 0
    assert "parameters" in shown.stdout


def test_cli_bad_input_one_line_nonzero() -> None:
    cases = [
        ("optimize", "torchvision:nope", "--budget", "0.5", "--input-shape", "1,3,8,8"),
        (
            "optimize",
            "torchvision:resnet18",
            "--budget",
            "1.5",
            "--input-shape",
            "1,3,32,32",
            "--latency",
            "flops",
        ),
        ("optimize", "torchvision:resnet18", "--budget", "0.5", "--input-shape", "a,b"),
        ("report", "/nonexistent.json"),
    ]
    for args in cases:
        proc = _run(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = [
            ln for ln in proc.stderr.strip().splitlines() if ln.startswith("fxcompress: error")
        ]
        assert len(lines) == 1, proc.stderr


def test_cli_refuses_pickled_models_without_flag(tmp_path) -> None:
    path = tmp_path / "m.pt"
    torch.save(nn.Sequential(nn.Conv2d(3, 4, 3)), path)
    proc = _run(
        "optimize", str(path), "--budget", "1.0", "--input-shape", "1,3,8,8", "--latency", "flops"
    )
    assert proc.returncode == 2
    assert "--allow-pickle" in proc.stderr
    ok = _run(
        "optimize",
        str(path),
        "--budget",
        "1.0",
        "--input-shape",
        "1,3,8,8",
        "--latency",
        "flops",
        "--allow-pickle",
        "--quiet",
    )
    assert ok.returncode == 0, ok.stderr


def test_cli_help() -> None:
    proc = _run("--help")
    assert proc.returncode == 0
    assert "optimize" in proc.stdout
    assert "latency" in proc.stdout


def test_save_load_pt2_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
    ).eval()
    x = torch.randn(1, 3, 16, 16)
    gm = fxcompress.optimize(model, 0.7, example_inputs=x, latency="flops")
    path = save(gm, tmp_path / "m.pt2")
    assert torch.allclose(load(path)(x), gm(x), atol=1e-6)


def test_plan_and_weights_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
    ).eval()
    x = torch.randn(1, 3, 16, 16)
    plan = fxcompress.plan(model, 0.7, x, latency="flops")
    relaxed = fxcompress.relax(model, plan)
    with torch.no_grad():
        for p in relaxed.parameters():
            p.mul_(1.1)  # "fine-tuned"
    save_plan(relaxed, tmp_path / "plan")
    # the files are JSON and a plain state_dict: loadable with weights_only=True
    json.loads((tmp_path / "plan" / "plan.json").read_text())
    torch.load(tmp_path / "plan" / "state.pt", weights_only=True)
    merged = load_plan(model, tmp_path / "plan")
    with torch.no_grad():
        ref = relaxed.eval()(x)
        assert float((merged(x) - ref).abs().max() / ref.abs().max()) <= 1e-5
