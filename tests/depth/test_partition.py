"""Tests of the cheapest partition of linear runs (fxcompress.depth.partition) and its use by merge.

Expectations are derived here, independently of fxcompress: the DP is checked against brute force
over all ``2**(n-1)`` partitions, and the cost of a merged part of a conv chain is computed from
the definitions (tap offsets of the composition, boolean channel connectivity) at the shapes the
original model produces. Every merged model is compared with the original model run eagerly.
"""

from __future__ import annotations

import itertools
import math
from functools import reduce

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from torch import nn

import fxcompress
from fxcompress import capture, merge
from fxcompress.depth.partition import (
    cheapest_partition,
    composed_geometry,
    latency_cost,
    layer_macs,
    layer_spec,
)
from fxcompress.errors import InvalidArgument
from fxcompress.latency import LatencyTable, OpSpec
from fxcompress.maths import ConvParams, LinearParams, compose, compose_linear
from fxcompress.testing import assert_equivalent, conv_chains, linear_chains

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
F64 = torch.float64


def count(module: nn.Module, types) -> int:
    return sum(isinstance(m, types) for m in module.modules())


# ------------------------------------------------------------------------------------------
# The DP against brute force
# ------------------------------------------------------------------------------------------


def all_partitions(n: int):
    """Every split of range(n) into contiguous half-open parts (2**(n-1) of them)."""
    if n == 0:
        yield ()
        return
    for cuts in itertools.product((False, True), repeat=n - 1):
        bounds = [0, *(k for k, cut in enumerate(cuts, start=1) if cut), n]
        yield tuple(itertools.pairwise(bounds))


def key(parts, cost, joined, fewest_parts):
    cuts = sum(1 for start, _ in parts if start in joined)
    total = sum(cost(*p) for p in parts)
    return (cuts, len(parts), total) if fewest_parts else (cuts, total, len(parts))


@st.composite
def part_costs(draw):
    """n, an integer cost per part (math.inf: cannot be merged; singletons finite), joined."""
    n = draw(st.integers(0, 7))
    table = {}
    for start in range(n):
        for stop in range(start + 1, n + 1):
            finite = st.integers(0, 60)
            value = draw(finite if stop - start == 1 else st.one_of(finite, st.just(math.inf)))
            table[start, stop] = value
    joined = draw(st.sets(st.integers(1, n - 1))) if n > 1 else set()
    return n, table, joined


@given(part_costs(), st.booleans())
@example((3, {(0, 1): 4, (1, 2): 4, (2, 3): 4, (0, 2): 9, (1, 3): 9, (0, 3): 6}, set()), False)
@example((3, {(0, 1): 1, (1, 2): 1, (2, 3): 1, (0, 2): 2, (1, 3): 2, (0, 3): 3}, set()), False)
def test_dp_finds_the_cheapest_of_all_partitions(case, fewest_parts):
    """The first example is an inverted residual: each pair costlier, the whole run cheaper;
    the second a tie everywhere (fewest parts wins)."""
    n, table, joined = case

    def cost(start, stop):
        return table[start, stop]

    parts = cheapest_partition(n, cost, joined=joined, fewest_parts=fewest_parts)
    assert parts in set(all_partitions(n))  # contiguous, in order, covering 0..n
    assert all(cost(*p) < math.inf for p in parts)
    feasible = [p for p in all_partitions(n) if all(cost(*q) < math.inf for q in p)]
    best = min(key(p, cost, joined, fewest_parts) for p in feasible)
    assert key(parts, cost, joined, fewest_parts) == best
    if not joined and not fewest_parts:
        # never costlier than keeping every layer apart, and the cheapest of all partitions
        assert sum(cost(*p) for p in parts) <= sum(cost(k, k + 1) for k in range(n))
        assert sum(cost(*p) for p in parts) == min(sum(cost(*q) for q in p) for p in feasible)


