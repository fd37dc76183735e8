"""Accuracy at measured speed on real data (scikit-learn digits), side by side with alternatives.

For each model (a CIFAR-style ResNet and a MobileNetV2-style network, trained here) and budget,
every method gets the same fine-tuning schedule (:func:`digits.finetune`) and the same yardstick:
the measured CPU latency of its *deployable* form (BatchNorm folded by ``optimize(m, 1.0)``)
divided by that of the original's deployable form, timed alternately in the same run (medians).

Methods: fxcompress with ``methods=("merge",)`` (the two-stage DP search space) and
``("merge", "prune")`` (LayerMerge's); layer pruning only (drop whole residual blocks, chosen by
``planner.solve`` on measured block latencies and task-loss damage); Torch-Pruning channel
pruning with its ratio bisected to the fxcompress result's measured latency.

    python benchmarks/bench_accuracy.py                       # both models, all budgets
    python benchmarks/bench_accuracy.py --models resnet --budgets 0.6

Writes ``benchmarks/results/accuracy.md``, ``accuracy.json`` and ``accuracy.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import digits
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress
from fxcompress import planner

RESULTS = Path(__file__).parent / "results"
CACHE = Path(__file__).parent / ".cache"


def deployable(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """The exact, BN-folded form every method is timed in."""
    return fxcompress.optimize(model, 1.0, example_inputs=x, latency="flops", progress=False)


def _time(model: nn.Module, x: torch.Tensor, reps: int) -> float:
    with torch.inference_mode():
        t0 = time.perf_counter()
        for _ in range(reps):
            model(x)
        return (time.perf_counter() - t0) / reps * 1e3


def paired_ratio(ref: nn.Module, model: nn.Module, x: torch.Tensor, rounds: int = 15) -> tuple:
    """Median latency of ``model`` over ``ref``, timed alternately; also the spread (IQR/median)."""
    reps = max(3, int(20 / max(1, x.shape[0] // 8)))
    for m in (ref, model):
        _time(m, x, reps)  # warm-up
    ratios = []
    for _ in range(rounds):
        a, b = _time(ref, x, reps), _time(model, x, reps)
        ratios.append(b / a)
    q = statistics.quantiles(ratios, n=4)
    med = statistics.median(ratios)
    return med, (q[2] - q[0]) / med


def compiled(model: nn.Module) -> nn.Module | None:
    try:
        return torch.compile(model)
    except Exception:
        return None


# --------------------------------------------------------------------------- methods


def run_fxcompress(model, data, budget, methods, x, **kw):
    try:
        out = fxcompress.optimize(
            model,
            budget,
            example_inputs=x,
            data=data.calibration(),
            loss_fn=F.cross_entropy,
            finetune=digits.finetune_schedule(data),
            methods=methods,
            progress=False,
            cache_dir=str(CACHE / "latency"),
            **kw,
        )
    except fxcompress.InfeasibleBudget as exc:
        if exc.result is None:
            return None, f"infeasible (lowest {exc.minimum:.2f})"
        return exc.result, "missed budget; fastest plan"
    return out, ""


def _residual_blocks(model: nn.Module) -> list[str]:
    """Blocks whose shortcut is the identity (dropping one leaves the shapes as they are)."""
    names = []
    for name, m in model.named_modules():
        if isinstance(m, digits.BasicBlock) and isinstance(m.shortcut, nn.Identity):
            names.append(name)
        if isinstance(m, digits.InvertedResidual) and m.use_res:
            names.append(name)
    return names


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


class _Shortcut(nn.Module):
    """A dropped block: its shortcut (identity) followed by the block's final activation."""

    def __init__(self, act: bool) -> None:
        super().__init__()
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x) if self.act else x


@torch.inference_mode()
def _loss(model: nn.Module, batches) -> float:
    return statistics.fmean(float(F.cross_entropy(model(x), y)) for x, y in batches)


def run_layer_drop(model, data, target_ms, ref_ms, x):
    """Keep or drop each identity-shortcut block: damage = task-loss increase, price = measured."""
    calib = data.calibration()
    base = _loss(model, calib)
    blocks = _residual_blocks(model)
    segs, ms = [], {}
    fast = deployable(model, x)
    for name in blocks:
        m = copy.deepcopy(model)
        _set(m, name, _Shortcut(isinstance(model.get_submodule(name), digits.BasicBlock)))
        dmg = max(0.0, _loss(m, calib) - base)
        r, _ = paired_ratio(fast, deployable(m, x), x, rounds=5)
        ms[name] = max(0.0, (1 - r) * ref_ms)
        segs.append(
            planner.Chain(
                name,
                1,
                (
                    planner.Segment(
                        0,
                        1,
                        (planner.Choice("keep", ms[name], 0.0), planner.Choice("drop", 0.0, dmg)),
                    ),
                ),
            )
        )
    problem = planner.Problem(tuple(segs), fixed_latency=max(0.0, ref_ms - sum(ms.values())))
    try:
        sol = planner.solve(problem, target_ms)
    except fxcompress.InfeasibleBudget:
        sol = planner.solve(problem, planner.min_latency(problem))
    out = copy.deepcopy(model)
    dropped = [d.chain for d in sol.decisions if d.key == "drop"]
    for name in dropped:
        _set(out, name, _Shortcut(isinstance(model.get_submodule(name), digits.BasicBlock)))
    digits.finetune(out, data)
    return out, f"dropped {len(dropped)}/{len(blocks)}"


def _tp_prune(model, x, ratio):
    import torch_pruning as tp

    m = copy.deepcopy(model)
    pruner = tp.pruner.MetaPruner(
        m,
        x,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=ratio,
        ignored_layers=[m.fc],
    )
    pruner.step()
    return m


