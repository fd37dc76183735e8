"""Time and memory of the analysis and planning stages against graph size (issue 8).

Deep synthetic chains (conv-BN-ReLU repeated ``n`` times, random weights) are run through
capture + canonicalize, analyze, option enumeration and pricing (analytic latency), the planner
(with zero damages, so importance scoring is left out: it runs the network once per candidate and
is measured separately on small sizes), and the exact merge. Then ResNet-152 and EfficientNet-B7
(random weights) through the same stages and ``optimize(m, 1.0)``. The fitted exponent of
time ~ n^k over the chain sizes shows whether a stage grows faster than linearly.

    python benchmarks/bench_scaling.py                      # 100..2000 layers, both big models
    python benchmarks/bench_scaling.py --sizes 100 200 --no-models

Writes ``benchmarks/results/scaling.md`` and ``scaling.png``.
"""

from __future__ import annotations

import argparse
import math
import resource
import time
from pathlib import Path

import torch
from torch import nn

import fxcompress
from fxcompress.depth import planner
from fxcompress.depth.options import build_problem, enumerate_options
from fxcompress.latency import LatencyTable

RESULTS = Path(__file__).parent / "results"


def chain(n: int) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(n):
        layers += [nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()]
    return nn.Sequential(*layers).eval()


def stages(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    out: dict[str, float] = {}
    t = time.perf_counter()
    gm = fxcompress.canonicalize(fxcompress.capture(model, x))
    out["capture"] = time.perf_counter() - t
    t = time.perf_counter()
    analysis = fxcompress.analyze(gm)
    out["analyze"] = time.perf_counter() - t
    t = time.perf_counter()
    table = LatencyTable(mode="flops")
    options = enumerate_options(analysis, prune=True)
    damages = {o.id: 0.0 for o in options if o.needs_score}
    problem = build_problem(analysis, options, damages, table, dtype="float32", fixed_latency=0.0)
    out["options"] = time.perf_counter() - t
    out["n_options"] = len(options)
    t = time.perf_counter()
    total = sum(c.latency for ch in problem.chains for s in ch.segments for c in s.choices)
    planner.solve(problem, total, resolution=2000)
    out["plan"] = time.perf_counter() - t
    t = time.perf_counter()
    fxcompress.merge(gm)
    out["merge"] = time.perf_counter() - t
    out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # whole process
    out["nodes"] = len(gm.graph.nodes)
    return out


def exponent(ns: list[int], ts: list[float]) -> float:
    xs, ys = [math.log(n) for n in ns], [math.log(max(t, 1e-6)) for t in ts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", type=int, nargs="+", default=[100, 250, 500, 1000, 2000])
    p.add_argument("--no-models", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    keys = ["capture", "analyze", "options", "plan", "merge"]
    rows = []
    for n in args.sizes:
        r = stages(chain(n), torch.randn(1, 4, 8, 8))
        rows.append((n, r))
        print(n, {k: round(v, 3) for k, v in r.items()}, flush=True)
    lines = [
        "# Scaling of analysis and planning",
        "",
        "Deep conv-BN-ReLU chains (4 channels, 8x8),"
        " 1 thread, analytic latency; seconds per stage, peak RSS of the process so far (MB).",
        "",
        "| layers | nodes | options | " + " | ".join(keys) + " | peak MB |",
        "|---" * (len(keys) + 4) + "|",
    ]
    for n, r in rows:
        lines.append(
            f"| {n} | {r['nodes']} | {r['n_options']} | "
            + " | ".join(f"{r[k]:.3f}" for k in keys)
            + f" | {r['peak_mb']:.0f} |"
        )
    if len(rows) > 1:
        ns = [n for n, _ in rows]
        lines.append(
            "| exponent k (t ~ n^k) | | | "
            + " | ".join(f"{exponent(ns, [r[k] for _, r in rows]):.2f}" for k in keys)
            + " | |"
        )
    if not args.no_models:
        import torchvision

        lines += [
            "",
            "## Large models (random weights, analytic latency)",
            "",
            "| model | input | nodes | options | "
            + " | ".join(keys)
            + " | optimize(1.0) s | peak MB | max RSS MB |",
            "|---" * (len(keys) + 7) + "|",
        ]
        for name, size in (("resnet152", 224), ("efficientnet_b7", 224)):
            model = torchvision.models.get_model(name, weights=None).eval()
            x = torch.randn(1, 3, size, size)
            r = stages(model, x)
            t = time.perf_counter()
            fxcompress.optimize(model, 1.0, example_inputs=x, latency="flops", progress=False)
            opt = time.perf_counter() - t
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(
                name, {k: round(v, 3) for k, v in r.items()}, "optimize", round(opt, 1), flush=True
            )
            lines.append(
                f"| {name} | {size} | {r['nodes']} | {r['n_options']} | "
                + " | ".join(f"{r[k]:.2f}" for k in keys)
                + f" | {opt:.1f} | {r['peak_mb']:.0f} | {rss:.0f} |"
            )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scaling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if len(rows) > 1:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for k in keys:
            ax.loglog([n for n, _ in rows], [max(r[k], 1e-4) for _, r in rows], "o-", label=k)
        ax.set_xlabel("layers in the chain")
        ax.set_ylabel("seconds")
        ax.legend()
        ax.set_title("fxcompress stage time vs depth")
        fig.tight_layout()
        fig.savefig(RESULTS / "scaling.png", dpi=120)


if __name__ == "__main__":
    main()
