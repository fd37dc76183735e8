"""``python -m fxcompress.demo``: compress torchvision MobileNetV2 (random weights) and report.

Runs the function-preserving pass (budget 1.0) and a budgeted run (default 0.6) with measured
CPU latency, and prints what changed and the latency before/after. Progress is a bar on a
terminal and one line per stage elsewhere (``make demo > demo.log`` gets no carriage returns).
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenet_v2", help="torchvision model builder")
    parser.add_argument("--budget", type=float, default=0.6)
    parser.add_argument("--size", type=int, default=224, help="input resolution")
    parser.add_argument("--latency", default="measure", choices=["measure", "flops"])
    args = parser.parse_args(argv)

    import torchvision

    import fxcompress

    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    # off a terminal the stages are logged (one line each) instead of drawn as bars
    logging.getLogger("fxcompress.progress").setLevel(logging.INFO)
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)(weights=None).eval()
    x = torch.randn(1, 3, args.size, args.size)
    print(f"fxcompress demo: torchvision {args.model} (random weights), input {tuple(x.shape)}")

    exact = fxcompress.optimize(model, 1.0, example_inputs=x, latency=args.latency)
    print("\n## budget 1.0 (function-preserving rewrites only)\n")
    print(exact.meta["fxcompress"].to_markdown())

    data = [torch.randn(4, 3, args.size, args.size) for _ in range(2)]
    try:
        compressed = fxcompress.optimize(
            model, args.budget, example_inputs=x, data=data, latency=args.latency, progress=None
        )
    except fxcompress.InfeasibleBudget as exc:
        print(f"\n## budget {args.budget}: not reached\n\n{exc}")
        if exc.result is None:
            return 1
        compressed = exc.result  # the fastest model measured; its report says how close it came
    print(f"\n## budget {args.budget}\n")
    print(compressed.meta["fxcompress"].to_markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
