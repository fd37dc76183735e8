"""Tests of fxcompress.merge at graph level: ``merge(capture(model, x))`` against ``model(x)``.

The reference is always the original model run eagerly. Where the tests assert how many convs
remain, the expectation is derived here, independently of fxcompress: tap offsets and channel
connectivity of a composed conv are computed from their definitions (sets of offsets, boolean
connectivity matrices), and costs are multiply-accumulates at the shapes the original model
produces.
"""

from __future__ import annotations

import copy
import math
import warnings
from functools import reduce

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from fxcompress import capture, fold_batchnorm, merge
from fxcompress.graph.modules import Pad
from fxcompress.testing import assert_equivalent, conv_chains, linear_chains, models

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
DTYPES = st.sampled_from((torch.float64, torch.float32))


def count(module: nn.Module, types) -> int:
    """Number of *called* modules of ``types`` (a GraphModule's unused children are dropped)."""
    return sum(isinstance(m, types) for m in module.modules())


def assert_merged_exact(model: nn.Module, x) -> torch.fx.GraphModule:
    out = merge(capture(model, x))
    assert_equivalent(out, model, x)  # float64 1e-9, float32 1e-4 relative to max |output|
    return out


def output_shapes(model: nn.Sequential, x: torch.Tensor) -> list[tuple[int, ...]]:
    shapes = []
    with torch.no_grad():
        for layer in model:
            x = layer(x)
            shapes.append(tuple(x.shape))
    return shapes


# ------------------------------------------------------------------------------------------
# Independent cost model of a composed conv
# ------------------------------------------------------------------------------------------


def connectivity(conv: nn.Module) -> torch.Tensor:
    """Boolean (C_out, C_in): which input channels each output channel reads."""
    g = conv.groups
    outs = torch.arange(conv.out_channels) // (conv.out_channels // g)
    ins = torch.arange(conv.in_channels) // (conv.in_channels // g)
    return outs[:, None] == ins[None, :]


def structural_groups(mask: torch.Tensor) -> int:
    """Largest g whose block-diagonal pattern contains ``mask``."""
    c_out, c_in = mask.shape
    best = 1
    for g in range(1, math.gcd(c_out, c_in) + 1):
        if math.gcd(c_out, c_in) % g:
            continue
        outs = torch.arange(c_out) // (c_out // g)
        ins = torch.arange(c_in) // (c_in // g)
        if bool((mask <= (outs[:, None] == ins[None, :])).all()):
            best = g
    return best


def composed_taps(first: nn.Module, second: nn.Module) -> int:
    """Number of kernel taps of second∘first: per axis, the offsets d1*t + s1*d2*u on the grid
    of their gcd."""
    taps = 1
    for k1, s1, d1, k2, d2 in zip(
        first.kernel_size, first.stride, first.dilation, second.kernel_size, second.dilation
    ):
        offsets = {d1 * t + s1 * d2 * u for t in range(k1) for u in range(k2)}
        step = reduce(math.gcd, offsets, 0) or 1
        taps *= max(offsets) // step + 1
    return taps


def conv_macs(conv: nn.Module, out_shape: tuple[int, ...]) -> int:
    per_output = conv.in_channels // conv.groups * math.prod(conv.kernel_size)
    return math.prod(out_shape) * per_output


