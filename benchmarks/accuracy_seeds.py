"""``fxc merge+prune`` against Torch-Pruning at one budget, over several fine-tuning seeds.

The accuracy benchmark runs each row once; on 539 test images one image is 0.19 points, and the
fine-tuning seed (and, for fxcompress, which plan the measurements lead to) moves results by more.
This script repeats the two rows of ``bench_accuracy.py`` at each ``--budgets`` entry with every
``--seeds`` entry as the seed of the distillation fine-tune (and of fxcompress's trial fine-tunes),
Torch-Pruning aiming at that seed's fxcompress ratio, and writes the per-seed rows, means and
spreads to ``results/accuracy_seeds.md`` (rows also to ``results/accuracy_seeds.jsonl``).

    .venv/bin/python benchmarks/accuracy_seeds.py --model resnet --budgets 0.6 0.45 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import bench_accuracy as B
import digits
import torch

from fxcompress.latency.timing import paired_timing


def run(name: str, budget: float, seed: int) -> dict:
    """One seed's ``fxc merge+prune`` and ``torch-pruning`` rows at ``budget``."""
    S = B.FULL
    data = digits.load_digits_split(0)
    model = digits.trained(name, data, epochs=S.epochs, lr=B.LR, cache_dir=S.cache)
    x = data.test.x[:1]
    ref_d = B.deployable(model, x)
    ref_ms = paired_timing(ref_d, ref_d, (x,), pairs=S.pairs, threads=1).a_ms
    memo = B.FinetuneMemo(data, S.finetune_epochs, model, S.finetune, seed=seed)
    trial = B.FinetuneMemo(data, S.trial_epochs, model, S.finetune, seed=seed)
    ctx = B.Ctx(name, data, model, S, ref_d, ref_ms, memo, trial)
    path = str(S.cache / "importance" / f"digits-{name}-ce.json")
    out, note, _ = B.run_fxcompress(ctx, budget, B.FXC[B.TARGET], checkpoint=lambda: path)
    fxc = ctx.measure(out, {"note": note}, full=False)
    tp_model, tp_note = B.run_torch_pruning(ctx, fxc["ratio_b1"])
    tp = ctx.measure(tp_model, {"note": tp_note}, full=False)
    return {
        "model": name,
        "budget": budget,
        "seed": seed,
        "fxc_acc": fxc["acc"],
        "fxc_ratio": fxc["ratio_b1"],
        "tp_acc": tp["acc"],
        "tp_ratio": tp["ratio_b1"],
        "tp_note": tp_note,
    }


def render(rows: list[dict]) -> str:
    lines = [
        "# fxc merge+prune vs Torch-Pruning over fine-tuning seeds (digits)",
        "",
        "Each seed re-plans (`plan_candidates=4`, 1-epoch distillation trials) and fine-tunes with "
        "that seed; Torch-Pruning aims at the same seed's fxcompress batch-1 ratio. Test "
        "accuracy % @ measured speed-up (BN-folded forms, one thread, batch 1).",
        "",
        "| model | budget | seed | fxc merge+prune | Torch-Pruning |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['budget']} | {r['seed']} | {r['fxc_acc']:.2f} @ "
            f"{1 / r['fxc_ratio']:.2f}x | {r['tp_acc']:.2f} @ {1 / r['tp_ratio']:.2f}x |"
        )
    lines += ["", "| model | budget | fxc mean (min–max) | Torch-Pruning mean (min–max) |"]
    lines += ["|---|---|---|---|"]
    for key in sorted({(r["model"], r["budget"]) for r in rows}):
        group = [r for r in rows if (r["model"], r["budget"]) == key]
        cells = []
        for k in ("fxc_acc", "tp_acc"):
            v = [r[k] for r in group]
            cells.append(f"{statistics.mean(v):.2f} ({min(v):.2f}–{max(v):.2f})")
        lines.append(f"| {key[0]} | {key[1]} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet", choices=sorted(digits.BUILDERS))
    p.add_argument("--budgets", nargs="+", type=float, default=[0.6])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=B.RESULTS)
    args = p.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rows = []
    for budget in args.budgets:
        for seed in args.seeds:
            rows.append(run(args.model, budget, seed))
            print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "accuracy_seeds.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    text = render(rows)
    text += f"\n{time.perf_counter() - t0:.0f} s. Command: `.venv/bin/python "
    text += (
        "benchmarks/accuracy_seeds.py "
        + " ".join(
            [
                f"--model {args.model}",
                "--budgets",
                *map(str, args.budgets),
                "--seeds",
                *map(str, args.seeds),
            ]
        )
        + "`.\n"
    )
    (args.out / "accuracy_seeds.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