def test_dp_calls_each_part_once_and_handles_an_empty_run():
    calls = []

    def cost(start, stop):
        calls.append((start, stop))
        return stop - start

    assert cheapest_partition(5, cost) == ((0, 5),)  # a tie in cost: fewest parts
    assert len(calls) == len(set(calls)) == 15
    assert cheapest_partition(0, cost) == ()


@pytest.mark.parametrize(
    ("n", "cost", "joined", "match"),
    [
        (-1, lambda i, j: 1, (), "n must be an int >= 0"),
        (2, lambda i, j: 1, (2,), r"joined must hold boundaries 1..1.*\[2\]"),
        (2, lambda i, j: 1, (0,), "joined must hold"),
        (2, lambda i, j: math.nan, (), r"cost\(0, 1\) returned nan"),
        (2, lambda i, j: "1", (), r"returned '1'; a part's cost must be a real number"),
        (2, lambda i, j: math.inf, (), "for a single layer"),
    ],
)
def test_dp_refuses_bad_arguments(n, cost, joined, match):
    with pytest.raises(InvalidArgument, match=match):
        cheapest_partition(n, cost, joined=joined)


# ------------------------------------------------------------------------------------------
# Geometry of a composition, and costs of layers
# ------------------------------------------------------------------------------------------


@st.composite
def conv_pairs(draw):
    """Two convs ``first: C0 -> C1`` and ``second: C1 -> C2`` with any groups and geometry."""
    ndim = draw(st.integers(1, 2))
    g1 = draw(st.sampled_from((1, 2, 3)))
    c0, c1 = g1 * draw(st.integers(1, 3)), g1 * draw(st.integers(1, 3))
    g2 = draw(st.sampled_from([g for g in range(1, c1 + 1) if c1 % g == 0]))
    c2 = g2 * draw(st.integers(1, 3))

    def conv(c_in, c_out, groups):
        kernel = draw(st.tuples(*[st.integers(1, 4)] * ndim))
        weight = torch.randn(c_out, c_in // groups, *kernel, dtype=F64)
        return ConvParams(
            weight,
            torch.randn(c_out, dtype=F64) if draw(st.booleans()) else None,
            stride=draw(st.tuples(*[st.integers(1, 3)] * ndim)),
            padding=draw(st.tuples(*[st.integers(-1, 3)] * ndim)),
            dilation=draw(st.tuples(*[st.integers(1, 3)] * ndim)),
            groups=groups,
        )

    return conv(c0, c1, g1), conv(c1, c2, g2)


def geometry(layer):
    g = (tuple(layer.weight.shape), layer.weight.dtype, layer.bias is not None)
    if isinstance(layer, ConvParams):
        g += (layer.stride, layer.padding, layer.dilation, layer.groups)
    return g


@given(conv_pairs())
@example(  # 1×1 expand without bias, then a padded depthwise 3×3: the padding moves onto x
    (
        ConvParams(torch.ones(4, 2, 1, 1, dtype=F64), None, 1, 0, 1),
        ConvParams(torch.ones(4, 1, 3, 3, dtype=F64), None, 1, 1, 1, groups=4),
    )
)
def test_composed_geometry_is_that_of_compose(pair):
    first, second = pair
    try:
        expected = compose(first, second)
    except ValueError:
        expected = None  # the intermediate map's zero padding is not a conv of the input
    if expected is None:
        with pytest.raises(InvalidArgument, match="padding"):
            composed_geometry(first, second)
        return
    got = composed_geometry(first.to(device="meta"), second.to(device="meta"))
    assert got.weight.device.type == "meta"
    assert geometry(got) == geometry(expected)
    assert geometry(composed_geometry(first, second)) == geometry(expected)


@given(st.integers(1, 5), st.integers(1, 5), st.integers(1, 5), st.booleans(), st.booleans())
def test_composed_geometry_of_linear_layers(d_in, hidden, d_out, bias1, bias2):
    first = LinearParams(torch.randn(hidden, d_in), torch.randn(hidden) if bias1 else None)
    second = LinearParams(torch.randn(d_out, hidden), torch.randn(d_out) if bias2 else None)
    expected = geometry(compose_linear(first, second))
    assert geometry(composed_geometry(first, second)) == expected


def test_composed_geometry_refuses_what_compose_refuses():
    conv = ConvParams(torch.ones(4, 2, 1), None, 1, 0, 1)
    with pytest.raises(InvalidArgument, match=r"second\.in_channels=3"):
        composed_geometry(conv, ConvParams(torch.ones(4, 3, 1), None, 1, 0, 1))
    with pytest.raises(InvalidArgument, match="1-d conv with a 2-d conv"):
        composed_geometry(conv, ConvParams(torch.ones(4, 4, 1, 1), None, 1, 0, 1))
    with pytest.raises(InvalidArgument, match="cannot compose ConvParams with LinearParams"):
        composed_geometry(conv, LinearParams(torch.ones(4, 4), None))
    with pytest.raises(InvalidArgument, match=r"second\.in_features=3"):
        composed_geometry(
            LinearParams(torch.ones(4, 4), None), LinearParams(torch.ones(4, 3), None)
        )


def test_latency_cost_prices_the_layer_as_the_table_does():
    table = LatencyTable(mode="flops")
    price = latency_cost(table)
    conv = ConvParams(torch.ones(6, 2, 3, 1), torch.ones(6), (2, 1), (-1, 2), (1, 2), groups=2)
    spec = OpSpec(
        "conv",
        (1, 4, 9, 7),
        out_channels=6,
        kernel_size=(3, 1),
        stride=(2, 1),
        padding=(-1, 2),
        dilation=(1, 2),
        groups=2,
    )
    assert price(conv.to(device="meta"), (1, 4, 9, 7), spec.output_shape()) == table(spec)
    assert layer_spec(conv, (4, 9, 7)) == spec  # unbatched: a batch of one
    assert layer_macs(conv, (1, 4, 9, 7), spec.output_shape()) == spec.macs()
    linear = LinearParams(torch.ones(5, 3, dtype=F64), None)
    spec = OpSpec("linear", (2, 7, 3), dtype="float64", out_channels=5, bias=False)
    assert price(linear, (2, 7, 3), (2, 7, 5)) == table(spec)
    assert layer_macs(linear, (2, 7, 3), (2, 7, 5)) == spec.macs() == 2 * 7 * 3 * 5
    with pytest.raises(InvalidArgument, match="table must be a LatencyTable"):
        latency_cost(lambda op: 1.0)


# ------------------------------------------------------------------------------------------
# merge: the inverted residual without activations
# ------------------------------------------------------------------------------------------


def random_bn(channels: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels, eps=1e-3)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    return bn


class InvertedResidual(nn.Module):
    """torchvision's MobileNetV2 block without its activations: 1×1 expand -> BN -> depthwise
    3×3 -> BN -> 1×1 project -> BN. The depthwise conv does not pad: the padding is either
    left out or relocated onto the expand conv (the relaxed form, which keeps the shape, so
    that the residual add of a stride-1 block fits)."""

    def __init__(self, c_in: int, c_out: int, expand: int, stride: int = 1, relaxed=False):
        super().__init__()
        hidden = c_in * expand
        self.conv = nn.Sequential(
            nn.Conv2d(c_in, hidden, 1, padding=1 if relaxed else 0, bias=False),
            random_bn(hidden),
            nn.Conv2d(hidden, hidden, 3, stride, groups=hidden, bias=False),
            random_bn(hidden),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            random_bn(c_out),
        )
        self.residual = relaxed and stride == 1 and c_in == c_out

    def forward(self, x):
        y = self.conv(x)
        return x + y if self.residual else y


def macs_of(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of the convs of ``model`` on ``x``, counted with forward hooks."""
    total = 0

    def hook(conv, _, out):
        nonlocal total
        total += out.numel() * conv.in_channels // conv.groups * math.prod(conv.kernel_size)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, CONVS)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return total


@pytest.mark.parametrize(
    ("c_in", "c_out", "expand", "stride", "relaxed"),
    [(8, 8, 6, 1, False), (8, 16, 6, 2, False), (16, 24, 4, 1, False), (8, 8, 6, 1, True)],
)
def test_inverted_residual_without_activations_becomes_one_conv(
    c_in, c_out, expand, stride, relaxed
):
    """Each pair merged is a dense 3×3 on expanded channels (costlier than the pair), so pairwise
    merging keeps three convs; the whole run is one dense 3×3 on the narrow channels, fewer
    MACs than the three. With the residual (relaxed form) the skip folds into it as well."""
    model = InvertedResidual(c_in, c_out, expand, stride, relaxed).double().eval()
    x = torch.randn(2, c_in, 12, 12, dtype=F64)
    out = merge(capture(model, x))
    assert_equivalent(out, model, x, rtol=1e-9)
    assert count(out, CONVS) == 1
    (conv,) = (m for m in out.modules() if isinstance(m, CONVS))
    assert (conv.kernel_size, conv.groups, conv.stride) == ((3, 3), 1, (stride, stride))
    assert macs_of(out, x) < macs_of(model, x)
    merges = [e for e in out.meta["fxcompress.events"] if e["kind"] == "merge"]
    assert [e["layers"] for e in merges] == [["conv.0", "conv.2", "conv.4"]]


def test_optimize_at_budget_one_merges_the_inverted_residual():
    model = InvertedResidual(8, 16, 6, 2).double().eval()
    x = torch.randn(1, 8, 16, 16, dtype=F64)
    out = fxcompress.optimize(model, 1.0, example_inputs=x, latency="flops")
    assert_equivalent(out, model, x, rtol=1e-9)
    assert count(out, CONVS) == 1
    report = out.meta["fxcompress"]
    assert report.macs_after == macs_of(out, x) < macs_of(model, x) == report.macs_before


def test_in_place_write_between_the_layers_of_a_merged_run():
    """The merged conv reads the run's input where the first layer did, before the write."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = InvertedResidual(4, 4, 3)

        def forward(self, x):
            a = x * 1.0
            y = self.block.conv[1](self.block.conv[0](a))
            a.mul_(3.0)
            return self.block.conv[5](self.block.conv[4](self.block.conv[3](
                self.block.conv[2](y)))), a

    model = Net().double().eval()
    x = torch.randn(1, 4, 9, 9, dtype=F64)
    out = merge(capture(model, x))
    assert_equivalent(out, model, x, rtol=1e-9)
    assert count(out, CONVS) == 1


def test_without_recorded_shapes_the_inverted_residual_still_merges():
    model = InvertedResidual(8, 8, 6).eval()
    out = merge(torch.fx.symbolic_trace(model))
    assert count(out, CONVS) == 1
    assert_equivalent(out, model, torch.randn(1, 8, 10, 10))


# ------------------------------------------------------------------------------------------
# merge: cost callables, forced segments, fewest parts
# ------------------------------------------------------------------------------------------


def dense_then_depthwise() -> nn.Module:
    """Merged, a dense 3×3: more MACs than the pair (see test_merge)."""
    return nn.Sequential(nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, groups=8)).double().eval()


def test_a_cost_callable_decides_the_partition():
    model = dense_then_depthwise()
    x = torch.randn(1, 8, 10, 10, dtype=F64)
    gm = capture(model, x)
    assert count(merge(gm), CONVS) == 2  # by MACs
    seen = []

    def per_layer(layer, input_shape, output_shape):
        seen.append((layer.weight.device.type, tuple(input_shape), tuple(output_shape)))
        return 1.0  # every layer costs the same: fewer layers are cheaper

    out = merge(gm, cost=per_layer)
    assert count(out, CONVS) == 1
    assert_equivalent(out, model, x, rtol=1e-9)
    # priced at the traced shapes, on geometry only (meta tensors)
    assert ("meta", (1, 8, 10, 10), (1, 8, 8, 8)) in seen
    assert ("meta", (1, 8, 10, 10), (1, 8, 10, 10)) in seen


def test_a_cost_can_forbid_a_layer():
    model = InvertedResidual(8, 8, 6).double().eval()
    x = torch.randn(1, 8, 10, 10, dtype=F64)

    def no_dense_kxk(layer, input_shape, output_shape):
        dense_kxk = layer.groups == 1 and math.prod(layer.kernel_size) > 1
        return math.inf if dense_kxk else layer_macs(layer, input_shape, output_shape)

    out = merge(capture(model, x), cost=no_dense_kxk)
    assert count(out, CONVS) == 3
    assert_equivalent(out, model, x, rtol=1e-9)


def test_merge_with_the_latency_table_of_optimize():
    model = InvertedResidual(8, 8, 6).double().eval()
    x = torch.randn(1, 8, 10, 10, dtype=F64)
    out = merge(capture(model, x), cost=latency_cost(LatencyTable(mode="flops")))
    assert count(out, CONVS) == 1
    assert_equivalent(out, model, x, rtol=1e-9)


@pytest.mark.parametrize(
    ("cost", "match"),
    [
        (lambda layer, i, o: math.nan, r"cost returned nan for ConvParams\(.*conv.0"),
        (lambda layer, i, o: math.inf, "a layer kept as it is needs a finite cost"),
        (lambda layer, i, o: None, "it must return a real number"),
    ],
)
def test_a_bad_cost_is_refused_naming_the_value_and_the_layers(cost, match):
    gm = capture(InvertedResidual(4, 4, 2).eval(), torch.randn(1, 4, 6, 6))
    with pytest.raises(InvalidArgument, match=match):
        merge(gm, cost=cost)
    with pytest.raises(InvalidArgument, match="cost must be a callable"):
        merge(gm, cost=LatencyTable(mode="flops").entries)


def test_a_planner_segment_is_merged_whatever_it_costs():
    model = dense_then_depthwise()
    x = torch.randn(1, 8, 10, 10, dtype=F64)
    gm = capture(model, x)
    for node in gm.graph.nodes:
        if node.op == "call_module":
            node.meta["fxcompress.segment"] = "chain0:0-2"
    out = merge(gm)
    assert count(out, CONVS) == 1
    assert_equivalent(out, model, x, rtol=1e-9)


def test_without_only_if_cheaper_a_run_becomes_as_few_layers_as_possible():
    layers = [nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 8, 3, groups=8)]
    layers += [nn.Conv2d(8, 4, 3, padding=1), nn.Conv2d(4, 4, 1)]  # padded: not composable
    model = nn.Sequential(*layers).double().eval()
    x = torch.randn(1, 8, 12, 12, dtype=F64)
    out = merge(capture(model, x), only_if_cheaper=False)
    assert count(out, CONVS) == 2  # conv 0-2 and conv 3-4
    assert_equivalent(out, model, x, rtol=1e-9)


