"""``methods=(..., "drop")``: a residual's branch dropped, the block reduced to its shortcut.

The reference is independent of the graph surgery: the original torchvision model with each
dropped block replaced by a module that computes ``relu(shortcut(x))`` in eager PyTorch.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

import fxcompress
from fxcompress import InfeasibleBudget, make_plan
from fxcompress.depth.analysis import Residual
from fxcompress.depth.relax import apply_segments
from fxcompress.testing import assert_equivalent


class Shortcut(nn.Module):
    """What a torchvision block computes once its branch is gone."""

    def __init__(self, downsample: nn.Module | None) -> None:
        super().__init__()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x if self.downsample is None else self.downsample(x))


def _model(name: str = "resnet18") -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10)
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def _residuals(gm, analysis):
    """(chain, index, block path) of every residual, the block found from its first conv."""
    nodes = {n.name: n for n in gm.graph.nodes}
    out = []
    for chain in analysis.chains:
        for i, item in enumerate(chain.items):
            if isinstance(item, Residual):
                target = str(nodes[item.branch_units[0].layer].target)
                out.append((chain.name, i, target.rsplit(".", 1)[0]))
    return out


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
@pytest.mark.parametrize("which", ["all", "even", "projection"])
def test_dropped_branches_equal_blocks_replaced_by_their_shortcut(name, which):
    model = _model(name)
    x = torch.randn(2, 3, 32, 32)
    gm = fxcompress.canonicalize(fxcompress.capture(model, x))
    analysis = fxcompress.analyze(gm)
    residuals = _residuals(gm, analysis)
    blocks = [n for n, m in model.named_modules() if isinstance(m, (BasicBlock, Bottleneck))]
    assert sorted(b for _, _, b in residuals) == sorted(blocks)  # every block is a residual
    if which == "even":
        residuals = residuals[::2]
    elif which == "projection":
        residuals = [r for r in residuals if model.get_submodule(r[2]).downsample is not None]
        assert residuals
    relaxed = apply_segments(gm, analysis, [], drops=[(c, i) for c, i, _ in residuals])

    reference = copy.deepcopy(model)
    for _, _, path in residuals:
        parent, _, leaf = path.rpartition(".")
        block = reference.get_submodule(path)
        setattr(reference.get_submodule(parent), leaf, Shortcut(block.downsample))
    assert_equivalent(relaxed, reference, x, rtol=1e-5)
    assert_equivalent(fxcompress.merge(relaxed), reference, x, rtol=1e-4)
    # the dropped branches' layers are gone from the module, not just bypassed
    assert sum(p.numel() for p in relaxed.parameters()) == sum(
        p.numel() for p in reference.parameters()
    )


def _minimum(model, x, methods) -> float:
    with pytest.raises(InfeasibleBudget) as info:
        make_plan(model, 0.01, x, latency="flops", methods=methods, progress=False)
    return info.value.minimum


def test_drop_widens_the_search_space_and_plans_stay_exact():
    model = _model("resnet18")
    x = torch.randn(1, 3, 32, 32)
    low_merge = _minimum(model, x, ("merge", "prune"))
    low_drop = _minimum(model, x, ("merge", "prune", "drop"))
    assert low_drop < low_merge  # dropping a block removes latency no merge can
    budget = (low_drop + low_merge) / 2  # reachable only by dropping something
    plan = make_plan(model, budget, x, latency="flops", methods=("merge", "prune", "drop"),
                     progress=False)
    assert plan.predicted_ms <= budget * plan.original_ms * (1 + 1e-9)
    assert any(key == "drop" for _, _, _, key, _ in plan.segments)
    relaxed = fxcompress.relax(model, plan, x)
    merged = fxcompress.merge(relaxed)
    assert_equivalent(merged, relaxed, x)
    out = fxcompress.optimize(model, budget, example_inputs=x, latency="flops",
                              methods=("merge", "prune", "drop"), progress=False)
    assert_equivalent(out, relaxed, x)
    assert any(d["key"] == "drop" for d in out.meta["fxcompress"].decisions)
    # a plan with drops survives its JSON round trip
    again = fxcompress.relax(model, fxcompress.Plan.from_json(plan.to_json()), x)
    assert_equivalent(again, relaxed, x)


def test_drop_is_off_by_default_and_named_in_errors():
    model = _model("resnet18")
    x = torch.randn(1, 3, 32, 32)
    plan = make_plan(model, 0.5, x, latency="flops", progress=False)
    assert all(key != "drop" for _, _, _, key, _ in plan.segments)
    with pytest.raises(fxcompress.InvalidArgument, match="drop"):
        make_plan(model, 0.5, x, latency="flops", methods=("merge", "skip"), progress=False)
