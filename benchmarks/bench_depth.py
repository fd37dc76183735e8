"""Latency-budgeted depth compression on torchvision models (measured CPU latency).

For each model, batch size and budget: run ``fxcompress.optimize`` with the measured latency table
(persistent cache in ``--cache-dir``) or the analytic one, and report the measured latency ratio
(result / original, timed alternately in the same run), the predicted ratio, and the wall time of
each stage. Also times ResNet-34 end to end with a cold and a warm cache, and the DP alone.

    python benchmarks/bench_depth.py          # full run: ≈ 20 min at batch 1, ≈ 3 h at batch 32
    python benchmarks/bench_depth.py --models resnet18 --batches 1 --budgets 0.6

Writes ``benchmarks/results/depth.md`` (tables) and ``depth.png`` (measured vs budget). Standard
output carries only the rows as JSON lines (the format of ``--log``); messages go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision

import fxcompress
from fxcompress.depth import planner
from fxcompress.pipeline import prepare_problem

RESULTS = Path(__file__).parent / "results"


def run_one(name: str, batch: int, budget: float, size: int, latency: str, cache: str,
            max_replans: int | None = None) -> dict:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(batch, 3, size, size)
    g = torch.Generator().manual_seed(1)  # the same 64 calibration images for every run
    calib = [torch.randn(16, 3, size, size, generator=g) for _ in range(4)]
    t0 = time.perf_counter()
    extra = {} if max_replans is None else {"max_replans": max_replans}
    try:
        out = fxcompress.optimize(model, budget, example_inputs=x, data=calib, latency=latency,
                                  cache_dir=cache, progress=False, calibration_batches=4,
                                  importance_checkpoint=f"{cache}/importance-{name}-{size}.json",
                                  **extra)
    except fxcompress.InfeasibleBudget as exc:
        # exc.result is set when only the measurement (not the prediction) missed the budget
        row = {"model": name, "batch": batch, "budget": budget, "infeasible": exc.minimum,
               "measured_miss": exc.result is not None, **extra}
        if exc.result is not None:
            row["replan_trace"] = _trace(exc.result.meta["fxcompress"])
        return row
    wall = time.perf_counter() - t0
    r = out.meta["fxcompress"]
    return {
        "model": name,
        "batch": batch,
        "budget": budget,
        "measured_ratio": r.ratio,
        "predicted_ratio": r.predicted_ms / r.original_ms if r.predicted_ms else None,
        "original_ms": r.original_ms,
        "final_ms": r.final_ms,
        "replans": len(r.replans),
        "segments": sum(1 for d in r.decisions if d["key"] != "keep"),
        "stages": {k: round(v, 2) for k, v in r.stage_seconds.items()},
        "wall_s": round(wall, 1),
        "replan_trace": _trace(r),
        **extra,
    }


def _trace(report: fxcompress.Report) -> list[list]:
    """Each re-plan's (measured ratio that caused it, how the next budget was chosen)."""
    return [[round(e["measured_ratio"], 3), e.get("how", "secant")] for e in report.replans]


