"""Does the speed-up survive deployment? Latency ratio under eager, torch.compile, onnxruntime.

For each model and budget: ``fxcompress.optimize`` with the measured latency table (cache and
importance scores shared with ``bench_depth.py`` in ``--cache-dir``), then the original and the
result are each run under three runtimes:

- ``eager``: the modules as they are, under ``torch.inference_mode``;
- ``compile``: ``torch.compile`` (inductor, default mode) of each;
- ``onnxruntime``: ``torch.onnx.export(..., dynamo=True)`` of each, run by onnxruntime on CPU with
  the same number of intra-op threads as torch.

Each runtime's ratio is result / original, timed like every latency ratio of fxcompress: with
:func:`fxcompress.latency.timing.paired_timing` (warm-up, then ``--pairs`` timed runs of each,
interleaved, each side's time the low quantile :data:`fxcompress.latency.timing.QUANTILE` of its
runs), so drifting machine load hits both alike and bursts of load from other jobs, which only slow
runs down, are left out. Rows logged before this script used it (no ``timing`` key) were timed as
the median over 5 rounds of the median of 20 calls. Every runtime's output is also compared with the
eager result (max absolute difference, recorded). Budget 1.0 (only exact rewrites: BatchNorm
folding) is included as the baseline of what a runtime that fuses BatchNorm itself gets anyway.

Each finished (model, budget) is appended to ``--log`` as a JSON line, and rows already in the log
are skipped, so an interrupted run resumes where it stopped.

    nice -n 10 python benchmarks/bench_runtimes.py                 # full run (≈ 1 h on 2 cores)
    python benchmarks/bench_runtimes.py --models resnet18 --budgets 0.6 --size 64 --log /tmp/q.jsonl
    python benchmarks/bench_runtimes.py --from-log                 # only render md + png

Writes ``benchmarks/results/runtimes.md`` (tables) and ``runtimes.png`` (ratio vs budget).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision

import fxcompress
from fxcompress.latency.timing import QUANTILE, paired_timing

RESULTS = Path(__file__).parent / "results"
RUNTIMES = ("eager", "compile", "onnxruntime")
MODELS = ("resnet18", "resnet34", "resnet50", "mobilenet_v2")


def calibration(size: int) -> list[torch.Tensor]:
    """The 64 random calibration images of ``bench_depth.py`` (so its scores are reused)."""
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 3, size, size, generator=g) for _ in range(4)]


def onnx_runner(model: torch.nn.Module, x: torch.Tensor, threads: int) -> Callable[[], Any]:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as d:
        path = f"{d}/m.onnx"
        torch.onnx.export(model, (x,), path, dynamo=True, verbose=False)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # idle worker threads must not spin and steal the CPU from the other runtimes
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    return lambda: session.run(None, feed)[0]


def torch_runner(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    def run() -> np.ndarray:
        with torch.inference_mode():
            return model(x).numpy()

    return run


def runners(model: torch.nn.Module, x: torch.Tensor, threads: int) -> dict[str, Callable[[], Any]]:
    model = model.eval()
    return {
        "eager": torch_runner(model, x),
        "compile": torch_runner(torch.compile(model), x),
        "onnxruntime": onnx_runner(model, x, threads),
    }


class _Call(torch.nn.Module):
    """A runtime's call as a module without inputs, so that ``paired_timing`` can time it."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self) -> Any:
        return self.fn()


def paired(
    original: Callable[[], Any], result: Callable[[], Any], pairs: int
) -> tuple[float, float, float, float]:
    """(original ms, result ms, result / original, spread of the per-pair ratios).

    :func:`fxcompress.latency.timing.paired_timing`: interleaved timed runs, each side's time the
    :data:`~fxcompress.latency.timing.QUANTILE` quantile of its runs.
    """
    t = paired_timing(_Call(original), _Call(result), (), pairs=pairs)
    return t.a_ms, t.b_ms, t.ratio, t.spread