# ------------------------------------------------------------------------------------------
# merge on random linear runs: the cheapest partition, exactly
# ------------------------------------------------------------------------------------------


def connectivity(conv: nn.Module) -> torch.Tensor:
    """Boolean (C_out, C_in): which input channels each output channel reads."""
    outs = torch.arange(conv.out_channels) // (conv.out_channels // conv.groups)
    ins = torch.arange(conv.in_channels) // (conv.in_channels // conv.groups)
    return outs[:, None] == ins[None, :]


def structural_groups(mask: torch.Tensor) -> int:
    """Largest g whose block-diagonal pattern contains ``mask``."""
    c_out, c_in = mask.shape
    common = math.gcd(c_out, c_in)
    for g in sorted((g for g in range(1, common + 1) if common % g == 0), reverse=True):
        outs = torch.arange(c_out) // (c_out // g)
        ins = torch.arange(c_in) // (c_in // g)
        if bool((mask <= (outs[:, None] == ins[None, :])).all()):
            return g
    raise AssertionError("g = 1 always fits")


def merged_macs(convs: list[nn.Module], out_shape: tuple[int, ...]) -> int:
    """MACs of convs[0..] composed into one conv: per axis the taps sit at offsets
    sum_i stride_before_i * dilation_i * t_i, on the grid of their gcd; channels connect through
    the product of the connectivity matrices."""
    mask = connectivity(convs[0])
    taps = 1
    for axis in range(len(convs[0].kernel_size)):
        offsets, step = {0}, 1
        for conv in convs:
            k, d = conv.kernel_size[axis], conv.dilation[axis]
            offsets = {o + step * d * t for o in offsets for t in range(k)}
            step *= conv.stride[axis]
        grid = reduce(math.gcd, offsets, 0) or 1
        taps *= max(offsets) // grid + 1
    for conv in convs[1:]:
        mask = (connectivity(conv).double() @ mask.double()) > 0
    return math.prod(out_shape) * convs[0].in_channels // structural_groups(mask) * taps


