"""Coverage of fxcompress's exact rewrites on every torchvision classification model.

For each builder (random weights, eval mode, batch 1, the inputs of tests/test_torchvision.py) it
runs ``fxcompress.optimize(m, 1.0, example_inputs=x, latency="flops")`` and records: whether the
model traced, the max relative error against ``m(x)``, the rewrite events, parameters and MACs
before/after, the chains ``analyze`` finds, the lowest reachable latency fraction under the flops
latency model (every mergeable segment merged or pruned) and the wall time.

Usage (from the repository root)::

    .venv/bin/python benchmarks/torchvision_coverage.py               # default tier
    .venv/bin/python benchmarks/torchvision_coverage.py --include-slow
    .venv/bin/python benchmarks/torchvision_coverage.py --size 32 --models resnet18 vgg11

Writes ``benchmarks/results/coverage.md`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import platform
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from test_torchvision import (  # noqa: E402
    KNOWN_FAILURES,
    MODELS,
    SLOW,
    build,
    count_conv_bn,
    input_size,
    rel_error,
)

import fxcompress  # noqa: E402


def min_latency_fraction(analysis: fxcompress.Analysis, gm: torch.fx.GraphModule) -> float:
    """Lowest reachable fraction of the original flops latency (all damages taken as zero).

    Mirrors the set-up of ``fxcompress.make_plan`` (without the importance scoring, which does
    not change the reachable minimum). Uses internals (imported here, so that a refactoring of
    them only costs this optional column).
    """
    from fxcompress.depth import planner
    from fxcompress.depth.options import baseline_latency, build_problem, enumerate_options
    from fxcompress.latency.table import LatencyTable
    from fxcompress.pipeline.pricing import rest_estimate

    table = LatencyTable(mode="flops", device="cpu", progress=False)
    dtype = "float32"
    options = enumerate_options(analysis, prune=True)
    baseline = baseline_latency(analysis, table, dtype)
    original = baseline + rest_estimate(gm, analysis, table, dtype)
    problem = build_problem(
        analysis,
        options,
        {o.id: 0.0 for o in options},
        table,
        dtype=dtype,
        fixed_latency=max(0.0, original - baseline),
    )
    return planner.min_latency(problem) / original


def run(name: str, size: int | None) -> dict[str, Any]:
    """One row: analysis of the captured graph, then ``optimize`` and its checks."""
    row: dict[str, Any] = {"model": name, "size": input_size(name, size), "traced": False}
    t0 = time.perf_counter()
    try:
        model, x = build(name, size)
        row["conv_bn"] = count_conv_bn(model)

        gm = fxcompress.canonicalize(fxcompress.capture(model, x))
        row["traced"] = True
        analysis = fxcompress.analyze(gm)
        row["chains"] = (len(analysis.chains), max((len(c) for c in analysis.chains), default=0))
        t1 = time.perf_counter()
        try:
            row["min_frac"] = min_latency_fraction(analysis, gm)
        except Exception as exc:  # optional column: record, don't fail the row
            row["min_frac_error"] = f"{type(exc).__name__}: {exc}"
        row["min_s"] = time.perf_counter() - t1
        del gm, analysis  # large models: free before optimize captures again
        gc.collect()

        with torch.no_grad():
            ref = model(x)
        t1 = time.perf_counter()
        compiled = fxcompress.optimize(model, 1.0, example_inputs=x, latency="flops")
        row["optimize_s"] = time.perf_counter() - t1
        with torch.no_grad():
            row["err"] = rel_error(compiled(x), ref)
        report = compiled.meta["fxcompress"]
        kinds: dict[str, int] = {}
        for e in report.events:
            kinds[e["kind"]] = kinds.get(e["kind"], 0) + 1
        row["kinds"] = kinds
        row["params"] = (report.params_before, report.params_after)
        row["macs"] = (report.macs_before, report.macs_after)
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"
        row["traceback"] = traceback.format_exc()
    row["wall_s"] = time.perf_counter() - t0
    return row


def _fmt_int(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _status(row: dict[str, Any]) -> str:
    if "error" in row:
        return "FAIL" + (" (known)" if row["model"] in KNOWN_FAILURES else "")
    if row.get("err", 1.0) > 1e-4:
        return "FAIL (error > 1e-4)"
    kinds = row.get("kinds", {})
    if row.get("conv_bn") and kinds.get("fold_bn", 0) != row["conv_bn"]:
        return f"FAIL (fold_bn {kinds.get('fold_bn', 0)} != conv->BN {row['conv_bn']})"
    return "ok"


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace, total_s: float) -> str:
    skipped = sorted(n for n in MODELS if n in SLOW and not args.include_slow)
    ok = [r for r in rows if _status(r) == "ok"]
    errs = [r["err"] for r in rows if "err" in r]
    lines = [
        '# torchvision coverage of `optimize(m, 1.0, latency="flops")`',
        "",
        f"Generated by `benchmarks/torchvision_coverage.py` on {datetime.date.today()} "
        f"(torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"{platform.machine()}, {torch.get_num_threads()} thread(s)).",
        f"Command: `python benchmarks/torchvision_coverage.py {' '.join(sys.argv[1:])}`",
        "",
        "Random weights (BatchNorm statistics randomised), eval mode, batch 1, square input of "
        "side *size* (CNNs 64 unless they need more; ViTs `image_size` = smallest multiple of "
        "the patch >= 32).",
        "",
        f"- models run: {len(rows)}, ok: {len(ok)}, failing: {len(rows) - len(ok)}",
        f"- max relative error: {max(errs):.2e}" if errs else "- max relative error: n/a",
        f"- total wall time: {total_s:.0f} s (one thread; times vary with the machine's load)",
    ]
    if skipped:
        lines.append(
            f"- not run (slow tier; `--include-slow` runs them): {len(skipped)}: "
            + ", ".join(skipped)
        )
    lines += [
        "",
        "Columns: *conv→BN* is the number of BatchNorms directly after a conv in our own fx "
        "trace (expected #fold_bn); *chains* is (count, longest) from `analyze`; *min lat.* is "
        "the lowest reachable fraction of the original latency under the flops model "
        "(`planner.min_latency`, every mergeable segment merged/pruned); *optimize s* is the "
        "`optimize` call alone, *wall* the whole row (building the model, the analysis, the "
        "minimum latency, `optimize` and the checks).",
        "",
        "| model | size | status | traced | max rel. err | #fold_bn | conv→BN | #merge | "
        "#fold_skip | #drop | params before | params after | MACs before | MACs after | "
        "chains | longest | min lat. | optimize s | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        k = r.get("kinds", {})
        if "params" in r:
            pb, pa = (_fmt_int(v) for v in r["params"])
            mb, ma = (_fmt_int(v) for v in r["macs"])
        else:
            pb = pa = mb = ma = "-"
        nch, longest = r.get("chains", ("-", "-"))
        frac = f"{r['min_frac']:.3f}" if "min_frac" in r else "-"
        err = f"{r['err']:.1e}" if "err" in r else "-"
        cells = [
            r["model"],
            r["size"],
            _status(r),
            "yes" if r.get("traced") else "no",
            err,
            k.get("fold_bn", 0),
            r.get("conv_bn", "-"),
            k.get("merge", 0),
            k.get("fold_skip", 0),
            k.get("drop", 0),
            pb,
            pa,
            mb,
            ma,
            nch,
            longest,
            frac,
            f"{r['optimize_s']:.1f}" if "optimize_s" in r else "-",
            f"{r['wall_s']:.1f}",
        ]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    failures = [r for r in rows if "error" in r or "min_frac_error" in r]
    if failures:
        lines += ["", "## Errors", ""]
        for r in failures:
            msg = r.get("error") or f"min_latency: {r['min_frac_error']}"
            lines.append(f"- **{r['model']}**: {msg[:500]}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--include-slow", action="store_true", help="also run the slow tier")
    parser.add_argument(
        "--size", type=int, default=None, help="input side length (default: as the tests)"
    )
    parser.add_argument("--models", nargs="*", help="only these models")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "coverage.md")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    # torchvision's notes on default initialisations (googlenet, inception_v3)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torchvision")
    torch.set_num_threads(args.threads)

    names = list(args.models) if args.models else list(MODELS)
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        parser.error(f"unknown models: {unknown}")
    if not args.include_slow and not args.models:
        names = [n for n in names if n not in SLOW]

    rows = []
    t0 = time.perf_counter()
    for i, name in enumerate(names, 1):
        row = run(name, args.size)
        rows.append(row)
        k = row.get("kinds", {})
        print(
            f"[{i}/{len(names)}] {name:22s} {_status(row):12s} "
            f"err={row.get('err', float('nan')):.1e} fold_bn={k.get('fold_bn', 0)}"
            f"/{row.get('conv_bn', '-')} merge={k.get('merge', 0)} "
            f"fold_skip={k.get('fold_skip', 0)} opt={row.get('optimize_s', float('nan')):.1f}s "
            f"min={row.get('min_s', float('nan')):.1f}s wall={row['wall_s']:.1f}s",
            flush=True,
        )
        if "error" in row:
            print(row["traceback"], flush=True)
    total = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(rows, args, total))
    print(f"wrote {args.out} ({total:.0f} s)")
    return 0 if all(_status(r).startswith(("ok", "FAIL (known")) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