def run_model(name: str, budgets: list[float], done: set, args: argparse.Namespace, log: Path):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, args.size, args.size)
    calib = calibration(args.size)
    table = fxcompress.LatencyTable(mode=args.latency, cache_dir=args.cache_dir,
                                    threads=args.threads)
    torch._dynamo.reset()
    t0 = time.perf_counter()
    base = runners(model, x, args.threads)
    base_setup = time.perf_counter() - t0
    reference = base["eager"]()
    for budget in budgets:
        if (name, budget, args.size) in done:
            continue
        row: dict[str, Any] = {
            "model": name,
            "budget": budget,
            "size": args.size,
            "timing": {"method": "paired_timing", "quantile": QUANTILE, "pairs": args.pairs},
        }
        t0 = time.perf_counter()
        try:
            out = fxcompress.optimize(
                model, budget, example_inputs=x, data=calib, latency=table,
                cache_dir=args.cache_dir, progress=False,
                importance_checkpoint=f"{args.cache_dir}/importance-{name}-{args.size}.json",
            )
        except fxcompress.InfeasibleBudget as exc:
            row["infeasible"] = exc.minimum
            append(log, row)
            continue
        row["optimize_s"] = round(time.perf_counter() - t0, 1)
        report = out.meta["fxcompress"]
        row["optimize_ratio"] = report.ratio
        row["segments"] = sum(1 for d in report.decisions if d["key"] != "keep")
        t0 = time.perf_counter()
        comp = runners(out, x, args.threads)
        row["setup_s"] = round(time.perf_counter() - t0 + base_setup, 1)
        expected = comp["eager"]()
        row["result_vs_original_max_abs"] = float(np.abs(expected - reference).max())
        row["output_max_abs"] = float(np.abs(expected).max())
        for rt in RUNTIMES:
            row[f"{rt}_max_abs_vs_eager"] = float(np.abs(comp[rt]() - expected).max())
            o, r, ratio, spread = paired(base[rt], comp[rt], args.pairs)
            row[rt] = {"original_ms": round(o, 3), "result_ms": round(r, 3), "ratio": ratio,
                       "spread": round(spread, 3)}
        append(log, row)


def append(log: Path, row: dict) -> None:
    print(json.dumps(row), flush=True)
    with log.open("a") as f:
        f.write(json.dumps(row) + "\n")


def read_log(log: Path) -> list[dict]:
    """The rows of ``log``: one JSON object per line (a line that is not one is an error)."""
    if not log.exists():
        return []
    rows = []
    for number, line in enumerate(log.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as exc:
            raise SystemExit(f"{log}:{number} is not a JSON line ({exc}): {line[:80]!r}") from exc
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--budgets", nargs="+", type=float, default=[1.0, 0.8, 0.6, 0.4])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--latency", default="measure", choices=["measure", "flops"])
    ap.add_argument("--cache-dir", default=str(RESULTS.parent / ".cache"))
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads of torch and onnxruntime (1: robust when shared)")
    ap.add_argument("--pairs", type=int, default=30,
                    help="interleaved timed runs of each side (latency.timing.paired_timing)")
    ap.add_argument("--log", default=str(RESULTS / "runtimes.jsonl"),
                    help="JSON lines of finished rows: appended to, and skipped on a re-run")
    ap.add_argument("--out", default=str(RESULTS / "runtimes.md"))
    ap.add_argument("--from-log", action="store_true", help="only render md + png from --log")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    log = Path(args.log)
    if not args.from_log:
        done = {(r["model"], r["budget"], r["size"]) for r in read_log(log)}
        for name in args.models:
            run_model(name, args.budgets, done, args, log)
    order = {m: i for i, m in enumerate(MODELS)}
    rows = sorted(
        (r for r in read_log(log) if r["size"] == args.size),
        key=lambda r: (order.get(r["model"], len(order)), r["model"], -r["budget"]),
    )
    write_markdown(rows, args)
    write_plot(rows, Path(args.out).with_suffix(".png"))


