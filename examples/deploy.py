"""Train a small CNN, compress it under a latency budget, export it to ONNX and check onnxruntime.

The whole deployment path in one script, on synthetic data (no downloads):

1. train a small CNN to tell four kinds of striped images apart (or load it from ``--out``);
2. ``fxcompress.optimize`` it to at most ``--budget`` of its latency, scoring merge options with the
   task loss and fine-tuning the relaxed model before the final merge;
3. save the result as a ``torch.export`` program (``model.pt2``) and a JSON report (+ PNG plot when
   matplotlib is installed);
4. export it to ONNX and check that onnxruntime computes what the compressed model computes.

Both files take any batch size (the example has batch 1; they are checked at batch 1 and 8).

    python examples/deploy.py                  # measured CPU latency, ~1-2 min
    python examples/deploy.py --fast           # analytic latency, small data: a few seconds

Everything lands in ``--out`` (default ``deploy-out/``); ``summary.json`` holds the figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import fxcompress

CLASSES = 4


def striped_images(n: int, seed: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` noisy 3×size×size images of stripes at one of four angles (the label)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    angle = labels.float() * math.pi / CLASSES
    freq = 0.4 + 0.4 * torch.rand(n, generator=g)
    phase = 2 * math.pi * torch.rand(n, generator=g)
    coords = torch.arange(size, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    proj = torch.cos(angle)[:, None, None] * xx + torch.sin(angle)[:, None, None] * yy
    img = torch.sin(freq[:, None, None] * proj + phase[:, None, None])
    colour = 0.5 + torch.rand(n, 3, 1, 1, generator=g)
    x = img[:, None] * colour + 0.3 * torch.randn(n, 3, size, size, generator=g)
    return x, labels


class SmallNet(nn.Module):
    """Conv-BN-ReLU stages with residual blocks, global pooling, linear classifier."""

    def __init__(self, width: int = 24) -> None:
        super().__init__()

        def unit(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
            )

        self.stem = unit(3, width)
        self.stage1 = nn.Sequential(unit(width, width), unit(width, width))
        self.down = unit(width, 2 * width, stride=2)
        self.stage2 = nn.Sequential(unit(2 * width, 2 * width), unit(2 * width, 2 * width))
        self.head = nn.Linear(2 * width, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.stage1(x)
        x = self.down(x)
        x = x + self.stage2(x)
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float) -> None:
    """Plain Adam on cross-entropy, batches of 64 (in place)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=0.6, help="fraction of the latency, in (0, 1]")
    ap.add_argument(
        "--fast", action="store_true", help="small 16x16 data, analytic latency (seconds)"
    )
    ap.add_argument("--out", default="deploy-out", help="output directory")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("fxcompress").setLevel(logging.INFO)
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n_train, n_test, epochs, size = (256, 128, 2, 16) if args.fast else (4096, 512, 4, 32)
    x_train, y_train = striped_images(n_train, seed=1, size=size)
    x_test, y_test = striped_images(n_test, seed=2, size=size)

    # 1. train (or load what an earlier run trained: a plain state_dict, weights_only)
    model = SmallNet()
    weights = out / "trained.pt"
    if weights.exists():
        model.load_state_dict(torch.load(weights, weights_only=True))
        model.eval()
    else:
        train(model, x_train, y_train, epochs=epochs, lr=3e-3)
        torch.save(model.state_dict(), weights)
    acc_before = accuracy(model, x_test, y_test)
    print(f"trained: test accuracy {acc_before:.3f}")

    # 2. optimize: task-loss importance on calibration batches, fine-tune the relaxed model
    calib = list(zip(x_train[:128].split(32), y_train[:128].split(32)))

    def finetune(relaxed: nn.Module) -> None:
        train(relaxed, x_train, y_train, epochs=1, lr=1e-3)

    example = x_test[:1]
    compiled = fxcompress.optimize(
        model,
        args.budget,
        example_inputs=example,
        data=calib,
        loss_fn=F.cross_entropy,
        finetune=finetune,
        latency="flops" if args.fast else "measure",
        cache_dir=str(out / "latency-cache"),
        progress=False,
    )
    report = compiled.meta["fxcompress"]
    acc_after = accuracy(compiled, x_test, y_test)
    print(report.to_markdown())
    print(f"compressed: test accuracy {acc_after:.3f} (was {acc_before:.3f})")

    # 3. save: a torch.export program (any batch size) and the report (JSON; PNG with matplotlib)
    fxcompress.save(compiled, out / "model.pt2", example)
    program = fxcompress.load(out / "model.pt2")
    with torch.no_grad():
        batch = x_test[:8]
        diff_pt2 = float((program(batch) - compiled(batch)).abs().max())
    print(f"model.pt2 at batch 8 (example: batch 1) vs eager: max abs diff {diff_pt2:.2e}")
    (out / "report.json").write_text(report.to_json())
    try:
        from fxcompress.plots import plot_report

        plot_report(report, out / "report.png")
    except ModuleNotFoundError as exc:
        print(f"no plot: {exc}")

    # 4. ONNX (dynamic batch too), run by onnxruntime at batch 1 and 8, against eager mode
    import onnxruntime

    from fxcompress.io import export_onnx

    export_onnx(compiled, out / "model.onnx", example)
    session = onnxruntime.InferenceSession(
        str(out / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    diff, scale = 0.0, 0.0
    for batch in (x_test[:1], x_test[:8]):
        with torch.no_grad():
            expected = compiled(batch)
        (got,) = session.run(None, {session.get_inputs()[0].name: batch.numpy()})
        diff = max(diff, float((torch.from_numpy(got) - expected).abs().max()))
        scale = max(scale, float(expected.abs().max()))
    print(f"onnxruntime vs eager, batch 1 and 8: max abs diff {diff:.2e} (outputs ≤ {scale:.2f})")
    if not diff <= 1e-4 * max(scale, 1.0):
        raise SystemExit(f"onnxruntime output differs from the compressed model by {diff:.3g}")
    if not diff_pt2 <= 1e-4 * max(scale, 1.0):
        raise SystemExit(f"model.pt2 at batch 8 differs from the compressed model: {diff_pt2:.3g}")

    summary = {
        "budget": args.budget,
        "accuracy_before": acc_before,
        "accuracy_after": acc_after,
        "predicted_ratio": report.predicted_ms / report.original_ms,
        "measured_ratio": report.ratio,
        "params_before": report.params_before,
        "params_after": report.params_after,
        "onnxruntime_max_abs_diff": diff,
        "pt2_batch8_max_abs_diff": diff_pt2,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {out}/: model.pt2, model.onnx, report.json, summary.json")
    return summary


if __name__ == "__main__":
    main()