def merge_is_cheaper(first, second, mid_shape, out_shape) -> bool:
    mask = (connectivity(second).double() @ connectivity(first).double()) > 0
    groups = structural_groups(mask)
    merged_macs = math.prod(out_shape) * (first.in_channels // groups)
    merged_macs *= composed_taps(first, second)
    return merged_macs <= conv_macs(first, mid_shape) + conv_macs(second, out_shape)


# ------------------------------------------------------------------------------------------
# Conv chains
# ------------------------------------------------------------------------------------------


@given(conv_chains(activations=False, dtype=torch.float64))
def test_conv_bn_chains_float64(case):
    model, x = case
    out = assert_merged_exact(model, x)
    assert count(out, BNS) == 0  # every BN follows a conv that only it reads
    assert 1 <= count(out, CONVS) <= count(model, CONVS)


@given(conv_chains(activations=False, dtype=torch.float32))
def test_conv_bn_chains_float32(case):
    model, x = case
    out = assert_merged_exact(model, x)
    assert count(out, BNS) == 0
    assert 1 <= count(out, CONVS) <= count(model, CONVS)


@settings(max_examples=50)  # 3-D convs are the slowest examples of the suite
@given(st.data())
def test_conv_bn_chains_1d_and_3d(data):
    ndim = data.draw(st.sampled_from((1, 3)))
    model, x = data.draw(conv_chains(ndim=ndim, activations=False, dtype=torch.float64))
    out = assert_merged_exact(model, x)
    assert count(out, BNS) == 0


@given(conv_chains(min_convs=2, max_convs=2, activations=False, dtype=torch.float64))
def test_two_conv_chain_merges_exactly_when_not_costlier(case):
    model, x = case
    first, second = (m for m in model if isinstance(m, CONVS))
    shapes = dict(zip((id(m) for m in model), output_shapes(model, x)))
    expected = 1 if merge_is_cheaper(first, second, shapes[id(first)], shapes[id(second)]) else 2
    out = assert_merged_exact(model, x)
    assert count(out, CONVS) == expected


@given(
    c0=st.integers(1, 6),
    extra=st.integers(0, 3),
    c2=st.integers(1, 8),
    kernel=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    stride1=st.integers(1, 2),
    bn=st.booleans(),
    bias=st.booleans(),
)
def test_pointwise_expansion_then_kxk_collapses_to_one_conv(
    c0, extra, c2, kernel, stride, dilation, padding, stride1, bn, bias
):
    """1x1 (C0 -> C1 >= C0, may pad and stride) then an unpadded kxk (C1 -> C2): the merged
    kxk costs k²·C0·C2 per output, at most the kxk's own k²·C1·C2, so it always merges."""
    c1 = c0 + extra
    torch.manual_seed(0)
    layers = [nn.Conv2d(c0, c1, 1, stride=stride1, padding=padding, bias=bias)]
    if bn:
        layers.append(random_bn(c1, 1e-3))
    layers.append(nn.Conv2d(c1, c2, kernel, stride=stride, dilation=dilation))
    model = nn.Sequential(*layers).double().eval()
    x = torch.randn(2, c0, 20, 19, dtype=torch.float64)
    out = assert_merged_exact(model, x)
    assert count(out, CONVS) == 1
    assert count(out, BNS) == 0


@given(
    c0=st.integers(1, 6),
    c1=st.integers(1, 8),
    fewer=st.integers(0, 3),
    kernel=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    stride=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    stride2=st.integers(1, 2),
)
def test_kxk_then_pointwise_reduction_collapses_to_one_conv(
    c0, c1, fewer, kernel, stride, padding, stride2
):
    """kxk (C0 -> C1, may pad) then 1x1 (C1 -> C2 <= C1): merged k²·C0·C2 <= k²·C0·C1."""
    c2 = max(1, c1 - fewer)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(c0, c1, kernel, stride=stride, padding=padding),
        nn.Conv2d(c1, c2, 1, stride=stride2),
    )
    model = model.double().eval()
    out = assert_merged_exact(model, torch.randn(1, c0, 11, 12, dtype=torch.float64))
    assert count(out, CONVS) == 1


def test_padding_on_the_second_conv_blocks_the_merge():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3, padding=1)).double().eval()
    x = torch.randn(1, 3, 9, 9, dtype=torch.float64)
    assert count(assert_merged_exact(model, x), CONVS) == 2