def conv_outputs(model: nn.Sequential, x: torch.Tensor) -> list[tuple[int, ...]]:
    shapes = []
    with torch.no_grad():
        for layer in model:
            x = layer(x)
            if isinstance(layer, CONVS):
                shapes.append(tuple(x.shape))
    return shapes


@given(
    conv_chains(
        min_convs=2, max_convs=5, activations=False, padding="first", dtype=F64, max_channels=6
    )
)
@example(  # an inverted residual without BatchNorms: only the whole run is cheaper
    (
        nn.Sequential(
            nn.Conv2d(4, 24, 1), nn.Conv2d(24, 24, 3, groups=24), nn.Conv2d(24, 4, 1)
        ).double().eval(),
        torch.randn(1, 4, 8, 8, dtype=F64),
    )
)
def test_random_conv_runs_get_the_cheapest_partition(case):
    """Only the first conv pads, so every part composes; the merged model costs the least of all
    2**(n-1) partitions (fewest convs among the cheapest) and is exact."""
    model, x = case
    convs = [m for m in model if isinstance(m, CONVS)]
    shapes = conv_outputs(model, x)
    costs = {
        (i, j): merged_macs(convs[i:j], shapes[j - 1])
        for i in range(len(convs))
        for j in range(i + 1, len(convs) + 1)
    }
    cheapest = min(
        (sum(costs[p] for p in parts), len(parts)) for parts in all_partitions(len(convs))
    )
    out = merge(capture(model, x))
    assert_equivalent(out, model, x, rtol=1e-9)
    assert (macs_of(out, x), count(out, CONVS)) == cheapest
    assert macs_of(out, x) <= macs_of(model, x)


