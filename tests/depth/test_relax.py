"""``relax`` then ``merge`` is exact: the merged model computes what the relaxed one computes.

The relaxed model (activations removed, convs pruned, padding relocated) is the reference; it is
run layer by layer by torch.fx, while the merged model runs single composed convolutions.
"""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fxcompress
from fxcompress.depth.analysis import Residual, units_of
from fxcompress.depth.options import enumerate_options
from fxcompress.depth.relax import apply_segments


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _convs(gm: torch.fx.GraphModule) -> int:
    return sum(
        1
        for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Conv2d)
    )


def _prepare(model: nn.Module, x: torch.Tensor):
    gm = fxcompress.canonicalize(fxcompress.capture(model, x))
    return gm, fxcompress.analyze(gm)


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(
                torch.randn(m.num_features, generator=g, dtype=m.running_mean.dtype) * 0.1
            )
            m.running_var.copy_(
                torch.rand(m.num_features, generator=g, dtype=m.running_var.dtype) + 0.5
            )
            m.weight.data.copy_(torch.rand(m.num_features, generator=g, dtype=m.weight.dtype) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g, dtype=m.bias.dtype) * 0.1)
    return model


@pytest.mark.parametrize(
    ("name", "size", "samples"),
    [
        ("resnet18", 32, 12),
        ("mobilenet_v2", 32, 12),
        pytest.param("resnet50", 32, 8, marks=pytest.mark.slow),
    ],
)
def test_options_merge_exactly_on_torchvision(name: str, size: int, samples: int) -> None:
    torch.manual_seed(0)
    model = _randomise_bn(torchvision.models.get_model(name, weights=None)).double().eval()
    x = torch.randn(1, 3, size, size, dtype=torch.float64)
    gm, analysis = _prepare(model, x)
    base_convs = _convs(fxcompress.merge(gm))
    options = [o for o in enumerate_options(analysis, prune=True) if o.needs_score]
    assert options
    step = max(1, len(options) // samples)
    for opt in options[::step]:  # a deterministic spread of options keeps the test fast
        seg = opt.segment
        relaxed = apply_segments(gm, analysis, [(seg.chain, seg.start, seg.stop, seg.pruned)])
        merged = fxcompress.merge(relaxed)
        with torch.no_grad():
            err = _rel_err(merged(x), relaxed(x))
        assert err <= 1e-9, (opt, err)
        # independently: the segment's convs (branches and shortcuts, minus pruned) became one
        items = analysis.chain(opt.segment.chain).items[opt.segment.start : opt.segment.stop]
        n_kept = sum(1 for it in items for u in units_of(it) if u.layer not in opt.segment.pruned)
        # (exact skip folds that the relaxation newly enables may merge even more)
        assert _convs(merged) <= base_convs - len(opt.segment.pruned) - (n_kept - 1), opt


def test_relaxing_nothing_is_the_identity() -> None:
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 32, 32)
    gm, analysis = _prepare(model, x)
    relaxed = apply_segments(gm, analysis, [])
    with torch.no_grad():
        assert torch.equal(relaxed(x), model(x))


def test_planned_model_relax_then_merge_exact() -> None:
    torch.manual_seed(0)
    model = _randomise_bn(torchvision.models.mobilenet_v2(weights=None)).eval()
    x = torch.randn(1, 3, 64, 64)
    plan = fxcompress.plan(model, 0.6, x, latency="flops")
    assert any(k != "keep" for _, _, _, k, _ in plan.segments)
    relaxed = fxcompress.relax(model, plan)
    merged = fxcompress.merge(relaxed)
    with torch.no_grad():
        assert _rel_err(merged(x), relaxed(x)) <= 1e-4
    # the plan is JSON and replays to the same relaxed model
    again = fxcompress.relax(model, fxcompress.Plan.from_json(plan.to_json()))
    with torch.no_grad():
        assert torch.equal(again(x), relaxed(x))


# --------------------------------------------------------------------------- random models