@pytest.mark.parametrize(
    ("layers", "merges"),
    [
        # dense 1x1 then depthwise 3x3: merged is a dense 3x3 (9·C² > C² + 9·C)
        ([nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, groups=8)], False),
        # MobileNet's depthwise 3x3 then pointwise 1x1: same
        ([nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 8, 1)], False),
        # depthwise then depthwise stays depthwise, but 5x5 taps > 3x3 + 3x3
        ([nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 8, 3, groups=8)], False),
        # depthwise 1x3 then 3x1 is a depthwise 3x3: 9 taps > 3 + 3 taps
        ([nn.Conv2d(8, 8, (1, 3), groups=8), nn.Conv2d(8, 8, (3, 1), groups=8)], False),
        # depthwise 1x1 then depthwise 3x3: a depthwise 3x3, cheaper than the pair
        ([nn.Conv2d(8, 8, 1, groups=8), nn.Conv2d(8, 8, 3, groups=8)], True),
    ],
)
def test_merge_only_if_not_costlier(layers, merges):
    torch.manual_seed(0)
    model = nn.Sequential(*layers).double().eval()
    x = torch.randn(1, 8, 12, 12, dtype=torch.float64)
    out = assert_merged_exact(model, x)
    assert count(out, CONVS) == (1 if merges else 2)
    assert any(e["kind"] == "merge" for e in out.meta["fxcompress.events"]) == merges
    forced = merge(capture(model, x), only_if_cheaper=False)
    assert count(forced, CONVS) == 1
    assert_equivalent(forced, model, x)


# ------------------------------------------------------------------------------------------
# BatchNorm folding
# ------------------------------------------------------------------------------------------


def random_bn(channels: int, eps: float, *, affine: bool = True, ndim: int = 2) -> nn.Module:
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[ndim](
        channels, eps=eps, affine=affine
    )
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.05, 3.0)
        if affine:
            bn.weight.normal_()
            bn.bias.normal_()
    return bn.eval()


