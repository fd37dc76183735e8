"""What a user waits for: a cold and a warm ``optimize`` call, stage by stage (issue 20).

For each model and budget: ``fxcompress.optimize`` with the measured latency table, batch 1 (or
``--batch``), 224×224 (``--size``), 16 calibration images, 2 threads, first with an empty cache
directory (cold) and then again with the cache the first call left (warm: the on-disk cache of a
user's second call). Reports wall time per stage (``Report.stage_seconds``) against issue 20's
targets: cold MobileNetV2 / ResNet-34 / MNASNet within 60 s, ResNet-50 within 120 s, warm 15 s.

    nice -n 19 .venv/bin/python benchmarks/bench_cost.py                        # four models
    nice -n 19 .venv/bin/python benchmarks/bench_cost.py --models mobilenet_v2  # one of them
    .venv/bin/python benchmarks/bench_cost.py --quick                  # smoke run, temp output

Rows are appended to ``benchmarks/results/cost.jsonl`` (one JSON object per call) and
``benchmarks/results/cost.md`` is rendered from every row logged (``--from-log``: render only).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision

import fxcompress

RESULTS = Path(__file__).parent / "results"
#: issue 20's model / budget pairs and their cold targets in seconds (warm: 15 s for all)
CASES = {"mobilenet_v2": (0.5, 60.0), "resnet34": (0.7, 60.0), "mnasnet1_0": (0.6, 60.0),
         "resnet50": (0.8, 120.0)}
WARM_TARGET_S = 15.0
STAGES = ("capture", "analyze", "latency", "importance", "plan", "relax", "merge", "measure",
          "select", "finetune")


def run(name: str, budget: float, *, batch: int, size: int, images: int, cache: Path,
        warmth: str) -> dict:
    """One ``optimize`` call; its wall time, stages and outcome as a row."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=g)
    data = [torch.randn(1, 3, size, size, generator=g) for _ in range(images)]
    t0 = time.perf_counter()
    row = {"model": name, "budget": budget, "batch": batch, "size": size, "images": images,
           "cache": warmth, "torch": torch.__version__, "threads": torch.get_num_threads()}
    try:
        out = fxcompress.optimize(model, budget, x, data=data, calibration_batches=images,
                                  cache_dir=str(cache), progress=False)
        report = out.meta["fxcompress"]
        row["ratio"] = report.final_ms / report.original_ms if report.original_ms else None
    except fxcompress.InfeasibleBudget as exc:
        report = exc.result.meta["fxcompress"] if exc.result is not None else None
        row["infeasible"] = exc.minimum
    row["wall_s"] = time.perf_counter() - t0
    row["stages"] = dict(report.stage_seconds) if report is not None else {}
    return row


def render(rows: list[dict]) -> str:
    """The Markdown table of ``rows``: one line per call, latest run of each case."""
    latest: dict[tuple, dict] = {}
    for row in rows:
        latest[(row["model"], row["budget"], row["batch"], row["size"], row["cache"])] = row
    lines = [
        "# Cost of a cold and a warm `optimize` call",
        "",
        "Written by `benchmarks/bench_cost.py` (see its docstring); measured latency table, "
        "16 calibration images unless stated, 2 threads, a shared 2-core machine. Target: cold "
        f"within the model's target, warm within {WARM_TARGET_S:.0f} s (issue 20).",
        "",
        "| model | budget | batch | size | cache | wall s | target s | met | "
        + " | ".join(STAGES) + " | result |",
        "|---|---|---|---|---|---|---|---|" + "---|" * len(STAGES) + "---|",
    ]
    for (name, budget, batch, size, warmth), r in sorted(latest.items()):
        target = WARM_TARGET_S if warmth == "warm" else CASES.get(name, (0, float("nan")))[1]
        met = "yes" if r["wall_s"] <= target else "no"
        stages = " | ".join(f"{r['stages'].get(s, 0.0):.1f}" for s in STAGES)
        result = (f"ratio {r['ratio']:.2f}" if r.get("ratio") is not None
                  else f"infeasible (min {r['infeasible']:.3g})" if "infeasible" in r else "")
        lines.append(f"| {name} | {budget} | {batch} | {size} | {warmth} | {r['wall_s']:.1f} | "
                     f"{target:.0f} | {met} | {stages} | {result} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(CASES), choices=[*sorted(CASES), "resnet18"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--images", type=int, default=16, help="calibration images (default 16)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="resnet18 at 64x64, 4 images, temp output")
    p.add_argument("--from-log", action="store_true", help="only render cost.md from cost.jsonl")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: results/)")
    args = p.parse_args()
    out = args.out or (Path(tempfile.gettempdir()) / "cost_quick" if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "cost.jsonl"
    if not args.from_log:
        torch.set_num_threads(args.threads)
        models = ["resnet18"] if args.quick else args.models
        size, images = (64, 4) if args.quick else (args.size, args.images)
        for name in models:
            budget = CASES.get(name, (0.6, 60.0))[0]
            cache = Path(tempfile.mkdtemp(prefix="fxcompress-cost-"))
            try:
                for warmth in ("cold", "warm"):
                    row = run(name, budget, batch=args.batch, size=size, images=images,
                              cache=cache, warmth=warmth)
                    print(json.dumps(row), flush=True)
                    with log.open("a") as fh:
                        fh.write(json.dumps(row) + "\n")
            finally:
                shutil.rmtree(cache, ignore_errors=True)
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    (out / "cost.md").write_text(render(rows))
    print(f"wrote {out / 'cost.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
