"""Plan JSON of fixed cases, for checking that a refactoring leaves the plans byte-identical.

Plans a small conv chain (the determinism test's model) at three budgets and torchvision's ResNet-18
and MobileNetV2 (random weights, 64×64) with and without ``"drop"`` at two budgets, all with the
analytic (``"flops"``) latency so that nothing is timed, and prints one plan JSON per line (or
``infeasible <minimum>``). Run it on two checkouts and compare the outputs::

    PYTHONPATH=. .venv/bin/python benchmarks/plan_fingerprint.py > after.txt
    cmp before.txt after.txt

It takes about two minutes on two idle cores (importance scoring dominates). Where the checkout has
the default on-disk cache (``fxcompress.cache``), it is turned off so that every score is computed.
"""

from __future__ import annotations

import importlib.util

import torch
import torchvision
from torch import nn

import fxcompress


def _chain() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()]
    for _ in range(5):
        layers += [nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6()]
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    return nn.Sequential(*layers).eval(), x


#: no cache where there is a default one (older checkouts had none)
_COLD = {"cache_dir": False} if importlib.util.find_spec("fxcompress.cache") else {}


def main() -> None:
    model, x = _chain()
    for budget in (0.9, 0.7, 0.5):
        print(fxcompress.plan(model, budget, x, latency="flops", progress=False, **_COLD).to_json())
    for name in ("resnet18", "mobilenet_v2"):
        torch.manual_seed(0)
        net = getattr(torchvision.models, name)(num_classes=10).eval()
        x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
        for methods in (("merge", "prune"), ("merge", "prune", "drop")):
            for budget in (0.8, 0.5):
                try:
                    plan = fxcompress.plan(
                        net, budget, x, latency="flops", methods=methods, progress=False, **_COLD
                    )
                    print(plan.to_json())
                except fxcompress.InfeasibleBudget as exc:
                    print("infeasible", exc.minimum)


if __name__ == "__main__":
    main()