def end_to_end_resnet34(size: int) -> dict:
    model = torchvision.models.resnet34(weights=None).eval()
    x = torch.randn(1, 3, size, size)
    calib = [torch.randn(16, 3, size, size) for _ in range(4)]
    cache = tempfile.mkdtemp(prefix="fxc-cold-")
    times = {}
    for label in ("cold", "warm"):
        t0 = time.perf_counter()
        # a measured miss raises; the time to find out counts all the same
        with contextlib.suppress(fxcompress.InfeasibleBudget):
            fxcompress.optimize(model, 0.6, example_inputs=x, data=calib, cache_dir=cache,
                                progress=False)
        times[label] = round(time.perf_counter() - t0, 1)
    shutil.rmtree(cache, ignore_errors=True)
    # the DP alone, on the prepared problem
    prep = prepare_problem(model, 0.6, x, latency="flops")
    dp = []
    for _ in range(5):
        t0 = time.perf_counter()
        planner.solve(prep.problem, 0.6 * prep.original, resolution=prep.resolution)
        dp.append(time.perf_counter() - t0)
    times["dp_s"] = round(statistics.median(dp), 4)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "resnet34", "resnet50",
                                                    "mobilenet_v2", "mobilenet_v3_large",
                                                    "efficientnet_b0"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.8, 0.6, 0.4])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--latency", default="measure", choices=["measure", "flops"])
    ap.add_argument("--cache-dir", default=str(RESULTS.parent / ".cache"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--max-replans", type=int, default=None,
                    help="optimize's max_replans (default: the library's default)")
    ap.add_argument("--out", default=str(RESULTS / "depth.md"))
    ap.add_argument("--from-log", help="render the tables from a log of this script's JSON lines")
    ap.add_argument("--log", help="append each row to this JSON-lines log and render the whole log "
                    "(e.g. benchmarks/results/depth.jsonl)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.from_log:
        rows, e2e = read_log(Path(args.from_log))
        write_markdown(rows, e2e, args)
        write_plot(rows, Path(args.out).with_suffix(".png"))
        return
    log = Path(args.log) if args.log else None

    rows = []
    for name in args.models:
        for batch in args.batches:
            for budget in args.budgets:
                row = run_one(name, batch, budget, args.size, args.latency, args.cache_dir,
                              args.max_replans)
                print(json.dumps(row), flush=True)
                append_log(log, row)
                rows.append(row)
                if "infeasible" in row and not row["measured_miss"]:
                    break  # tighter budgets are unreachable too
    e2e = None if args.skip_e2e else end_to_end_resnet34(args.size)
    if e2e:
        print(json.dumps({"resnet34_end_to_end": e2e}), flush=True)
        append_log(log, {"resnet34_end_to_end": e2e})
    if log is not None:
        rows, e2e = read_log(log)
    write_markdown(rows, e2e, args)
    write_plot(rows, Path(args.out).with_suffix(".png"))


def append_log(log: Path | None, row: dict) -> None:
    if log is not None:
        with log.open("a") as fh:
            fh.write(json.dumps(row) + "\n")


def read_log(path: Path) -> tuple[list[dict], dict | None]:
    """Rows of a log of this script's JSON lines; a later row replaces an earlier one.

    Every non-empty line must be a JSON object: anything else is an error, not skipped.
    """
    rows: dict[tuple, dict] = {}
    e2e = None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise SystemExit(f"{path}:{number} is not a JSON line ({exc}): {line[:80]!r}") from exc
        if "resnet34_end_to_end" in row:
            e2e = row["resnet34_end_to_end"]
        else:
            rows[(row["model"], row["batch"], row["budget"])] = row
    return list(rows.values()), e2e


def write_markdown(rows: list[dict], e2e: dict | None, args: argparse.Namespace) -> None:
    lines = [
        "# Depth compression: measured latency ratio vs budget",
        "",
        f"CPU, {args.threads} threads, {args.size}×{args.size}, random weights, latency table "
        f"`{args.latency}`, 64 random calibration images, output-fidelity importance. "
        "Ratio = result / original, both timed alternately in the same run (rows measured "
        "before 2026-11-22: median of 3 rounds of medians; later rows: 15 interleaved runs each, "
        "20th percentile, see `fxcompress/timing.py`). Target: 0.85·b ≤ ratio ≤ 1.05·b. "
        "All rows: `benchmarks/results/depth.jsonl` (a later row replaces an earlier one "
        "for the same model, batch and budget).",
        "",
        "| model | batch | budget b | measured ratio | predicted ratio | in target | segments "
        "| re-plans | wall s | stages (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "infeasible" in r:
            what = ("missed on measurement (fastest measured" if r.get("measured_miss")
                    else "unreachable (lowest predicted")
            lines.append(f"| {r['model']} | {r['batch']} | {r['budget']} | {what} "
                         f"{r['infeasible']:.3f}) | | | | | | |")
            continue
        m = r["measured_ratio"]
        ok = m is not None and 0.85 * r["budget"] <= m <= 1.05 * r["budget"]
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['budget']} | {m:.3f} | "
            f"{r['predicted_ratio']:.3f} | {'yes' if ok else 'NO'} | {r['segments']} | "
            f"{r['replans']}{_replans_detail(r)} | {r['wall_s']} | {r['stages']} |"
        )
    if e2e:
        lines += ["", "## ResNet-34 end to end (batch 1, budget 0.6)", "",
                  f"- cold cache: {e2e['cold']} s; warm cache: {e2e['warm']} s; "
                  f"DP alone: {e2e['dp_s']} s"]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


def _replans_detail(r: dict) -> str:
    """`` (of max N): 0.71 secant, 0.45 bisect`` when the row recorded them."""
    parts = []
    if "max_replans" in r:
        parts.append(f"of max {r['max_replans']}")
    if r.get("replan_trace"):
        parts.append(", ".join(f"{m} {how}" for m, how in r["replan_trace"]))
    return f" ({'; '.join(parts)})" if parts else ""


def write_plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for key in sorted({(r["model"], r["batch"]) for r in rows}):
        pts = [(r["budget"], r["measured_ratio"]) for r in rows
               if (r["model"], r["batch"]) == key and r.get("measured_ratio")]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"{key[0]} b{key[1]}")
    ax.plot([0.3, 1], [0.3, 1], "k--", lw=1, label="ratio = budget")
    ax.fill_between([0.3, 1], [0.255, 0.85], [0.315, 1.05], color="grey", alpha=0.2,
                    label="target band")
    ax.set_xlabel("budget (fraction of original latency)")
    ax.set_ylabel("measured latency ratio")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
