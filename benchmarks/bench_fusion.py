"""Layer Fusion benchmark: quality vs unique parameters, before and after retraining.

Two models, both trained here (weights cached in ``benchmarks/.cache``):

- ``benchmarks/tiny_lm.py``'s byte-level transformer LM on the Python standard library's own
  sources; validation perplexity per byte before and after ``fxcompress.fusion.fuse`` in
  ``share`` and ``drop`` mode at several budgets, each followed by the same number of
  retraining steps; the unfused model retrained for as many steps is the control.
- ``benchmarks/digits.py``'s ResNet of basic blocks (three stages of three blocks) on the
  scikit-learn digits; test accuracy vs unique parameters, with the alignment ablation
  (hidden-unit permutation matching on / off, before retraining).

Run ``python benchmarks/bench_fusion.py`` (about 20 min on two busy cores); ``--quick`` for a smoke
run. Writes ``benchmarks/results/fusion.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))

import digits
import tiny_lm

from fxcompress.errors import InfeasibleBudget
from fxcompress.fusion import fuse

RESULTS = Path(__file__).parent / "results"
CACHE = Path(__file__).parent / ".cache"


def unique_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- language model


def trained_lm(corpus: tiny_lm.Corpus, steps: int) -> tiny_lm.TinyLM:
    key = hashlib.sha1(f"{corpus.description}|{steps}|{torch.__version__}".encode()).hexdigest()
    path = CACHE / f"tinylm-{steps}-{key[:12]}.pt"
    model = tiny_lm.TinyLM()
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    t = time.perf_counter()
    tiny_lm.train(model, corpus.train, steps, log_every=100)
    print(f"trained the base LM for {steps} steps in {time.perf_counter() - t:.0f} s", flush=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    return model.eval()


def bench_lm(args: argparse.Namespace, rows: list[dict], save) -> list[dict]:
    corpus = tiny_lm.load_corpus()
    print(corpus.description, flush=True)
    base = trained_lm(corpus, args.base_steps)
    ctx = base.context
    ppl_kw = {"max_tokens": args.ppl_tokens, "context": ctx}
    calib = [corpus.val[i * 4096 : i * 4096 + 8 * ctx].view(8, ctx) for i in range(2)]
    example = corpus.train[:ctx].view(1, ctx)
    base_ppl = tiny_lm.perplexity(base, corpus.val, **ppl_kw)
    n0 = unique_params(base)
    rows.append(
        {
            "model": "tinylm",
            "mode": "original",
            "budget": 1.0,
            "params": n0,
            "ratio": 1.0,
            "blocks": len(base.blocks),
            "before": base_ppl,
            "after": base_ppl,
            "seconds": 0.0,
        }
    )
    print(f"base: {n0:,} params, val ppl {base_ppl:.3f}", flush=True)

    def retrain(gm: torch.nn.Module, steps: int) -> None:
        tiny_lm.train(gm, corpus.train, steps, context=ctx, lr=args.retrain_lr, warmup=10, seed=1)

    control = copy.deepcopy(base)
    retrain(control, args.retrain_steps)
    ctl = tiny_lm.perplexity(control, corpus.val, **ppl_kw)
    rows.append(
        {
            "model": "tinylm",
            "mode": "control (retrain only)",
            "budget": 1.0,
            "params": n0,
            "ratio": 1.0,
            "blocks": len(base.blocks),
            "before": base_ppl,
            "after": ctl,
            "seconds": 0.0,
        }
    )
    print(
        f"control: retrained {args.retrain_steps} steps without fusion: ppl {ctl:.3f}", flush=True
    )
    configs = [(m, b, 1) for m in ("share", "drop") for b in args.lm_budgets]
    configs.append(("share", min(args.lm_budgets), args.iterative_steps))
    for mode, budget, steps in configs:
        t = time.perf_counter()
        try:
            one_shot = fuse(
                base, budget, mode=mode, example_inputs=example, data=calib, progress=False
            )
        except InfeasibleBudget as exc:
            print(f"{mode} {budget}: {exc}", flush=True)
            continue
        before = tiny_lm.perplexity(one_shot, corpus.val, **ppl_kw)
        if steps == 1:
            model = one_shot
            retrain(model, args.retrain_steps)
        else:
            per = args.retrain_steps // steps
            model = fuse(
                base,
                budget,
                mode=mode,
                example_inputs=example,
                data=calib,
                steps=steps,
                retrain=lambda gm, per=per: retrain(gm, per),
                progress=False,
            )
        after = tiny_lm.perplexity(model, corpus.val, **ppl_kw)
        rep = model.meta["fxcompress.fusion"]
        assert rep.params_after == unique_params(model)
        row = {
            "model": "tinylm",
            "mode": mode if steps == 1 else f"{mode}, {steps} steps",
            "budget": budget,
            "params": rep.params_after,
            "ratio": rep.ratio,
            "blocks": rep.blocks_after - 1,
            "before": before,
            "after": after,
            "seconds": time.perf_counter() - t,
        }
        rows.append(row)
        save()
        print(
            f"{row['mode']} {budget}: params {rep.params_after:,} ({rep.ratio:.3f}), "
            f"ppl fused {before:.3f} -> retrained {after:.3f}",
            flush=True,
        )
        torch.export.export(model, (example,))  # every result exports
    return rows


# --------------------------------------------------------------------------- digits ResNet


def bench_digits(args: argparse.Namespace) -> list[dict]:
    data = digits.load_digits_split(seed=0)
    base = digits.trained("resnet", data, epochs=args.digits_epochs, blocks=(3, 3, 3))
    acc0 = digits.evaluate(base, data.test)
    n0 = unique_params(base)
    x = data.train.x[:64]
    calib = [(data.train.x[i : i + 128], None) for i in range(0, 512, 128)]
    rows = [
        {
            "model": "resnet-digits",
            "mode": "original",
            "budget": 1.0,
            "params": n0,
            "ratio": 1.0,
            "blocks": 9,
            "before": acc0,
            "after": acc0,
            "align": True,
        }
    ]
    control = digits.finetune(copy.deepcopy(base), data, epochs=args.finetune_epochs)
    rows.append(
        {
            "model": "resnet-digits",
            "mode": "control (retrain only)",
            "budget": 1.0,
            "params": n0,
            "ratio": 1.0,
            "blocks": 9,
            "before": acc0,
            "after": digits.evaluate(control, data.test),
            "align": True,
        }
    )
    print(f"digits resnet: {n0:,} params, test acc {acc0:.4f}", flush=True)
    for mode in ("share", "drop"):
        for budget in args.digits_budgets:
            for align in (True, False):
                try:
                    gm = fuse(
                        base,
                        budget,
                        mode=mode,
                        example_inputs=x,
                        data=calib,
                        align=align,
                        progress=False,
                    )
                except InfeasibleBudget as exc:
                    print(f"{mode} {budget}: {exc}", flush=True)
                    break
                before = digits.evaluate(gm, data.test)
                after = None
                if align:
                    digits.finetune(gm, data, epochs=args.finetune_epochs)
                    after = digits.evaluate(gm, data.test)
                    torch.export.export(gm, (x,))
                rep = gm.meta["fxcompress.fusion"]
                assert rep.params_after == unique_params(gm)
                rows.append(
                    {
                        "model": "resnet-digits",
                        "mode": mode,
                        "budget": budget,
                        "params": rep.params_after,
                        "ratio": rep.ratio,
                        "blocks": rep.blocks_after,
                        "before": before,
                        "after": after,
                        "align": align,
                    }
                )
                print(
                    f"{mode} {budget} align={align}: params {rep.params_after:,} "
                    f"({rep.ratio:.3f}), acc {before:.4f} -> {after}",
                    flush=True,
                )
    return rows


# --------------------------------------------------------------------------- output


def render(lm: list[dict], dg: list[dict], args: argparse.Namespace, corpus: str) -> str:
    def f(v: float | None, fmt: str) -> str:
        return "–" if v is None else format(v, fmt)

    lines = [
        "# Layer Fusion (`fxcompress.fusion.fuse`)",
        "",
        f"Command: `python benchmarks/bench_fusion.py {' '.join(sys.argv[1:])}`".rstrip() + " "
        f"(torch {torch.__version__}, {torch.get_num_threads()} threads, CPU).",
        "",
        "## Byte-level transformer LM (TinyLM defaults: 4 pre-norm blocks, d=128)",
        "",
        f"Corpus: {corpus}. Base model trained {args.base_steps} steps; every row (and the",
        f"control) is then retrained {args.retrain_steps} steps (AdamW, lr {args.retrain_lr}).",
        "Perplexity is per byte on the first "
        f"{args.ppl_tokens:,} validation bytes. Similarity: linear CKA on 16 validation windows.",
        "`ppl fused` is before any retraining (for the iterative row: the one-shot fusion at the",
        f"same budget); the iterative row retrains {args.retrain_steps} steps in total, split over",
        f"{args.iterative_steps} fuse-then-retrain steps. `blocks run` counts transformer blocks.",
        "",
        "| mode | budget | unique params | ratio | blocks run | ppl fused | ppl retrained |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in lm:
        lines.append(
            f"| {r['mode']} | {r['budget']:g} | {r['params']:,} | {r['ratio']:.3f} | "
            f"{r['blocks']} | {r['before']:.3f} | {r['after']:.3f} |"
        )
    lines += [
        "",
        "## Digits ResNet (basic blocks 3-3-3, width 16)",
        "",
        f"Test accuracy; retraining = `digits.finetune` ({args.finetune_epochs} epochs). "
        "`align` = hidden-unit permutation matching before averaging (the ablation rows have no",
        "retraining).",
        "",
        "| mode | budget | align | unique params | ratio | blocks run | acc fused "
        "| acc retrained |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in dg:
        lines.append(
            f"| {r['mode']} | {r['budget']:g} | {'yes' if r['align'] else 'no'} | "
            f"{r['params']:,} | {r['ratio']:.3f} | {r['blocks']} | {r['before']:.4f} | "
            f"{f(r['after'], '.4f')} |"
        )
    return "\n".join(lines) + "\n"


def plot(lm: list[dict], dg: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, rows, key, label in (
        (axes[0], lm, "after", "val perplexity (retrained)"),
        (axes[1], [r for r in dg if r["align"]], "after", "test accuracy (retrained)"),
    ):
        for mode, marker in (("share", "o"), ("drop", "s")):
            pts = sorted((r["ratio"], r[key]) for r in rows if r["mode"] == mode)
            if pts:
                ax.plot(*zip(*pts), marker=marker, label=mode)
        base = next(r for r in rows if r["mode"] == "original")
        ctl = next(r for r in rows if r["mode"].startswith("control"))
        ax.axhline(base["after"], color="grey", ls=":", label="original")
        ax.axhline(ctl["after"], color="black", ls="--", label="retrained, unfused")
        ax.set_xlabel("unique parameters / original")
        ax.set_ylabel(label)
        ax.legend()
    axes[0].set_title("TinyLM")
    axes[1].set_title("digits ResNet")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke run (results not written)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--base-steps", type=int, default=500)
    p.add_argument("--retrain-steps", type=int, default=100)
    p.add_argument("--retrain-lr", type=float, default=1e-3)
    p.add_argument("--iterative-steps", type=int, default=2)
    p.add_argument("--ppl-tokens", type=int, default=65_536)
    p.add_argument("--lm-budgets", type=float, nargs="+", default=[0.8, 0.55, 0.35])
    p.add_argument("--digits-epochs", type=int, default=30)
    p.add_argument("--finetune-epochs", type=int, default=4)
    p.add_argument("--digits-budgets", type=float, nargs="+", default=[0.9, 0.8, 0.7])
    p.add_argument("--skip-lm", action="store_true")
    p.add_argument("--skip-digits", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.base_steps, args.retrain_steps, args.ppl_tokens = 20, 4, 4096
        args.lm_budgets, args.digits_budgets, args.finetune_epochs = [0.6], [0.8], 1
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    dg = [] if args.skip_digits else bench_digits(args)
    lm: list[dict] = []
    description = tiny_lm.load_corpus().description

    def save() -> None:  # after every row, so a long run leaves its partial results
        text = render(lm, dg, args, description)
        if args.quick:
            return
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "fusion.md").write_text(text)
        (RESULTS / "fusion.json").write_text(json.dumps({"lm": lm, "digits": dg}, indent=2))
        if len(lm) > 2 and dg:
            plot(lm, dg, RESULTS / "fusion.png")

    if not args.skip_lm:
        bench_lm(args, lm, save)
    save()
    print(f"total {time.perf_counter() - start:.0f} s")
    print(render(lm, dg, args, description))


if __name__ == "__main__":
    main()