@given(
    eps=st.sampled_from((0.0, 1e-5, 1e-3, 0.1, 1.0, 10.0)),
    affine=st.booleans(),
    bias=st.booleans(),
    dtype=DTYPES,
    linear=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_bn_fold_with_eps_variations(eps, affine, bias, dtype, linear, seed):
    torch.manual_seed(seed)
    if linear:
        layer, x = nn.Linear(5, 4, bias=bias), torch.randn(3, 5)
        bn = random_bn(4, eps, affine=affine, ndim=1)
    else:
        layer, x = nn.Conv2d(3, 4, 3, padding=1, bias=bias), torch.randn(2, 3, 6, 6)
        bn = random_bn(4, eps, affine=affine)
    model = nn.Sequential(layer, bn).to(dtype).eval()
    out = assert_merged_exact(model, x.to(dtype))
    assert count(out, BNS) == 0
    assert [e["kind"] for e in out.meta["fxcompress.events"]] == ["fold_bn"]
    # the public single-purpose pass does the same
    folded = fold_batchnorm(capture(model, x.to(dtype)))
    assert count(folded, BNS) == 0
    assert_equivalent(folded, model, x.to(dtype))


def test_bn_whose_input_is_read_elsewhere_is_not_folded_into_it():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = random_bn(4, 1e-5)
            self.after = nn.Conv2d(4, 4, 3, padding=1)  # padded: BN cannot go into it either

        def forward(self, x):
            y = self.conv(x)
            return self.after(self.bn(y)), y

    model = Net().double().eval()
    out = assert_merged_exact(model, torch.randn(1, 3, 6, 6, dtype=torch.float64))
    assert count(out, BNS) == 1


def test_bn_folds_into_the_following_unpadded_layer_when_it_cannot_go_backwards():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = random_bn(4, 0.1)
            self.after = nn.Conv2d(4, 5, 3, stride=2)
            self.bn1 = random_bn(6, 1e-3, ndim=1)
            self.fc = nn.Linear(6, 2)

        def forward(self, x, v):
            y = self.conv(x)
            return self.after(self.bn(y)), y, self.fc(self.bn1(v))

    model = Net().double().eval()
    x = (torch.randn(2, 3, 7, 7, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64))
    out = assert_merged_exact(model, x)
    assert count(out, BNS) == 0
    assert [e["kind"] for e in out.meta["fxcompress.events"]] == ["fold_bn_before"] * 2


# ------------------------------------------------------------------------------------------
# Linear chains
# ------------------------------------------------------------------------------------------


@given(linear_chains(activations=False, dtype=torch.float64))
def test_linear_chains_stay_exact(case):
    model, x = case
    out = assert_merged_exact(model, x)
    assert count(out, BNS) == 0
    assert 1 <= count(out, nn.Linear) <= count(model, nn.Linear)


@given(
    d_in=st.integers(1, 12),
    hidden=st.integers(1, 12),
    d_out=st.integers(1, 12),
    bias=st.booleans(),
    sequence=st.booleans(),
)
@example(d_in=2, hidden=1, d_out=2, bias=True, sequence=False)  # tie: same weight count
@example(d_in=6, hidden=2, d_out=3, bias=False, sequence=False)  # tie
@example(d_in=6, hidden=1, d_out=3, bias=False, sequence=True)
def test_two_linears_merge_only_when_not_larger(d_in, hidden, d_out, bias, sequence):
    """W2·W1 has d_in·d_out weights, the pair hidden·(d_in + d_out); on a tie the merged layer
    is kept (same weights and MACs, one layer and one bias fewer)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d_in, hidden, bias=bias), nn.Linear(hidden, d_out))
    model = model.double().eval()
    x = torch.randn(2, 3, d_in) if sequence else torch.randn(4, d_in)
    out = assert_merged_exact(model, x.double())
    expected = 1 if hidden * (d_in + d_out) >= d_in * d_out else 2
    assert count(out, nn.Linear) == expected


# ------------------------------------------------------------------------------------------
# Skip folds
# ------------------------------------------------------------------------------------------


class Skip(nn.Module):
    def __init__(self, conv, bn, spelling):
        super().__init__()
        self.conv = conv
        self.bn = bn
        self.spelling = spelling

    def forward(self, x):
        y = self.conv(x)
        if self.bn is not None:
            y = self.bn(y)
        if self.spelling == "x + y":
            return x + y
        if self.spelling == "y + x":
            return y + x
        if self.spelling == "torch.add":
            return torch.add(y, x)
        return x.add(y)


@given(
    channels=st.integers(1, 6),
    kernel=st.tuples(st.sampled_from((1, 3, 5)), st.sampled_from((1, 3, 5))),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    groups=st.sampled_from(("dense", "depthwise", "grouped")),
    bias=st.booleans(),
    bn=st.booleans(),
    spelling=st.sampled_from(("x + y", "y + x", "torch.add", "x.add(y)")),
    dtype=DTYPES,
)
def test_identity_skip_folds_into_one_conv(
    channels, kernel, dilation, groups, bias, bn, spelling, dtype
):
    g = {"dense": 1, "depthwise": channels, "grouped": math.gcd(channels, 2)}[groups]
    padding = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation))  # centred
    torch.manual_seed(0)
    conv = nn.Conv2d(channels, channels, kernel, padding=padding, dilation=dilation, groups=g)
    if not bias:
        conv.bias = None
    model = Skip(conv, random_bn(channels, 1e-3) if bn else None, spelling).to(dtype).eval()
    out = assert_merged_exact(model, torch.randn(2, channels, 9, 8, dtype=dtype))
    assert count(out, CONVS) == 1
    assert count(out, BNS) == 0
    assert "fold_skip" in [e["kind"] for e in out.meta["fxcompress.events"]]
    assert not [n for n in out.graph.nodes if n.op in ("call_function", "call_method")]


class Projection(nn.Module):
    def __init__(self, c_in, c_out, kernel, stride, groups_b, bn_a, bn_b):
        super().__init__()
        self.a = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2)
        self.bn_a = random_bn(c_out, 1e-5) if bn_a else nn.Identity()
        self.b = nn.Conv2d(c_in, c_out, 1, stride=stride, groups=groups_b, bias=False)
        self.bn_b = random_bn(c_out, 0.1) if bn_b else nn.Identity()

    def forward(self, x):
        return self.bn_a(self.a(x)) + self.bn_b(self.b(x))


@given(
    c_in=st.integers(1, 6),
    c_out=st.integers(1, 8),
    kernel=st.sampled_from((1, 3, 5)),
    stride=st.integers(1, 3),
    grouped=st.booleans(),
    bn_a=st.booleans(),
    bn_b=st.booleans(),
    dtype=DTYPES,
)
def test_projection_shortcut_folds_into_one_conv(
    c_in, c_out, kernel, stride, grouped, bn_a, bn_b, dtype
):
    groups_b = math.gcd(c_in, c_out) if grouped else 1
    torch.manual_seed(1)
    model = Projection(c_in, c_out, kernel, stride, groups_b, bn_a, bn_b).to(dtype).eval()
    out = assert_merged_exact(model, torch.randn(2, c_in, 10, 11, dtype=dtype))
    assert count(out, CONVS) == 1
    assert count(out, BNS) == 0


def test_cropped_identity_and_pad_branches_fold():
    class Cropped(nn.Module):
        def __init__(self, kind):
            super().__init__()
            self.kind = kind
            self.crop = Pad((-1, -1))
            self.crop2 = Pad((-1, -1))
            self.conv3 = nn.Conv2d(3, 3, 3)
            self.conv1 = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            if self.kind == "conv(x) + crop(x)":
                return self.conv3(x) + self.crop(x)
            if self.kind == "conv(c) + c":
                c = self.crop(x)
                return F.pad(self.conv1(c) + c, (1, 1, 1, 1))
            return self.conv1(self.crop(x)) + self.crop2(x)  # merged padding -1: Pad + conv

    for kind in ("conv(x) + crop(x)", "conv(c) + c", "conv(crop(x)) + crop(x)"):
        model = Cropped(kind).double().eval()
        out = assert_merged_exact(model, torch.randn(2, 3, 7, 6, dtype=torch.float64))
        assert count(out, CONVS) == 1, kind
        assert [e["kind"] for e in out.meta["fxcompress.events"]] == ["fold_skip"], kind


# ------------------------------------------------------------------------------------------
# Shared modules, in-place ops, purity
# ------------------------------------------------------------------------------------------


class SharedConv(nn.Module):
    """pytorch/pytorch#104593: torch.fx's conv-bn fuser folds the BN into a conv module that is
    also called elsewhere, silently changing the other call site."""

    def __init__(self, where):
        super().__init__()
        self.where = where
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = random_bn(3, 1e-5)
        self.post = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        a = self.bn(self.conv(x))  # BN after the first call site only
        if self.where == "parallel":
            b = self.conv(x * 2.0)
        elif self.where == "chained":
            b = self.conv(a)  # called again on the folded site's output
        else:  # the second call feeds a mergeable 1x1 conv
            b = self.post(self.conv(torch.relu(a)))
        return a, b


@pytest.mark.parametrize("where", ["parallel", "chained", "merged"])
def test_shared_conv_with_bn_at_one_call_site(where):
    torch.manual_seed(0)
    model = SharedConv(where).double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    gm = capture(model, x)
    assert gm.meta["fxcompress.shared"] == ("conv",)
    out = merge(gm)
    assert_equivalent(out, model, x)  # both outputs, each against the original
    assert count(out, BNS) == 0
    assert torch.equal(gm.conv.weight, model.conv.weight)  # merge's input is untouched
    if where != "merged":  # the second call site still calls the original module
        assert torch.equal(out.get_submodule("conv").weight, model.conv.weight)


def test_a_replaced_module_read_as_an_attribute_keeps_its_weights():
    """Folding the BN must not overwrite ``conv`` while ``self.conv.weight`` is still read."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.bn = random_bn(3, 1e-5)

        def forward(self, x):
            return self.bn(self.conv(x)), F.conv2d(x, self.conv.weight, self.conv.bias)

    model = Net().double().eval()
    assert_merged_exact(model, torch.randn(1, 3, 5, 5, dtype=torch.float64))


class Mutating(nn.Module):
    """Graphs with in-place writes that a rewrite must not reorder or drop."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.c0 = nn.Conv2d(3, 3, 1)
        self.c1 = nn.Conv2d(3, 4, 1)
        self.c2 = nn.Conv2d(4, 3, 3)
        self.c3 = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        a = self.c0(x)
        if self.kind == "write between two merged convs":
            y = self.c1(a)
            a.relu_()
            a.add_(1.0)
            return self.c2(y), a
        if self.kind == "write between conv and skip":
            y = self.c3(a)
            a.mul_(2.0)
            return y + a
        if self.kind == "in-place add into the identity":
            w = a.add_(self.c3(a))
            return w, self.c0(a)
        if self.kind == "y + y":
            y = self.c3(a)
            return y + y
        raise AssertionError(self.kind)


@pytest.mark.parametrize(
    "kind",
    [
        "write between two merged convs",
        "write between conv and skip",
        "in-place add into the identity",
        "y + y",
    ],
)
def test_in_place_writes_are_respected(kind):
    torch.manual_seed(0)
    model = Mutating(kind).double().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch.fx's "erase_node on an already erased node"
        assert_merged_exact(model, torch.randn(1, 3, 6, 6, dtype=torch.float64))


def test_without_recorded_shapes_merges_still_require_not_costlier():
    """A plain symbolic_trace has no shapes; the cost is then compared per output position."""
    dense_then_dw = nn.Sequential(nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, groups=8)).eval()
    expand_then_3x3 = nn.Sequential(nn.Conv2d(2, 8, 1), nn.Conv2d(8, 8, 3, stride=2)).eval()
    x = torch.randn(1, 8, 9, 9)
    out = merge(torch.fx.symbolic_trace(dense_then_dw))
    assert count(out, CONVS) == 2
    assert_equivalent(out, dense_then_dw, x)
    out = merge(torch.fx.symbolic_trace(expand_then_3x3))
    assert count(out, CONVS) == 1
    assert_equivalent(out, expand_then_3x3, x[:, :2])


@given(models(multiple_outputs=True, dtype=torch.float64))
def test_random_models_float64_and_input_untouched(case):
    model, x = case
    gm = capture(model, x)
    code = gm.code
    state = copy.deepcopy(gm.state_dict())
    modules = dict(gm.named_modules())
    out = merge(gm)
    assert_equivalent(out, model, x)
    assert out is not gm
    assert gm.code == code
    assert dict(gm.named_modules()) == modules
    assert gm.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in gm.state_dict().items())
    assert_equivalent(gm, model, x)


@given(models(dtype=torch.float32))
def test_random_models_float32(case):
    model, x = case
    assert_merged_exact(model, x)


def test_merged_result_can_be_captured_and_merged_again():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), random_bn(4, 1e-3), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)
    ).double()
    x = torch.randn(1, 3, 7, 7, dtype=torch.float64)
    once = assert_merged_exact(model, x)
    twice = merge(capture(once, x))
    assert_equivalent(twice, model, x)
    assert count(twice, CONVS) == count(once, CONVS) == 2


# ------------------------------------------------------------------------------------------
# Unbatched inputs and tensors without a channel axis (issue 15, items 1 and 6)
# ------------------------------------------------------------------------------------------


class FunctionalBN(nn.Module):
    """``F.batch_norm`` on its own buffers (what torch.fx records for BatchNorm subclasses it
    traces through, such as timm's BatchNormAct2d): it accepts any rank, normalising axis 1."""

    def __init__(self, features: int):
        super().__init__()
        bn = random_bn(features, 1e-3, ndim=1)
        for name in ("running_mean", "running_var", "weight", "bias"):
            self.register_buffer(name, getattr(bn, name).detach().clone())

    def forward(self, x):
        w, b = self.weight, self.bias
        return F.batch_norm(x, self.running_mean, self.running_var, w, b, False, 0.0, 1e-3)


class Unbatched(nn.Module):
    """A layer then a BatchNorm, or a BatchNorm then a layer, on an unbatched input: the
    BatchNorm's axis 1 is then spatial (BatchNorm1d on (C, L) treats C as the batch), so the
    BatchNorm is not the per-channel map of the layer it touches and must not be folded."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        torch.manual_seed(0)
        if kind == "conv1d -> bn1d":  # (4, 10) -> (8, 8): BatchNorm1d(8) normalises L
            self.layers = nn.Sequential(nn.Conv1d(4, 8, 3), random_bn(8, 1e-5, ndim=1))
        elif kind == "conv2d -> bn1d":  # (3, 6, 7) -> (4, 4, 5): BatchNorm1d(4) normalises H
            self.layers = nn.Sequential(nn.Conv2d(3, 4, 3), random_bn(4, 1e-5, ndim=1))
        elif kind == "conv2d -> F.batch_norm":
            self.layers = nn.Sequential(nn.Conv2d(3, 4, 3), FunctionalBN(4))
        elif kind == "linear 3-d -> bn1d":  # (2, 3, 5) -> (2, 3, 3): normalises axis 1
            self.layers = nn.Sequential(nn.Linear(5, 3), random_bn(3, 1e-5, ndim=1))
        elif kind == "bn1d -> conv1d":  # (4, 10): BatchNorm1d(10) normalises L, not channels
            self.layers = nn.Sequential(random_bn(10, 1e-5, ndim=1), nn.Conv1d(4, 10, 1))
        elif kind == "conv2d + F.batch_norm":  # a sum: the BN is no diagonal conv here
            self.layers = nn.ModuleList([nn.Conv2d(4, 4, 3, padding=1), FunctionalBN(4)])
        elif kind == "conv2d + identity":  # unbatched identity skip: its channels are axis 0
            self.layers = nn.ModuleList([nn.Conv2d(4, 4, 3, padding=1), nn.Identity()])
        else:
            raise AssertionError(kind)

    def forward(self, x):
        if isinstance(self.layers, nn.ModuleList):
            return self.layers[0](x) + self.layers[1](x)
        return self.layers(x)


UNBATCHED = {
    "conv1d -> bn1d": (4, 10),
    "conv2d -> bn1d": (3, 6, 7),
    "conv2d -> F.batch_norm": (3, 6, 7),
    "linear 3-d -> bn1d": (2, 3, 5),
    "bn1d -> conv1d": (4, 10),
    "conv2d + F.batch_norm": (4, 4, 5),
    "conv2d + identity": (4, 4, 5),
}


@pytest.mark.parametrize("kind", list(UNBATCHED))
def test_bn_on_unbatched_maps_is_not_folded_across_axes(kind):
    """Issue 15 item 1: merge and fold_batchnorm folded BatchNorm1d after an unbatched Conv1d
    on the channel axis (relative error 1.2); the axis it normalises is spatial there."""
    model = Unbatched(kind).double().eval()
    x = torch.randn(*UNBATCHED[kind], dtype=torch.float64)
    out = assert_merged_exact(model, x)
    assert_equivalent(fold_batchnorm(capture(model, x)), model, x)
    if kind == "conv2d + identity":  # the skip folds: channels are axis 0 of (C, H, W)
        assert [n.op for n in out.graph.nodes] == ["placeholder", "call_module", "output"]
    elif "F.batch_norm" in kind:
        assert any(n.target is F.batch_norm for n in out.graph.nodes)
    else:
        assert count(out, BNS) == 1


def test_bn_after_a_batched_conv1d_still_folds():
    """The batched counterpart of the unbatched cases above folds (the guard is by rank)."""
    model = nn.Sequential(nn.Conv1d(4, 8, 3), random_bn(8, 1e-5, ndim=1)).double().eval()
    out = assert_merged_exact(model, torch.randn(2, 4, 10, dtype=torch.float64))
    assert count(out, BNS) == 0


@pytest.mark.parametrize("after", [True, False])
def test_functional_batch_norm_folds_on_batched_maps(after):
    """``F.batch_norm(..., training=False)`` on attributes (timm's BatchNormAct2d traces to
    it) folds into the conv before it, or into the unpadded conv after it."""
    torch.manual_seed(0)
    if after:
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), FunctionalBN(4))
    else:
        model = nn.Sequential(nn.ReLU(), FunctionalBN(3), nn.Conv2d(3, 4, 3))
    model = model.double().eval()
    out = assert_merged_exact(model, torch.randn(2, 3, 6, 5, dtype=torch.float64))
    assert not any(n.target is F.batch_norm for n in out.graph.nodes)
    kinds = [e["kind"] for e in out.meta["fxcompress.events"]]
    assert kinds == ["fold_bn" if after else "fold_bn_before"]


def test_functional_batch_norm_with_positional_arguments_folds():
    """A hand-built graph may pass eps positionally (torch.fx records keywords); it counts."""
    from torch.fx.passes.shape_prop import ShapeProp

    root = nn.Module()
    root.conv = nn.Conv2d(3, 4, 1)
    root.bn = FunctionalBN(4)
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    y = graph.call_module("conv", (x,))
    stats = [graph.get_attr(f"bn.{name}") for name in ("running_mean", "running_var")]
    affine = [graph.get_attr(f"bn.{name}") for name in ("weight", "bias")]
    graph.output(graph.call_function(F.batch_norm, (y, *stats, *affine, False, 0.1, 1e-3)))
    gm = torch.fx.GraphModule(root, graph).double().eval()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    ShapeProp(gm).propagate(x)
    out = merge(gm)
    assert [e["kind"] for e in out.meta["fxcompress.events"]] == ["fold_bn"]
    assert_equivalent(out, gm, x)


def test_optimize_on_an_unbatched_conv_bn_is_exact():
    """Issue 15 item 1: optimize raised a "bug" RewriteError (and with check=False returned a
    wrong model)."""
    import fxcompress

    model = Unbatched("conv1d -> bn1d").eval()
    x = torch.randn(4, 10)
    compiled = fxcompress.optimize(model, 1.0, example_inputs=x, latency="flops")
    assert_equivalent(compiled, model, x)


class OneDimensionalAdds(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.p = nn.Parameter(torch.randn(5))
        self.q = nn.Parameter(torch.randn(5))

    def forward(self, x):
        if self.kind == "reductions":  # add(relu(v), sigmoid(w)) with 1-D v, w
            return torch.relu(x.mean(0)) + torch.sigmoid(x.amax(0))
        if self.kind == "parameters":
            return x * (self.p + self.q)
        return x.sum(0) + torch.tanh(x.sum(0))  # an identity view of a 1-D tensor


@pytest.mark.parametrize("kind", ["reductions", "parameters", "identity"])
def test_adds_of_one_dimensional_tensors(kind):
    """Issue 15 item 6: merge raised IndexError (shape[1]) on an add of 1-D tensors (timm's
    edgenext_xx_small); such a tensor has no channel axis and no conv reads it."""
    model = OneDimensionalAdds(kind).double().eval()
    assert_merged_exact(model, torch.randn(3, 5, dtype=torch.float64))