def run_torch_pruning(model, data, target_ratio, ref_deploy, x):
    """Channel pruning, its ratio bisected so the deployable form meets ``target_ratio``."""
    lo, hi, best = 0.0, 0.9, None
    for _ in range(6):
        mid = (lo + hi) / 2
        r, _ = paired_ratio(ref_deploy, deployable(_tp_prune(model, x, mid), x), x, rounds=5)
        if r <= target_ratio:
            best, hi = mid, mid
        else:
            lo = mid
    note = ""
    if best is None:
        best, note = 0.9, "cannot reach the latency (ratio 0.9)"
    m = _tp_prune(model, x, best)
    digits.finetune(m, data)
    return m, (note or f"ratio {best:.2f}")


# --------------------------------------------------------------------------- driver


def measure_all(ref: nn.Module, result: nn.Module, data, row: dict) -> None:
    x1, x64 = data.test.x[:1], data.test.x[:64]
    ref_d, res_d = deployable(ref, x1), deployable(result, x1)
    row["acc"] = 100 * digits.evaluate(result, data.test)
    row["ratio_b1"], row["iqr_b1"] = paired_ratio(ref_d, res_d, x1)
    row["ratio_b64"], row["iqr_b64"] = paired_ratio(ref_d, res_d, x64, rounds=7)
    rc, mc = compiled(ref_d), compiled(res_d)
    try:
        row["ratio_compile_b1"], _ = paired_ratio(rc, mc, x1, rounds=7)
    except Exception as exc:
        row["ratio_compile_b1"] = None
        row["compile_error"] = type(exc).__name__


def run_model(name: str, budgets: list[float], log) -> list[dict]:
    data = digits.load_digits_split(0)
    t0 = time.perf_counter()
    model = digits.trained(name, data)
    x = data.test.x[:1]
    rows = [
        {
            "model": name,
            "method": "original",
            "budget": 1.0,
            "note": "",
            "train_s": round(time.perf_counter() - t0, 1),
        }
    ]
    measure_all(model, model, data, rows[0])
    log(rows[0])
    ref_d = deployable(model, x)
    ref_ms = statistics.median(_time(ref_d, x, 50) for _ in range(5))
    for b in budgets:
        found = {}
        for label, methods in (("fxc merge", ("merge",)), ("fxc merge+prune", ("merge", "prune"))):
            t0 = time.perf_counter()
            out, note = run_fxcompress(model, data, b, methods, x)
            row = {"model": name, "method": label, "budget": b, "note": note}
            if out is not None:
                measure_all(model, out, data, row)
                found[label] = row["ratio_b1"]
            row["wall_s"] = round(time.perf_counter() - t0, 1)
            log(row)
            rows.append(row)
        target = found.get("fxc merge+prune", b)
        for label, fn in (
            ("layer drop", lambda t: run_layer_drop(model, data, t * ref_ms, ref_ms, x)),
            ("torch-pruning", lambda t: run_torch_pruning(model, data, t, ref_d, x)),
        ):
            t0 = time.perf_counter()
            out, note = fn(target)
            row = {"model": name, "method": label, "budget": b, "note": note}
            measure_all(model, out, data, row)
            row["wall_s"] = round(time.perf_counter() - t0, 1)
            log(row)
            rows.append(row)
    return rows


def render(rows: list[dict]) -> str:
    lines = [
        "# Accuracy at measured speed (scikit-learn digits, 32x32)",
        "",
        "Latency ratio = deployable result / deployable original (BN folded in both), one thread, "
        "timed alternately in the same run, median of rounds; `iqr` is the interquartile range of "
        "the rounds over the median (machine shared with other jobs).",
        "",
        "| model | method | budget | test acc % | ratio b1 (iqr) | speed-up b1 | ratio b64 | "
        "ratio compiled b1 | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "acc" not in r:
            lines.append(
                f"| {r['model']} | {r['method']} | {r['budget']} | - | - | - | - | - | "
                f"{r['note']} |"
            )
            continue
        comp = r.get("ratio_compile_b1")
        lines.append(
            f"| {r['model']} | {r['method']} | {r['budget']} | {r['acc']:.2f} | "
            f"{r['ratio_b1']:.3f} ({r['iqr_b1']:.2f}) | {1 / r['ratio_b1']:.2f}x | "
            f"{r['ratio_b64']:.3f} | {'-' if comp is None else f'{comp:.3f}'} | {r['note']} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model and "acc" in r]
        for method in dict.fromkeys(r["method"] for r in mine):
            pts = sorted((1 / r["ratio_b1"], r["acc"]) for r in mine if r["method"] == method)
            ax.plot(*zip(*pts), marker="o", label=method)
        ax.set_title(model)
        ax.set_xlabel("measured speed-up, batch 1")
        ax.set_ylabel("test accuracy %")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet", "mobilenet"])
    p.add_argument("--budgets", nargs="+", type=float, default=[0.8, 0.6, 0.45, 0.3])
    args = p.parse_args()
    torch.set_num_threads(1)
    RESULTS.mkdir(exist_ok=True)
    out_json = RESULTS / "accuracy.json"
    rows: list[dict] = []

    def log(row: dict) -> None:
        print(json.dumps(row), flush=True)
        out_json.write_text(json.dumps([*rows, row], indent=1))

    t0 = time.perf_counter()
    for name in args.models:
        rows += run_model(name, args.budgets, log)
    out_json.write_text(json.dumps(rows, indent=1))
    (RESULTS / "accuracy.md").write_text(
        render(rows) + f"\nTotal wall time {time.perf_counter() - t0:.0f} s.\n"
    )
    plot(rows, RESULTS / "accuracy.png")


if __name__ == "__main__":
    main()