@given(linear_chains(min_layers=2, max_layers=5, activations=False, dtype=F64))
@example(  # 13 -> 7 -> 16 -> 1: pairwise, only (1, 3) merges (98 MACs); all three: 13 MACs
    (
        nn.Sequential(nn.Linear(13, 7), nn.Linear(7, 16), nn.Linear(16, 1)).double().eval(),
        torch.randn(1, 13, dtype=F64),
    )
)
@example(  # 2 -> 1 -> 2 -> 3: the tie (0, 2) merged first costs 6; (0, 1) + (1, 3) costs 5
    (
        nn.Sequential(nn.Linear(2, 1), nn.Linear(1, 2), nn.Linear(2, 3)).double().eval(),
        torch.randn(1, 2, dtype=F64),
    )
)
def test_random_linear_runs_get_the_cheapest_partition(case):
    model, x = case
    linears = [m for m in model if isinstance(m, nn.Linear)]
    rows = x[..., 0].numel()
    costs = {
        (i, j): rows * linears[i].in_features * linears[j - 1].out_features
        for i in range(len(linears))
        for j in range(i + 1, len(linears) + 1)
    }
    cheapest = min(
        (sum(costs[p] for p in parts), len(parts)) for parts in all_partitions(len(linears))
    )
    out = merge(capture(model, x))
    assert_equivalent(out, model, x, rtol=1e-9)
    after = [m for m in out.modules() if isinstance(m, nn.Linear)]
    assert (sum(rows * m.in_features * m.out_features for m in after), len(after)) == cheapest