def timing_note(rows: list[dict]) -> str:
    """How the rows' ratios were timed, from what each row recorded."""
    methods = {json.dumps(r.get("timing"), sort_keys=True) for r in rows if "infeasible" not in r}
    notes = []
    for m in sorted(methods):
        timing = json.loads(m)
        if timing is None:
            notes.append("rows logged before this benchmark used `fxcompress.timing`: median over "
                         "5 rounds of the median of 20 calls after warm-up")
        else:
            notes.append(f"{timing['pairs']} interleaved timed runs of each after warm-up, each "
                         f"side the {timing['quantile']} quantile of its runs "
                         "(`fxcompress.latency.timing.paired_timing`)")
    return "; ".join(notes) or "no rows"


def write_markdown(rows: list[dict], args: argparse.Namespace) -> None:
    lines = [
        "# Speed-up under the deployment runtime",
        "",
        f"CPU, {args.threads} thread(s) (torch and onnxruntime intra-op), batch 1, "
        f"{args.size}×{args.size}, random weights, latency table `{args.latency}`. "
        "Ratio = result / original latency under the same runtime, timed alternately in the "
        f"same process ({timing_note(rows)}). Budget 1.0 applies only exact rewrites "
        "(BatchNorm folding). The machine is shared with other jobs (2 cores, load average "
        "4–6 during the run, run under `nice`), so a single thread is used: with 2 threads, "
        "torch's eager latency varied 5× between calls under that load. Ratios are noisy by a "
        "few per cent, absolute times more.",
        "",
        "| model | budget | eager ratio | torch.compile ratio | onnxruntime ratio | "
        "original ms (eager / compile / ort) | segments | max abs diff vs eager, compile / ort "
        "(relative to max abs output) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "infeasible" in r:
            lines.append(f"| {r['model']} | {r['budget']} | unreachable (lowest "
                         f"{r['infeasible']:.3f}) | | | | | |")
            continue
        ratios = " | ".join(f"{r[rt]['ratio']:.3f}" for rt in RUNTIMES)
        orig = " / ".join(f"{r[rt]['original_ms']:.1f}" for rt in RUNTIMES)
        diffs = " / ".join(_diff(r, rt) for rt in ("compile", "onnxruntime"))
        lines.append(f"| {r['model']} | {r['budget']} | {ratios} | {orig} | {r['segments']} | "
                     f"{diffs} |")
    lines += [
        "",
        "Reproduce: `nice -n 10 .venv/bin/python benchmarks/bench_runtimes.py` (resumes from "
        "`benchmarks/results/runtimes.jsonl`; delete it for a fresh run; `--from-log` only "
        "renders).",
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


def _diff(row: dict, runtime: str) -> str:
    d = row[f"{runtime}_max_abs_vs_eager"]
    scale = row.get("output_max_abs")
    return f"{d:.1e}" + ("" if scale is None else f" ({d / max(scale, 1e-30):.0e})")


def write_plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    models = [m for m in MODELS if any(r["model"] == m for r in rows)]
    models += sorted({r["model"] for r in rows} - set(models))
    if not models:
        return
    fig, axes = plt.subplots(1, len(models), figsize=(3.2 * len(models), 3.4), sharey=True,
                             squeeze=False)
    for ax, name in zip(axes[0], models):
        ok = sorted((r for r in rows if r["model"] == name and "infeasible" not in r),
                    key=lambda r: r["budget"])
        for rt, marker in zip(RUNTIMES, "osD"):
            ax.plot([r["budget"] for r in ok], [r[rt]["ratio"] for r in ok], marker=marker,
                    label=rt)
        ax.plot([0.3, 1], [0.3, 1], "k--", lw=1, label="ratio = budget")
        ax.set_title(name)
        ax.set_xlabel("budget")
    axes[0][0].set_ylabel("measured latency ratio (result / original)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
