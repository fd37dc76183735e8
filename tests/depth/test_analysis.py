"""Analysis finds chains and residuals on torchvision models with no per-architecture code.

Expected counts are derived independently from the models' own module structure (block classes and
their flags), never from fxcompress.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import efficientnet, mnasnet, mobilenetv2, mobilenetv3, regnet, resnet

import fxcompress
from fxcompress.depth.analysis import Residual, Unit, units_of


def _analyze(model: nn.Module, size: int = 64) -> fxcompress.Analysis:
    x = torch.randn(1, 3, size, size)
    return fxcompress.analyze(fxcompress.canonicalize(fxcompress.capture(model.eval(), x)))


def _residuals(a: fxcompress.Analysis) -> list[Residual]:
    return [it for c in a.chains for it in c.items if isinstance(it, Residual)]


def _all_units(a: fxcompress.Analysis) -> list[Unit]:
    units = []
    for c in a.chains:
        if c.parent is not None:
            continue  # branch chains repeat the units of their residual
        for it in c.items:
            units.extend(units_of(it))
    return units


def _expected_residuals(model: nn.Module) -> tuple[int, int]:
    """(residual blocks, of which with a projection shortcut) from the block classes."""
    total = proj = 0
    for m in model.modules():
        if isinstance(m, (resnet.BasicBlock, resnet.Bottleneck)):
            total += 1
            proj += m.downsample is not None
        elif isinstance(m, mobilenetv2.InvertedResidual) and m.use_res_connect:
            total += 1
        elif isinstance(m, mobilenetv3.InvertedResidual) and m.use_res_connect:
            # blocks with squeeze-excite have a gate in the branch: not a plain residual
            has_se = any(isinstance(s, torchvision.ops.SqueezeExcitation) for s in m.modules())
            total += not has_se
        elif isinstance(m, mnasnet._InvertedResidual) and m.apply_residual:
            total += 1
        elif isinstance(m, regnet.ResBottleneckBlock):
            has_se = any(isinstance(s, torchvision.ops.SqueezeExcitation) for s in m.modules())
            total += not has_se
            proj += (m.proj is not None) and not has_se
        elif isinstance(m, efficientnet.MBConv) and m.use_res_connect:
            has_se = any(isinstance(s, torchvision.ops.SqueezeExcitation) for s in m.modules())
            total += not has_se
    return total, proj


MODELS = [
    "resnet18",
    "resnet34",
    "resnet50",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "mnasnet0_5",
    "regnet_x_400mf",
    "regnet_y_400mf",
    "vgg11",
]


@pytest.mark.parametrize("name", MODELS)
def test_residual_blocks_found(name: str) -> None:
    model = torchvision.models.get_model(name, weights=None)
    a = _analyze(model)
    total, proj = _expected_residuals(model)
    found = _residuals(a)
    assert len(found) == total
    assert sum(r.shortcut is not None for r in found) == proj


@pytest.mark.parametrize("name", MODELS)
def test_every_layer_is_a_unit_exactly_once(name: str) -> None:
    model = torchvision.models.get_model(name, weights=None)
    a = _analyze(model)
    layers = [n for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    units = _all_units(a)
    assert len(units) == len({u.layer for u in units}), "a layer appears in two items"
    assert len(units) == len(layers)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_trunk_is_one_chain_of_blocks(name: str) -> None:
    model = torchvision.models.get_model(name, weights=None)
    a = _analyze(model)
    blocks = sum(isinstance(m, (resnet.BasicBlock, resnet.Bottleneck)) for m in model.modules())
    longest = max(a.roots, key=len)
    assert len(longest) == blocks
    assert all(isinstance(it, Residual) for it in longest.items)
    # stem conv (before max-pool) and fc head are chains of their own
    assert sorted(len(c) for c in a.roots) == [1, 1, blocks]


def test_vgg_chains_split_at_pooling() -> None:
    model = torchvision.models.vgg11(weights=None)
    a = _analyze(model)
    # derive the conv runs between max-pools from the features Sequential
    runs, current = [], 0
    for m in model.features:
        if isinstance(m, nn.Conv2d):
            current += 1
        elif isinstance(m, nn.MaxPool2d):
            runs.append(current)
            current = 0
    linears = sum(isinstance(m, nn.Linear) for m in model.classifier)
    assert sorted(len(c) for c in a.roots) == sorted([*runs, linears])


def test_unknown_ops_end_chains_and_are_reported() -> None:
    class Gate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.a(x))
            y = y * torch.sigmoid(y.mean(dim=(2, 3), keepdim=True))  # a gate
            return self.b(torch.cat([y, y], dim=1)[:, :4])

    a = _analyze(Gate(), size=8)
    assert sorted(len(c) for c in a.roots) == [1, 1]
    kept = {name for name, _ in a.kept}
    assert {"mul", "cat"} <= kept


def test_shared_module_is_not_a_unit() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.other = nn.Conv2d(3, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.other(self.conv(torch.relu(self.conv(x))))

    a = _analyze(Twice(), size=8)
    layers = {u.layer for u in _all_units(a)}
    assert layers == {"other"}
    assert any("several places" in why for _, why in a.kept)


def test_analysis_is_deterministic_and_serialisable() -> None:
    model = torchvision.models.mobilenet_v2(weights=None)
    a1, a2 = _analyze(model), _analyze(model)
    assert a1.to_dict() == a2.to_dict()
    import json

    json.dumps(a1.to_dict())
