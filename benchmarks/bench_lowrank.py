"""ALDS low-rank decomposition vs the uniform-rank and SVD-energy baselines.

Three parts (all run by default):

- ``digits``: a ResNet-20-style network (three stages of three basic blocks, width 16) trained on
  the scikit-learn digits (``benchmarks/digits.py``); for each method and fraction of parameters
  kept: test accuracy right after :func:`fxcompress.lowrank.decompose` and after the short
  retraining every compressed model of the benchmarks gets (``digits.finetune_schedule``), and
  the measured CPU latency ratio (batch 1 and 32).
- ``latency``: ALDS under a measured-latency budget, no retraining (digits ResNet-20 at batch 32,
  torchvision ResNet-18 at batch 1).
- ``torchvision``: ResNet-18 and VGG-11 with random weights at 224x224, batch 1: parameters, MACs,
  measured CPU latency ratio and the time the decomposition takes.

Latency ratios are measured in the same process, original and result alternately, like every
latency ratio of fxcompress (:func:`fxcompress.latency.timing.paired_timing`: interleaved timed
runs, each side's time the low quantile :data:`fxcompress.latency.timing.QUANTILE` of its runs; one
thread). Writes ``benchmarks/results/lowrank.md``, ``lowrank.json`` and ``lowrank.png``; the
defaults produce the committed tables.

    python benchmarks/bench_lowrank.py                 # all three parts (about 15 min on 2 cores)
    python benchmarks/bench_lowrank.py --parts digits --fractions 0.5 0.25
    python benchmarks/bench_lowrank.py --render-only   # redraw md + png from lowrank.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import digits
from fxcompress.latency.table import LatencyTable
from fxcompress.latency.timing import QUANTILE, paired_timing
from fxcompress.lowrank import ErrorCache, decompose

RESULTS = Path(__file__).parent / "results"
METHODS = ("alds", "uniform", "energy")
PARTS = ("digits", "latency", "torchvision")
#: timed runs of each side per latency ratio
PAIRS = 15


def timing() -> dict:
    """How this script times latency ratios (recorded with each part's results)."""
    return {"method": "paired_timing", "quantile": QUANTILE, "pairs": PAIRS, "threads": 1}


def latency_ratio(
    original: torch.nn.Module, result: torch.nn.Module, x: torch.Tensor
) -> tuple[float, float]:
    """(original ms, result / original), timed alternately (see :func:`timing`)."""
    t = paired_timing(original, result, (x,), pairs=PAIRS, threads=1)
    return t.a_ms, t.ratio


def run_digits(fractions: list[float], epochs: int) -> dict:
    data = digits.load_digits_split(seed=0)
    model = digits.trained("resnet", data, blocks=(3, 3, 3))
    base = digits.evaluate(model, data.test)
    params = sum(p.numel() for p in model.parameters())
    print(f"digits ResNet-20: {params:,} parameters, test accuracy {base:.4f}", flush=True)
    x_cal = data.train.x[:32]
    cache = ErrorCache()
    rows = []
    for method in METHODS:
        for fraction in fractions:
            t0 = time.perf_counter()
            try:
                gm = decompose(model, fraction, x_cal, method=method, cache=cache, progress=False)
            except Exception as exc:  # an infeasible budget is a result too
                rows.append({"method": method, "fraction": fraction, "error": str(exc)})
                continue
            seconds = time.perf_counter() - t0
            report = gm.meta["fxcompress.lowrank"]
            acc = digits.evaluate(gm, data.test)
            tuned = decompose(
                model,
                fraction,
                x_cal,
                method=method,
                cache=cache,
                progress=False,
                finetune=digits.finetune_schedule(data, epochs=epochs),
            )
            acc_ft = digits.evaluate(tuned, data.test)
            lat = {}
            for batch in (1, 32):
                x = data.test.x[:batch]
                _, lat[batch] = latency_ratio(model, tuned, x)
            row = {
                "method": method,
                "fraction": fraction,
                "params_kept": report.params_after / report.params_before,
                "macs_kept": report.macs_after / report.macs_before,
                "max_error": report.max_error,
                "decomposed": sum(d.decomposed for d in report.layers),
                "layers": len(report.layers),
                "acc": acc,
                "acc_ft": acc_ft,
                "lat_b1": lat[1],
                "lat_b32": lat[32],
                "seconds": seconds,
                "ks": sorted({d.k for d in report.layers if d.decomposed}),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    # the paper's retraining reference: the original model retrained with the same schedule
    ref = digits.copy_model(model)
    digits.finetune(ref, data, epochs=epochs)
    return {
        "base_acc": base,
        "base_ft_acc": digits.evaluate(ref, data.test),
        "params": params,
        "epochs": epochs,
        "rows": rows,
    }


def run_latency_budget(fractions: list[float], table: LatencyTable) -> dict:
    """ALDS under a measured-latency budget (no retraining): digits ResNet-20 at batch 32, and
    torchvision ResNet-18 (random weights) at batch 1, 224x224."""
    data = digits.load_digits_split(seed=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        resnet18 = torchvision.models.resnet18().eval()
        x18 = torch.randn(1, 3, 224, 224)
    cases = {
        "digits ResNet-20, batch 32": (
            digits.trained("resnet", data, blocks=(3, 3, 3)),
            data.test.x[:32],
        ),
        "ResNet-18, batch 1": (resnet18, x18),
    }
    rows = []
    for case, (model, x) in cases.items():
        for fraction in fractions:
            t0 = time.perf_counter()
            try:
                gm = decompose(
                    model,
                    {"latency": fraction},
                    x,
                    latency=table,
                    max_groups=2,
                    ranks=8,
                    progress=False,
                )
            except Exception as exc:
                rows.append({"case": case, "fraction": fraction, "error": str(exc)})
                print(json.dumps(rows[-1]), flush=True)
                continue
            seconds = time.perf_counter() - t0
            report = gm.meta["fxcompress.lowrank"]
            _, ratio = latency_ratio(model, gm, x)
            rows.append(
                {
                    "case": case,
                    "fraction": fraction,
                    "predicted": report.after / report.before,
                    "measured": ratio,
                    "params_kept": report.params_after / report.params_before,
                    "acc": digits.evaluate(gm, data.test) if "digits" in case else None,
                    "decomposed": sum(d.decomposed for d in report.layers),
                    "layers": len(report.layers),
                    "seconds": seconds,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return {"rows": rows}


# VGG's classifier (93 % of its parameters, 4096 x 25088) takes minutes to tabulate and little
# time to run: VGG-11 is decomposed under a MAC budget with its classifier left dense.
TV_SETUP = {
    "resnet18": {"budget": "params", "exclude": ()},
    "vgg11": {"budget": "macs", "exclude": ("classifier.",)},
}


def run_torchvision(names: list[str], fractions: list[float]) -> list[dict]:
    rows = []
    for name in names:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = torchvision.models.get_model(name, weights=None).eval()
            x = torch.randn(1, 3, 224, 224)
        setup = TV_SETUP.get(name, {"budget": "params", "exclude": ()})
        cache = ErrorCache()
        for method in METHODS:
            for fraction in fractions:
                t0 = time.perf_counter()
                gm = decompose(
                    model,
                    {setup["budget"]: fraction},
                    x,
                    method=method,
                    cache=cache,
                    progress=False,
                    max_groups=4,
                    ranks=16,
                    exclude=setup["exclude"],
                )
                seconds = time.perf_counter() - t0
                report = gm.meta["fxcompress.lowrank"]
                original_ms, ratio = latency_ratio(model, gm, x)
                row = {
                    "model": name,
                    "method": method,
                    "budget": setup["budget"],
                    "fraction": fraction,
                    "params_kept": report.params_after / report.params_before,
                    "macs_kept": report.macs_after / report.macs_before,
                    "max_error": report.max_error,
                    "original_ms": original_ms,
                    "lat_b1": ratio,
                    "seconds": seconds,
                    "ks": sorted({d.k for d in report.layers if d.decomposed}),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def timing_note(results: dict, part: str) -> str:
    """How ``part``'s latency ratios were timed, from what ``results`` recorded."""
    timing = results.get("timing", {}).get(part)
    if timing is None:
        return (
            "median over 5 rounds of paired ratios, each side the median of 15 timed runs: "
            "timed before this benchmark used `fxcompress.timing`"
        )
    return (
        f"{timing['pairs']} interleaved timed runs of each, each side the {timing['quantile']} "
        "quantile of its runs: `fxcompress.latency.timing.paired_timing`"
    )


def render(results: dict) -> str:
    lines = [
        "# Low-rank decomposition: ALDS vs uniform rank vs SVD energy",
        "",
        "Reproduce: `.venv/bin/python benchmarks/bench_lowrank.py` (its defaults run the three "
        "parts below with these budgets, about 15 min on 2 cores; `--render-only` redraws this "
        "file and `lowrank.png` from `lowrank.json`).",
        "",
    ]
    d = results.get("digits")
    if d:
        lines += [
            f"Digits ResNet-20 (three stages of three basic blocks, width 16; "
            f"{d['params']:,} parameters), test accuracy {d['base_acc']:.4f}; the same model "
            f"retrained with the same {d['epochs']}-epoch schedule: {d['base_ft_acc']:.4f}. "
            "Budget: fraction of all parameters kept. 'acc' right after the decomposition, "
            "'retrained' after the short retraining; latency = measured CPU ratio vs the "
            f"original (1 thread; {timing_note(results, 'digits')}).",
            "",
            "| method | budget | params kept | MACs kept | max error | layers decomposed | acc "
            "| retrained | Δ retrained vs base | latency b1 | latency b32 |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in d["rows"]:
            if "error" in r:
                lines.append(f"| {r['method']} | {r['fraction']} | infeasible | | | | | | | | |")
                continue
            lines.append(
                f"| {r['method']} | {r['fraction']} | {r['params_kept']:.3f} | "
                f"{r['macs_kept']:.3f} | {r['max_error']:.3f} | {r['decomposed']}/{r['layers']} "
                f"| {r['acc']:.4f} | {r['acc_ft']:.4f} | {100 * (r['acc_ft'] - d['base_acc']):+.2f}"
                f" | {r['lat_b1']:.3f} | {r['lat_b32']:.3f} |"
            )
        lines.append("")
    lb = results.get("latency")
    if lb:
        lines += [
            "ALDS under a measured-latency budget (k ≤ 2, 8 candidate ranks; every candidate "
            "pair and the whole model timed, the rest of the network = whole − layers): predicted "
            "and measured latency ratio, no retraining (measured ratio: "
            f"{timing_note(results, 'latency')}).",
            "",
            "| model | budget | predicted | measured | params kept | layers decomposed | acc |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in lb["rows"]:
            if "error" in r:
                lines.append(
                    f"| {r['case']} | {r['fraction']} | infeasible (least reachable "
                    f"{r['error'].split(',')[1].split()[0]}) | | | | |"
                )
                continue
            acc = "" if r["acc"] is None else f"{r['acc']:.4f}"
            lines.append(
                f"| {r['case']} | {r['fraction']} | {r['predicted']:.3f} | {r['measured']:.3f} | "
                f"{r['params_kept']:.3f} | {r['decomposed']}/{r['layers']} | {acc} |"
            )
        lines.append("")
    tv = results.get("torchvision")
    if tv:
        lines += [
            "torchvision models, random weights, 1×3×224×224, ALDS with k ≤ 4 and 16 candidate "
            "ranks per (layer, k); VGG-11 under a MAC budget with its classifier left dense. "
            "Latency = measured CPU ratio vs the original (1 thread; "
            f"{timing_note(results, 'torchvision')}).",
            "",
            "| model | method | budget | params kept | MACs kept | max error | latency b1 "
            "| original ms | decompose s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in tv:
            lines.append(
                f"| {r['model']} | {r['method']} | {r['budget']} {r['fraction']} | "
                f"{r['params_kept']:.3f} | "
                f"{r['macs_kept']:.3f} | {r['max_error']:.3f} | {r['lat_b1']:.3f} | "
                f"{r['original_ms']:.1f} | {r['seconds']:.1f} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = results.get("digits")
    tv = results.get("torchvision") or []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colours = {"alds": "C0", "uniform": "C1", "energy": "C2"}
    if d:
        ax = axes[0]
        for method in METHODS:
            rows = sorted(
                (r for r in d["rows"] if r["method"] == method and "acc" in r),
                key=lambda r: r["params_kept"],
            )
            kept = [r["params_kept"] for r in rows]
            ax.plot(
                kept,
                [r["acc"] for r in rows],
                "--o",
                color=colours[method],
                alpha=0.5,
                label=f"{method} (no retraining)",
            )
            ax.plot(
                kept,
                [r["acc_ft"] for r in rows],
                "-o",
                color=colours[method],
                label=f"{method} (retrained)",
            )
        ax.axhline(d["base_acc"], color="k", lw=0.8, label="original")
        ax.set_xlabel("fraction of parameters kept")
        ax.set_ylabel("test accuracy")
        ax.set_title("digits ResNet-20")
        ax.legend(fontsize=7)
    ax = axes[1]
    markers = {"resnet18": "o", "vgg11": "s", "digits": "^"}
    for method in METHODS:
        pts = [(r["macs_kept"], r["lat_b1"], r["model"]) for r in tv if r["method"] == method]
        if d:
            pts += [
                (r["macs_kept"], r["lat_b1"], "digits")
                for r in d["rows"]
                if r["method"] == method and "acc" in r
            ]
        for kept, lat, model in pts:
            ax.scatter(kept, lat, color=colours[method], marker=markers[model])
    for method in METHODS:
        ax.scatter([], [], color=colours[method], label=method)
    for model, m in markers.items():
        ax.scatter([], [], color="grey", marker=m, label=model)
    ax.plot([0.15, 1], [0.15, 1], "k:", lw=0.8, label="latency ∝ MACs")
    ax.set_yscale("log")
    ax.set_xlabel("fraction of MACs kept")
    ax.set_ylabel("measured latency ratio (batch 1, CPU)")
    ax.set_title("measured latency vs MACs")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def build_parser() -> argparse.ArgumentParser:
    """The command line; its defaults produce the committed ``results/lowrank.md``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.5, 0.35, 0.25],
                        help="digits: fractions of the parameters kept")
    parser.add_argument("--tv-fractions", nargs="+", type=float, default=[0.5, 0.25])
    parser.add_argument("--latency-fractions", nargs="+", type=float, default=[0.99, 0.8, 0.6])
    parser.add_argument("--models", nargs="+", default=["resnet18", "vgg11"])
    parser.add_argument("--epochs", type=int, default=4, help="retraining epochs")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--render-only", action="store_true", help="redraw md + png from json")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    torch.set_num_threads(1)
    table = LatencyTable(mode="measure", threads=1, repeats=15, warmup=3)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "lowrank.json"
    # parts run separately accumulate in one file
    results: dict = json.loads(json_path.read_text()) if json_path.exists() else {}
    if args.render_only:
        args.parts = []
    for part in PARTS:
        if part not in args.parts:
            continue
        if part == "digits":
            results[part] = run_digits(args.fractions, args.epochs)
        elif part == "latency":
            results[part] = run_latency_budget(args.latency_fractions, table)
        else:
            results[part] = run_torchvision(args.models, args.tv_fractions)
        results.setdefault("timing", {})[part] = timing()
        json_path.write_text(json.dumps(results, indent=1))
    (out / "lowrank.md").write_text(render(results))
    plot(results, out / "lowrank.png")
    print(render(results))


if __name__ == "__main__":
    main()