class _Block(nn.Module):
    def __init__(self, c: int, k: int, groups: int, project: bool, stride: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(c, c * 2, 1, bias=False)
        self.bn_a = nn.BatchNorm2d(c * 2)
        self.b = nn.Conv2d(c * 2, c * 2, k, stride=stride, padding=k // 2, groups=groups)
        self.bn_b = nn.BatchNorm2d(c * 2)
        self.c = nn.Conv2d(c * 2, c, 1)
        self.proj = nn.Conv2d(c, c, 1, stride=stride) if project else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c(torch.relu(self.bn_b(self.b(torch.relu(self.bn_a(self.a(x)))))))
        return y + (self.proj(x) if self.proj is not None else x)


@st.composite
def residual_nets(draw: st.DrawFn) -> tuple[nn.Module, torch.Tensor]:
    c = draw(st.sampled_from([2, 4]))
    layers: list[nn.Module] = [nn.Conv2d(3, c, draw(st.sampled_from([1, 3])), padding=1), nn.ReLU()]
    for _ in range(draw(st.integers(1, 3))):
        k = draw(st.sampled_from([1, 3, 5]))
        groups = draw(st.sampled_from([1, 2 * c]))
        stride = draw(st.sampled_from([1, 1, 2]))
        project = stride > 1 or draw(st.booleans())
        layers += [_Block(c, k, groups, project, stride), nn.ReLU()]
        if draw(st.booleans()):
            k2 = draw(st.sampled_from([1, 3]))
            layers += [
                nn.Conv2d(c, c, k2, padding=draw(st.integers(0, k2 // 2 + 1))),
                nn.BatchNorm2d(c),
                nn.ReLU6(),
            ]
    model = _randomise_bn(nn.Sequential(*layers), seed=draw(st.integers(0, 9))).double().eval()
    size = draw(st.integers(9, 16))
    return model, torch.randn(1, 3, size, size, dtype=torch.float64)


@given(residual_nets(), st.data())
def test_random_segments_merge_exactly(
    net: tuple[nn.Module, torch.Tensor], data: st.DataObject
) -> None:
    model, x = net
    gm, analysis = _prepare(model, x)
    options = [o for o in enumerate_options(analysis, prune=True) if o.needs_score]
    if not options:
        return
    # a random set of segments that a plan could hold together: no overlap, and a residual's
    # branch is only relaxed on its own when the residual itself is not merged whole
    parent = {c.name: c.parent for c in analysis.chains}
    chosen, used, merged_res, relaxed_branches = [], set(), set(), set()
    for opt in data.draw(st.permutations(options)):
        span = {(opt.segment.chain, i) for i in range(opt.segment.start, opt.segment.stop)}
        items = analysis.chain(opt.segment.chain).items[opt.segment.start : opt.segment.stop]
        inner = {it.add for it in items if isinstance(it, Residual)}
        if span & used or inner & relaxed_branches or parent[opt.segment.chain] in merged_res:
            continue
        chosen.append((opt.segment.chain, opt.segment.start, opt.segment.stop, opt.segment.pruned))
        used |= span
        merged_res |= inner
        if parent[opt.segment.chain] is not None:
            relaxed_branches.add(parent[opt.segment.chain])
        if len(chosen) >= 3:
            break
    relaxed = apply_segments(gm, analysis, chosen)
    merged = fxcompress.merge(relaxed)
    with torch.no_grad():
        ref = relaxed(x)
        assert math.isfinite(float(ref.abs().max()))
        assert _rel_err(merged(x), ref) <= 1e-9


class _PrunedBeforeResidual(nn.Module):
    """Found by the graph fuzzer: the layer pruned first feeds a residual's fork, and a later
    uncentred padding is relocated across the skip (the shortcut was mis-aligned)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(1, 1, 1, stride=(1, 3), bias=False)
        self.weight0 = nn.Parameter(torch.randn(1, 1, 3, 3))
        self.conv1 = nn.Conv2d(1, 1, 1)
        self.conv2 = nn.Conv2d(1, 1, 1)
        self.conv3 = nn.Conv2d(1, 1, (1, 2), padding=(0, 1))

    def forward(self, v0: torch.Tensor) -> torch.Tensor:
        v2 = torch.nn.functional.conv2d(self.conv0(v0), self.weight0, None, 1, 1)
        return self.conv3(self.conv2(self.conv1(v2) + v2))


def test_pruned_layer_feeding_a_residual_fork_keeps_the_skip_aligned() -> None:
    from fxcompress.depth.options import enumerate_options
    from fxcompress.depth.relax import apply_segments

    torch.manual_seed(0)
    model = _PrunedBeforeResidual().double().eval()
    x = torch.randn(1, 1, 5, 5, dtype=torch.float64)
    gm = fxcompress.canonicalize(fxcompress.capture(model, x))
    analysis = fxcompress.analyze(gm)
    options = [
        o
        for o in enumerate_options(analysis, prune=True)
        if o.segment.pruned and o.segment.stop > 2
    ]
    assert options, "the case needs a pruned layer before the residual"
    for o in options:
        s = o.segment
        relaxed = apply_segments(gm, analysis, [(s.chain, s.start, s.stop, s.pruned)])
        out = relaxed(x)  # used to fail: the skip was not padded like the branch
        assert out.shape == model(x).shape
        torch.testing.assert_close(fxcompress.merge(relaxed)(x), out, rtol=1e-9, atol=1e-12)
