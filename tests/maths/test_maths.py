"""Tests of fxcompress.maths against an independent reference.

The reference always runs the *original* layers one after another with torch.nn.functional
(negative padding done with ``F.pad``, which crops), never the function under test.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, example, given
from hypothesis import strategies as st
from torch import nn

from fxcompress.maths import (
    ConvParams,
    LinearParams,
    add_parallel,
    batchnorm_as_conv,
    compose,
    compose_linear,
    conv_to_dense_weight,
    fold_bn,
    fold_bn_before,
    identity,
)

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_MODULE = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
# Largest spatial input size per number of axes (keeps the suite fast).
LIMIT = {1: 40, 2: 14, 3: 8}
NDIMS = st.sampled_from([1, 2, 2, 2, 3])
DTYPES = st.sampled_from([torch.float64, torch.float32])
TOL = {torch.float64: 1e-9, torch.float32: 1e-4}


# ------------------------------------------------------------------------------------------
# Independent reference.
# ------------------------------------------------------------------------------------------


@dataclass
class Layer:
    """A convolution as plain numbers, run by :func:`ref_conv`."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int

    def params(self) -> ConvParams:
        return ConvParams(
            self.weight.clone(),
            None if self.bias is None else self.bias.clone(),
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )


def ref_conv(x, weight, bias, stride, padding, dilation, groups):
    """Zero padding (or cropping, for negative values) with F.pad, then an unpadded conv."""
    ndim = weight.dim() - 2
    pads = []
    for p in reversed(padding):
        pads += [p, p]
    x = F.pad(x, pads)
    return CONV[ndim](x, weight, bias, stride=stride, dilation=dilation, groups=groups)


def ref_layer(x, layer: Layer | ConvParams):
    return ref_conv(
        x,
        layer.weight,
        layer.bias,
        tuple(layer.stride),
        tuple(layer.padding),
        tuple(layer.dilation),
        layer.groups,
    )


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape, (out.shape, ref.shape)
    scale = ref.abs().max().item()
    return (out - ref).abs().max().item() / max(scale, 1e-30)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def block_mask(c_out: int, c_in: int, groups: int) -> torch.Tensor:
    """Structural connectivity (C_out x C_in) of a grouped layer, as a 0/1 float matrix."""
    o = torch.arange(c_out)[:, None] // (c_out // groups)
    i = torch.arange(c_in)[None, :] // (c_in // groups)
    return (o == i).double()


def largest_block_groups(conn: torch.Tensor) -> int:
    """Largest g such that the 0/1 matrix ``conn`` is zero outside g equal diagonal blocks."""
    c_out, c_in = conn.shape
    for g in reversed(divisors(math.gcd(c_out, c_in))):
        if not (conn * (1 - block_mask(c_out, c_in, g))).any():
            return g
    raise AssertionError("unreachable")


def expected_compose_groups(first: ConvParams, second: ConvParams) -> int:
    conn = block_mask(second.out_channels, second.in_channels, second.groups) @ block_mask(
        first.out_channels, first.in_channels, first.groups
    )
    return largest_block_groups((conn > 0).double())


def expected_add_groups(a: ConvParams, b: ConvParams) -> int:
    conn = block_mask(a.out_channels, a.in_channels, a.groups) + block_mask(
        b.out_channels, b.in_channels, b.groups
    )
    return largest_block_groups((conn > 0).double())


def randn(gen: torch.Generator, *shape: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


# ------------------------------------------------------------------------------------------
# Strategies.
# ------------------------------------------------------------------------------------------


def draw_channels(data, n_convs: int, max_channels: int = 6) -> tuple[list[int], list[int]]:
    """Channel counts and groups of a chain: dense, grouped, depthwise, depthwise x multiplier."""
    channels = [data.draw(st.integers(1, max_channels), label="c0")]
    groups = []
    for _ in range(n_convs):
        g = data.draw(st.sampled_from(divisors(channels[-1])), label="groups")
        mult = data.draw(st.integers(1, max(1, max_channels // g)), label="multiplier")
        groups.append(g)
        channels.append(g * mult)
    return channels, groups


def draw_chain(data, ndim: int, n_convs: int, dtype, *, negative_padding: bool | None = None):
    """A random conv chain (padding on the first conv only) and an input it accepts.

    The geometry is drawn from the last conv backwards so that the smallest input the chain
    accepts stays within ``LIMIT[ndim]``. ``negative_padding``: None draws padding in -2..3,
    True forces at least one negative axis on the first conv.
    """
    limit = LIMIT[ndim]
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    channels, groups = draw_channels(data, n_convs)
    geometry: list[list[tuple[int, int, int, int]]] = [[] for _ in range(n_convs)]
    sizes = []
    for _ax in range(ndim):
        need = 1
        for j in reversed(range(n_convs)):
            s_max = 3 if need == 1 else max(1, min(3, (limit - 1) // (need - 1)))
            s = data.draw(st.integers(1, s_max), label="stride")
            room = max(0, limit - 1 - (need - 1) * s)
            k = data.draw(st.integers(1, min(7, room + 1)), label="kernel")
            d = data.draw(st.integers(1, min(3, room // (k - 1)) if k > 1 else 1), label="dil")
            need = (need - 1) * s + d * (k - 1) + 1
            p = 0
            if j == 0:
                p_min = max(-2, -((limit - need) // 2))
                if negative_padding and p_min < 0:
                    p = data.draw(st.integers(p_min, -1), label="padding")
                else:
                    p = data.draw(st.integers(p_min, 3), label="padding")
                need = max(1, need - 2 * p)
            geometry[j].append((k, s, d, p))
        sizes.append(data.draw(st.integers(need, limit), label="size"))
    layers = []
    for j in range(n_convs):
        kernel, stride, dilation, padding = (tuple(v) for v in zip(*geometry[j]))
        c_in, c_out, g = channels[j], channels[j + 1], groups[j]
        has_bias = data.draw(st.booleans(), label="bias")
        layers.append(
            Layer(
                randn(gen, c_out, c_in // g, *kernel, dtype=dtype),
                randn(gen, c_out, dtype=dtype) if has_bias else None,
                stride,
                padding,
                dilation,
                g,
            )
        )
    batch = data.draw(st.integers(1, 2), label="batch")
    x = randn(gen, batch, channels[0], *sizes, dtype=dtype)
    return layers, x


# ------------------------------------------------------------------------------------------
# compose
# ------------------------------------------------------------------------------------------


def check_chain(layers: list[Layer], x: torch.Tensor) -> ConvParams:
    ref = x
    for layer in layers:
        ref = ref_layer(ref, layer)
    params = [layer.params() for layer in layers]
    originals = [(p.weight.clone(), None if p.bias is None else p.bias.clone()) for p in params]
    result = params[0]
    for nxt in params[1:]:
        expected_groups = expected_compose_groups(result, nxt)
        result = compose(result, nxt)
        assert result.groups == expected_groups
    # Inputs untouched, result shares no storage with them.
    for p, (w, b) in zip(params, originals):
        assert torch.equal(p.weight, w)
        assert b is None or torch.equal(p.bias, b)
        assert result.weight.data_ptr() != p.weight.data_ptr()
    assert result.weight.dtype == x.dtype
    assert (result.bias is None) == all(layer.bias is None for layer in layers)
    kernel = math.prod(result.kernel_size)
    assert result.weight.numel() <= result.out_channels * result.in_channels * kernel
    out = ref_layer(x, result)
    assert rel_err(out, ref) <= TOL[x.dtype]
    return result


@given(data=st.data(), ndim=NDIMS, n_convs=st.integers(2, 4), dtype=DTYPES)
def test_compose_chain_matches_sequential(data, ndim, n_convs, dtype):
    layers, x = draw_chain(data, ndim, n_convs, dtype)
    check_chain(layers, x)


@given(data=st.data(), ndim=NDIMS, n_convs=st.integers(2, 3), dtype=DTYPES)
def test_compose_cropping_first_conv_is_exact(data, ndim, n_convs, dtype):
    layers, x = draw_chain(data, ndim, n_convs, dtype, negative_padding=True)
    check_chain(layers, x)


def _layer(c_out, c_in, kernel, *, stride=1, padding=0, dilation=1, groups=1, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ndim = len(kernel)
    return Layer(
        randn(gen, c_out, c_in // groups, *kernel),
        randn(gen, c_out) if bias else None,
        (stride,) * ndim,
        (padding,) * ndim if isinstance(padding, int) else padding,
        (dilation,) * ndim,
        groups,
    )


@pytest.mark.parametrize(
    ("first", "second", "groups"),
    [
        # depthwise o depthwise stays depthwise
        ({"c_out": 4, "c_in": 4, "groups": 4}, {"c_out": 4, "c_in": 4, "groups": 4}, 4),
        # depthwise with channel multipliers: 3 -> 6 (groups 3), 6 -> 12 (groups 6)
        ({"c_out": 6, "c_in": 3, "groups": 3}, {"c_out": 12, "c_in": 6, "groups": 6}, 3),
        # dense o depthwise and depthwise o dense are dense
        ({"c_out": 4, "c_in": 4, "groups": 1}, {"c_out": 4, "c_in": 4, "groups": 4}, 1),
        ({"c_out": 4, "c_in": 4, "groups": 4}, {"c_out": 4, "c_in": 4, "groups": 1}, 1),
        # grouped: 2 groups then 4 groups over 8 channels -> 2 blocks
        ({"c_out": 8, "c_in": 4, "groups": 2}, {"c_out": 8, "c_in": 8, "groups": 4}, 2),
        # 2 groups then 3 groups over 6 channels: the blocks overlap -> dense
        ({"c_out": 6, "c_in": 2, "groups": 2}, {"c_out": 6, "c_in": 6, "groups": 3}, 1),
        # 4 groups then 2 groups -> 2
        ({"c_out": 4, "c_in": 8, "groups": 4}, {"c_out": 6, "c_in": 4, "groups": 2}, 2),
    ],
)
def test_compose_groups_explicit(first, second, groups):
    a = _layer(kernel=(3, 3), padding=1, seed=1, **first)
    b = _layer(kernel=(3, 3), seed=2, **second)
    result = compose(a.params(), b.params())
    assert result.groups == groups
    x = randn(torch.Generator().manual_seed(3), 2, a.params().in_channels, 7, 7)
    assert rel_err(ref_layer(x, result), ref_layer(ref_layer(x, a), b)) <= 1e-9


def test_compose_geometry_is_compact():
    # A stride-2 1x1 conv then a 3x3: taps every 2 input positions -> 3x3 with dilation 2.
    a = _layer(3, 3, (1, 1), stride=2)
    b = _layer(3, 3, (3, 3))
    result = compose(a.params(), b.params())
    assert (result.kernel_size, result.stride, result.dilation) == ((3, 3), (2, 2), (2, 2))
    # Dilated chain stays dilated: d1 = 2, s1 * d2 = 2 * 1 -> dilation 2, kernel 2 + 2 + 1.
    a = _layer(2, 2, (3,), stride=2, dilation=2, padding=1)
    b = _layer(2, 2, (3,), dilation=1)
    result = compose(a.params(), b.params())
    assert (result.kernel_size, result.dilation, result.padding) == ((5,), (2,), (1,))
    # Coprime offsets: d1 = 2, s1 * d2 = 3 -> dilation 1, extent 2*2 + 3*2 = 10.
    a = _layer(2, 2, (3,), dilation=2)
    b = _layer(2, 2, (3,), dilation=3)
    result = compose(a.params(), b.params())
    assert (result.kernel_size, result.dilation) == ((11,), (1,))
    x = randn(torch.Generator().manual_seed(0), 1, 2, 20)
    assert rel_err(ref_layer(x, result), ref_layer(ref_layer(x, a), b)) <= 1e-9


def test_compose_rejects_padded_second():
    a = _layer(3, 3, (3, 3), padding=1).params()
    b = _layer(3, 3, (3, 3), padding=1).params()
    with pytest.raises(ValueError, match="padding"):
        compose(a, b)
    b = _layer(3, 3, (3, 3), padding=(0, 1)).params()
    with pytest.raises(ValueError, match="intermediate"):
        compose(a, b)
    # Padding after a zero-pad is fine, but not after a bias or a crop.
    pad = identity(3, 2, padding=1, dtype=torch.float64)
    assert compose(pad, b).padding == (1, 2)
    biased = _layer(3, 3, (1, 1), padding=1).params()
    with pytest.raises(ValueError, match="bias"):
        compose(biased, b)
    with pytest.raises(ValueError, match="intermediate"):
        compose(identity(3, 2, padding=(0, -1), dtype=torch.float64), b)


@given(
    seed=st.integers(0, 2**31 - 1),
    ndim=st.sampled_from([1, 2]),
    k1=st.integers(1, 3),
    s1=st.integers(1, 3),
    d1=st.integers(1, 2),
    extra=st.integers(0, 2),
    k2=st.integers(1, 4),
    p2=st.integers(1, 3),
    s2=st.integers(1, 2),
    bias2=st.booleans(),
    n=st.integers(1, 9),
)
# F.pad(x, 2) then a 3-tap conv with padding 1.
@example(seed=0, ndim=2, k1=1, s1=1, d1=1, extra=2, k2=3, p2=1, s2=1, bias2=True, n=5)
def test_compose_padding_after_zero_border_is_exact(
    seed, ndim, k1, s1, d1, extra, k2, p2, s2, bias2, n
):
    """Extension: the second conv may pad where the first computes zeros from padding alone."""
    c = 2
    gen = torch.Generator().manual_seed(seed)
    a = Layer(
        randn(gen, c, c, *([k1] * ndim)),
        None,
        (s1,) * ndim,
        (d1 * (k1 - 1) + extra,) * ndim,
        (d1,) * ndim,
        1,
    )
    b = Layer(
        randn(gen, c, 1, *([k2] * ndim)),
        randn(gen, c) if bias2 else None,
        (s2,) * ndim,
        (p2,) * ndim,
        (1,) * ndim,
        c,
    )
    mid = (n + 2 * a.padding[0] - d1 * (k1 - 1) - 1) // s1 + 1
    assume(mid + 2 * p2 >= k2)  # the chain produces an output
    x = randn(gen, 2, c, *([n] * ndim))
    ref = ref_layer(ref_layer(x, a), b)
    result = compose(a.params(), b.params())
    assert result.padding == (a.padding[0] + s1 * p2,) * ndim
    assert rel_err(ref_layer(x, result), ref) <= 1e-9


def test_compose_rejects_channel_and_ndim_mismatch():
    a = _layer(4, 3, (3, 3)).params()
    with pytest.raises(ValueError, match="channels"):
        compose(a, _layer(3, 3, (3, 3)).params())
    with pytest.raises(ValueError, match="-d conv"):
        compose(a, _layer(3, 4, (3,)).params())


@given(
    seed=st.integers(0, 2**31 - 1),
    s1=st.integers(1, 3),
    p1=st.integers(-1, 2),
    p2=st.integers(-2, -1),
    k2=st.integers(1, 4),
    n=st.integers(40, 50),
)
# Largest input need: first stride 3, crop 1, second 4 taps dilation 2 cropped by 2 each side.
@example(seed=0, s1=3, p1=-1, p2=-2, k2=4, n=40)
def test_compose_cropping_second_conv_is_exact(seed, s1, p1, p2, k2, n):
    """Extension: a negative (cropping) padding on the second conv is also exact."""
    a = _layer(3, 2, (3,), stride=s1, padding=p1, seed=seed)
    b = _layer(2, 3, (k2,), padding=p2, dilation=2, seed=seed + 1)
    result = compose(a.params(), b.params())
    assert result.padding == (p1 + s1 * p2,)
    x = randn(torch.Generator().manual_seed(seed), 2, 2, n)
    assert rel_err(ref_layer(x, result), ref_layer(ref_layer(x, a), b)) <= 1e-9


def test_compose_large_depthwise_is_fast():
    c = 960
    a = _layer(c, c, (3, 3), padding=1, groups=c).params().to(torch.float32)
    b = _layer(c * 2, c, (3, 3), stride=2, groups=c).params().to(torch.float32)
    start = time.perf_counter()
    result = compose(a, b)
    elapsed = time.perf_counter() - start
    assert result.groups == c
    assert tuple(result.weight.shape) == (2 * c, 1, 5, 5)
    assert elapsed < 1.0
    x = randn(torch.Generator().manual_seed(0), 1, c, 9, 9, dtype=torch.float32)
    assert rel_err(result.apply(x), b.apply(a.apply(x))) <= 1e-4


# ------------------------------------------------------------------------------------------
# BatchNorm folding
# ------------------------------------------------------------------------------------------


def draw_bn(data, gen, channels: int, dtype):
    affine = data.draw(st.booleans(), label="affine")
    eps = data.draw(st.sampled_from([1e-3, 1e-5]) | st.floats(1e-6, 1e-1), label="eps")
    stats = {
        "mean": randn(gen, channels, dtype=dtype),
        "var": (torch.rand(channels, generator=gen, dtype=torch.float64) * 2 + 0.05).to(dtype),
        "weight": randn(gen, channels, dtype=dtype) if affine else None,
        "bias": randn(gen, channels, dtype=dtype) if affine else None,
    }
    return stats, eps


def ref_bn(y, stats, eps):
    return F.batch_norm(
        y,
        stats["mean"],
        stats["var"],
        stats["weight"],
        stats["bias"],
        training=False,
        eps=eps,
    )


def draw_conv(data, gen, ndim: int, dtype, *, max_padding: int = 2) -> tuple[Layer, torch.Tensor]:
    c_in = data.draw(st.integers(1, 6), label="c_in")
    g = data.draw(st.sampled_from(divisors(c_in)), label="groups")
    c_out = g * data.draw(st.integers(1, max(1, 6 // g)), label="multiplier")
    kernel = tuple(data.draw(st.integers(1, 3), label="kernel") for _ in range(ndim))
    stride = tuple(data.draw(st.integers(1, 2), label="stride") for _ in range(ndim))
    padding = tuple(data.draw(st.integers(-1, max_padding), label="pad") for _ in range(ndim))
    dilation = tuple(data.draw(st.integers(1, 2), label="dil") for _ in range(ndim))
    has_bias = data.draw(st.booleans(), label="bias")
    layer = Layer(
        randn(gen, c_out, c_in // g, *kernel, dtype=dtype),
        randn(gen, c_out, dtype=dtype) if has_bias else None,
        stride,
        padding,
        dilation,
        g,
    )
    size = {1: 11, 2: 8, 3: 7}[ndim]  # >= kernel extent 5 plus a crop of 1 per side
    x = randn(gen, 2, c_in, *([size] * ndim), dtype=dtype)
    return layer, x


@given(data=st.data(), ndim=st.sampled_from([1, 2, 3]), dtype=DTYPES)
def test_fold_bn_conv(data, ndim, dtype):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    layer, x = draw_conv(data, gen, ndim, dtype)
    stats, eps = draw_bn(data, gen, layer.weight.shape[0], dtype)
    folded = fold_bn(layer.params(), eps=eps, **stats)
    assert isinstance(folded, ConvParams)
    assert folded.weight.dtype == dtype
    assert folded.groups == layer.groups
    ref = ref_bn(ref_layer(x, layer), stats, eps)
    assert rel_err(ref_layer(x, folded), ref) <= TOL[dtype]


@given(data=st.data(), dtype=DTYPES)
def test_fold_bn_linear(data, dtype):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    n_in, n_out = data.draw(st.integers(1, 8)), data.draw(st.integers(1, 8))
    has_bias = data.draw(st.booleans())
    layer = LinearParams(randn(gen, n_out, n_in, dtype=dtype), randn(gen, n_out, dtype=dtype))
    if not has_bias:
        layer = LinearParams(layer.weight, None)
    stats, eps = draw_bn(data, gen, n_out, dtype)
    folded = fold_bn(layer, eps=eps, **stats)
    assert isinstance(folded, LinearParams)
    x = randn(gen, 5, n_in, dtype=dtype)
    ref = ref_bn(F.linear(x, layer.weight, layer.bias), stats, eps)
    assert rel_err(F.linear(x, folded.weight, folded.bias), ref) <= TOL[dtype]


@given(data=st.data(), ndim=st.sampled_from([1, 2, 3]), dtype=DTYPES)
def test_fold_bn_before_conv(data, ndim, dtype):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    layer, x = draw_conv(data, gen, ndim, dtype, max_padding=0)
    c_in = layer.weight.shape[1] * layer.groups
    stats, eps = draw_bn(data, gen, c_in, dtype)
    folded = fold_bn_before(layer.params(), eps=eps, **stats)
    assert folded.groups == layer.groups
    assert folded.bias is not None
    ref = ref_layer(ref_bn(x, stats, eps), layer)
    assert rel_err(ref_layer(x, folded), ref) <= TOL[dtype]


@given(data=st.data())
def test_fold_bn_before_linear(data):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    n_in, n_out = data.draw(st.integers(1, 8)), data.draw(st.integers(1, 8))
    bias = randn(gen, n_out) if data.draw(st.booleans()) else None
    layer = LinearParams(randn(gen, n_out, n_in), bias)
    stats, eps = draw_bn(data, gen, n_in, torch.float64)
    folded = fold_bn_before(layer, eps=eps, **stats)
    x = randn(gen, 4, n_in)  # BatchNorm1d on (N, C)
    ref = F.linear(ref_bn(x, stats, eps), layer.weight, layer.bias)
    assert rel_err(F.linear(x, folded.weight, folded.bias), ref) <= 1e-9


def test_fold_bn_before_rejects_padding_and_bad_shapes():
    layer = _layer(3, 3, (3, 3), padding=(0, 1)).params()
    stats = {"mean": torch.zeros(3), "var": torch.ones(3), "weight": None, "bias": None}
    with pytest.raises(ValueError, match="padding"):
        fold_bn_before(layer, eps=1e-5, **stats)
    with pytest.raises(ValueError, match="shape"):
        fold_bn(_layer(4, 3, (3, 3)).params(), eps=1e-5, **stats)


# ------------------------------------------------------------------------------------------
# add_parallel
# ------------------------------------------------------------------------------------------


@given(data=st.data(), ndim=NDIMS, dtype=DTYPES)
def test_add_identity_skip(data, ndim, dtype):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    c = data.draw(st.integers(1, 6), label="channels")
    g = data.draw(st.sampled_from(divisors(c)), label="groups")
    kernel = tuple(data.draw(st.sampled_from([1, 3, 5]), label="k") for _ in range(ndim))
    dilation = tuple(data.draw(st.integers(1, 2), label="d") for _ in range(ndim))
    padding = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation))
    has_bias = data.draw(st.booleans(), label="bias")
    conv = Layer(
        randn(gen, c, c // g, *kernel, dtype=dtype),
        randn(gen, c, dtype=dtype) if has_bias else None,
        (1,) * ndim,
        padding,
        dilation,
        g,
    )
    skip = identity(c, ndim, dtype=dtype)
    # Either order: the identity is the narrower operand (regression: the common kernel was
    # sized from the first operand only).
    if data.draw(st.booleans(), label="identity first"):
        result = add_parallel(skip, conv.params())
    else:
        result = add_parallel(conv.params(), skip)
    assert result.groups == expected_add_groups(conv.params(), skip) == g
    assert result.kernel_size == kernel
    assert result.padding == padding
    size = {1: 13, 2: 9, 3: 6}[ndim]
    x = randn(gen, 2, c, *([size] * ndim), dtype=dtype)
    assert rel_err(ref_layer(x, result), ref_layer(x, conv) + x) <= TOL[dtype]
    # The identity lands on the kernel centre.
    centre = tuple(k // 2 for k in kernel)
    delta = conv_to_dense_weight(result) - conv_to_dense_weight(conv.params())
    expected = torch.zeros_like(delta)
    expected[(slice(None), slice(None), *centre)] = torch.eye(c, dtype=dtype)
    assert torch.equal(delta.abs() > 1e-3, expected > 0) or dtype == torch.float64
    if dtype == torch.float64:
        assert torch.allclose(delta, expected, atol=1e-12)


@pytest.mark.parametrize("n", [8, 9])
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_add_projection_shortcut(n, stride):
    conv = _layer(5, 3, (3, 3), stride=stride, padding=1, seed=1)
    proj = _layer(5, 3, (1, 1), stride=stride, padding=0, seed=2)
    result = add_parallel(conv.params(), proj.params())
    assert (result.kernel_size, result.padding, result.stride) == ((3, 3), (1, 1), (stride,) * 2)
    x = randn(torch.Generator().manual_seed(0), 2, 3, n, n)
    assert rel_err(ref_layer(x, result), ref_layer(x, conv) + ref_layer(x, proj)) <= 1e-9


def test_add_cropped_identity():
    conv = _layer(4, 4, (5, 5), padding=0, groups=2)
    skip = identity(4, 2, padding=-2, dtype=torch.float64)
    result = add_parallel(conv.params(), skip)
    assert (result.kernel_size, result.padding, result.groups) == ((5, 5), (0, 0), 2)
    x = randn(torch.Generator().manual_seed(0), 2, 4, 9, 8)
    ref = ref_layer(x, conv) + x[:, :, 2:-2, 2:-2]
    assert rel_err(ref_layer(x, result), ref) <= 1e-9
    # The identity lands on the kernel centre: output o reads input o, local index o % 2.
    delta = result.weight - conv.weight
    expected = torch.zeros_like(delta)
    expected[torch.arange(4), torch.arange(4) % 2, 2, 2] = 1.0
    assert torch.allclose(delta, expected, atol=1e-12)


@given(data=st.data(), ndim=NDIMS, dtype=DTYPES)
def test_add_parallel_random_compatible_pairs(data, ndim, dtype):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    c_in = data.draw(st.integers(1, 6), label="c_in")
    ga = data.draw(st.sampled_from(divisors(c_in)), label="ga")
    gb = data.draw(st.sampled_from(divisors(c_in)), label="gb")
    lcm = ga * gb // math.gcd(ga, gb)
    c_out = lcm * data.draw(st.integers(1, max(1, 12 // lcm)), label="mult")
    stride = tuple(data.draw(st.integers(1, 3), label="s") for _ in range(ndim))
    layers = []
    first_c = None
    for g in (ga, gb):
        kernel, padding, dilation = [], [], []
        for ax in range(ndim):
            k = data.draw(st.integers(1, 5), label="k")
            d = data.draw(st.integers(1, 3), label="d")
            if first_c is None or len(first_c) <= ax:
                p = data.draw(st.integers(-2, 3), label="p")
            else:
                twice = first_c[ax] + d * (k - 1)
                if twice % 2:  # make it representable: dilation 1, one tap more or less
                    d = 1
                    if (first_c[ax] + k - 1) % 2:
                        k = k + 1 if k < 5 else k - 1
                    twice = first_c[ax] + k - 1
                p = twice // 2
            kernel.append(k)
            padding.append(p)
            dilation.append(d)
        if first_c is None:
            first_c = [2 * p - d * (k - 1) for k, p, d in zip(kernel, padding, dilation)]
        has_bias = data.draw(st.booleans(), label="bias")
        layers.append(
            Layer(
                randn(gen, c_out, c_in // g, *kernel, dtype=dtype),
                randn(gen, c_out, dtype=dtype) if has_bias else None,
                stride,
                tuple(padding),
                tuple(dilation),
                g,
            )
        )
    a, b = layers
    limit = LIMIT[ndim] + 4
    sizes = []
    for ax in range(ndim):
        need = max(1, 1 - first_c[ax])
        if need > limit:
            return
        sizes.append(data.draw(st.integers(need, limit), label="n"))
    result = add_parallel(a.params(), b.params())
    assert result.groups == expected_add_groups(a.params(), b.params())
    x = randn(gen, 2, c_in, *sizes, dtype=dtype)
    assert rel_err(ref_layer(x, result), ref_layer(x, a) + ref_layer(x, b)) <= TOL[dtype]


@pytest.mark.parametrize(
    ("a", "b", "match"),
    [
        (
            {"c_out": 3, "c_in": 3, "kernel": (3, 3)},
            {"c_out": 3, "c_in": 3, "kernel": (1, 1)},
            "output sizes differ",
        ),
        (
            {"c_out": 3, "c_in": 3, "kernel": (3, 3), "padding": 1},
            {"c_out": 3, "c_in": 3, "kernel": (3, 3), "padding": 1, "stride": 2},
            "strides",
        ),
        (
            {"c_out": 3, "c_in": 3, "kernel": (3, 3)},
            {"c_out": 4, "c_in": 3, "kernel": (3, 3)},
            "channels",
        ),
        (
            {"c_out": 3, "c_in": 3, "kernel": (3, 3)},
            {"c_out": 3, "c_in": 3, "kernel": (3,)},
            "-d conv",
        ),
        # Same extent but shifted: 2*0 - 2 != 2*1 - 2.
        (
            {"c_out": 3, "c_in": 3, "kernel": (3,)},
            {"c_out": 3, "c_in": 3, "kernel": (3,), "padding": 1},
            "output sizes differ",
        ),
        # Even kernel cannot be centred against an identity.
        (
            {"c_out": 3, "c_in": 3, "kernel": (2, 2)},
            {"c_out": 3, "c_in": 3, "kernel": (1, 1)},
            "output sizes differ",
        ),
    ],
)
def test_add_parallel_rejects_incompatible(a, b, match):
    with pytest.raises(ValueError, match=match):
        add_parallel(_layer(**a).params(), _layer(**b).params())


def test_add_parallel_narrow_first_operand():
    """Regression: the common kernel must cover the wider operand even when it comes second."""
    conv = _layer(3, 3, (3, 5), padding=(1, 2))
    result = add_parallel(identity(3, 2, dtype=torch.float64), conv.params())
    assert (result.kernel_size, result.padding) == ((3, 5), (1, 2))
    x = randn(torch.Generator().manual_seed(0), 2, 3, 6, 7)
    assert rel_err(ref_layer(x, result), ref_layer(x, conv) + x) <= 1e-9


def test_add_parallel_dilation_stays_compact():
    a = _layer(2, 2, (3,), dilation=2, padding=2)  # offsets -2, 0, 2
    b = _layer(2, 2, (5,), dilation=1, padding=2)  # offsets -2 .. 2
    c = _layer(2, 2, (3,), dilation=4, padding=4)  # offsets -4, 0, 4
    assert add_parallel(a.params(), identity(2, 1, dtype=torch.float64)).dilation == (2,)
    assert add_parallel(a.params(), b.params()).dilation == (1,)
    both = add_parallel(a.params(), c.params())
    assert (both.dilation, both.kernel_size, both.padding) == ((2,), (5,), (4,))
    x = randn(torch.Generator().manual_seed(0), 1, 2, 15)
    assert rel_err(ref_layer(x, both), ref_layer(x, a) + ref_layer(x, c)) <= 1e-9


@given(data=st.data(), ndim=NDIMS, n_ops=st.integers(3, 5), dtype=DTYPES)
def test_add_parallel_many_operands(data, ndim, n_ops, dtype):
    """``add_parallel(a, b, c, ...)`` equals the sum of the operands run one by one."""
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    c_in = data.draw(st.integers(1, 6), label="c_in")
    groups = [data.draw(st.sampled_from(divisors(c_in)), label="g") for _ in range(n_ops)]
    lcm = math.lcm(*groups)
    c_out = lcm * data.draw(st.integers(1, max(1, 12 // lcm)), label="mult")
    stride = tuple(data.draw(st.integers(1, 2), label="s") for _ in range(ndim))
    # every operand has the same 2 * padding - dilation * (kernel - 1) per axis
    size_term = [data.draw(st.integers(-3, 1), label="c") for _ in range(ndim)]
    ops = []
    for g in groups:
        kernel, padding, dilation = [], [], []
        for c in size_term:
            k = data.draw(st.integers(1, 5), label="k")
            d = data.draw(st.integers(1, 2), label="d")
            if (c + d * (k - 1)) % 2:  # make it representable: dilation 1, one tap more or less
                d = 1
                if (c + k - 1) % 2:
                    k = k + 1 if k < 5 else k - 1
            kernel.append(k)
            dilation.append(d)
            padding.append((c + d * (k - 1)) // 2)
        has_bias = data.draw(st.booleans(), label="bias")
        ops.append(
            Layer(
                randn(gen, c_out, c_in // g, *kernel, dtype=dtype),
                randn(gen, c_out, dtype=dtype) if has_bias else None,
                stride,
                tuple(padding),
                tuple(dilation),
                g,
            )
        )
    sizes = [data.draw(st.integers(max(1, 1 - c), LIMIT[ndim]), label="n") for c in size_term]
    x = randn(gen, 2, c_in, *sizes, dtype=dtype)
    params = [op.params() for op in ops]
    result = add_parallel(*params)
    conn = sum(block_mask(p.out_channels, p.in_channels, p.groups) for p in params)
    assert result.groups == largest_block_groups((conn > 0).double())
    assert result.weight.dtype == dtype
    assert rel_err(ref_layer(x, result), sum(ref_layer(x, op) for op in ops)) <= TOL[dtype]
    # on the meta device: the same geometry, no weights summed (candidates are priced so)
    meta = add_parallel(*(p.to(device="meta") for p in params))
    assert meta.weight.is_meta
    assert meta.weight.shape == result.weight.shape
    assert (meta.bias is None) == (result.bias is None)
    geometry = ("stride", "padding", "dilation", "groups")
    assert [getattr(meta, g) for g in geometry] == [getattr(result, g) for g in geometry]


def test_add_parallel_repvgg_block():
    """RepVGG's three branches, dense 3x3 (padding 1) + 1x1 + identity, are one 3x3 conv."""
    conv3 = _layer(4, 4, (3, 3), padding=1)
    conv1 = _layer(4, 4, (1, 1), seed=1)
    result = add_parallel(conv3.params(), conv1.params(), identity(4, 2, dtype=torch.float64))
    assert (result.kernel_size, result.padding, result.groups) == ((3, 3), (1, 1), 1)
    x = randn(torch.Generator().manual_seed(0), 2, 4, 6, 5)
    ref = ref_layer(x, conv3) + ref_layer(x, conv1) + x
    assert rel_err(ref_layer(x, result), ref) <= 1e-9


def test_add_parallel_many_operands_rejects_any_incompatible_one():
    a, b = _layer(3, 3, (3, 3), padding=1).params(), _layer(3, 3, (1, 1)).params()
    with pytest.raises(ValueError, match="output sizes differ"):
        add_parallel(a, b, _layer(3, 3, (3, 3)).params())
    with pytest.raises(ValueError, match="strides"):
        add_parallel(a, b, _layer(3, 3, (1, 1), stride=2).params())
    with pytest.raises(ValueError, match="channels"):
        add_parallel(a, b, _layer(3, 2, (1, 1)).params())


@given(data=st.data(), ndim=st.sampled_from([1, 2, 3]), dtype=DTYPES)
def test_batchnorm_as_conv_is_the_batchnorm(data, ndim, dtype):
    """An eval-mode BatchNorm as a depthwise 1x1 conv computes F.batch_norm exactly."""
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    channels = data.draw(st.integers(1, 6), label="channels")
    stats, eps = draw_bn(data, gen, channels, dtype)
    conv = batchnorm_as_conv(ndim, eps=eps, **stats)
    assert (conv.kernel_size, conv.groups, conv.stride) == ((1,) * ndim, channels, (1,) * ndim)
    assert conv.weight.dtype == dtype
    assert conv.bias is not None
    x = randn(gen, 2, channels, *([4] * ndim), dtype=dtype)
    assert rel_err(ref_layer(x, conv), ref_bn(x, stats, eps)) <= TOL[dtype]
    # as a parallel branch it sums with a conv (a BatchNorm-only branch of a RepVGG block)
    other = _layer(channels, channels, (3,) * ndim, padding=1).params().to(dtype)
    both = add_parallel(other, conv)
    ref = ref_layer(x, other) + ref_bn(x, stats, eps)
    assert rel_err(ref_layer(x, both), ref) <= TOL[dtype]


def test_batchnorm_as_conv_rejects_bad_arguments():
    stats = {"var": torch.ones(3), "weight": None, "bias": None, "eps": 1e-5}
    with pytest.raises(ValueError, match="ndim"):
        batchnorm_as_conv(4, mean=torch.zeros(3), **stats)
    with pytest.raises(ValueError, match="1-d"):
        batchnorm_as_conv(2, mean=torch.zeros(3, 1), **stats)
    with pytest.raises(ValueError, match="shape"):
        batchnorm_as_conv(2, mean=torch.zeros(2), **stats)


# ------------------------------------------------------------------------------------------
# compose_linear
# ------------------------------------------------------------------------------------------


@given(
    seed=st.integers(0, 2**31 - 1),
    widths=st.lists(st.integers(1, 8), min_size=3, max_size=3),
    batch=st.lists(st.integers(1, 3), max_size=3),
    biases=st.tuples(st.booleans(), st.booleans()),
    dtype=DTYPES,
)
def test_compose_linear(seed, widths, batch, biases, dtype):
    gen = torch.Generator().manual_seed(seed)
    n0, n1, n2 = widths
    first = LinearParams(
        randn(gen, n1, n0, dtype=dtype), randn(gen, n1, dtype=dtype) if biases[0] else None
    )
    second = LinearParams(
        randn(gen, n2, n1, dtype=dtype), randn(gen, n2, dtype=dtype) if biases[1] else None
    )
    result = compose_linear(first, second)
    assert (result.bias is None) == (not any(biases))
    assert result.weight.dtype == dtype
    x = randn(gen, *batch, n0, dtype=dtype)
    ref = F.linear(F.linear(x, first.weight, first.bias), second.weight, second.bias)
    assert rel_err(F.linear(x, result.weight, result.bias), ref) <= TOL[dtype]


def test_compose_linear_rejects_mismatch():
    with pytest.raises(ValueError, match="in_features"):
        compose_linear(LinearParams(torch.ones(3, 2), None), LinearParams(torch.ones(3, 4), None))


def test_linear_params_round_trip():
    torch.manual_seed(0)
    module = nn.Linear(5, 3)
    params = LinearParams.from_module(module)
    assert (params.in_features, params.out_features) == (5, 3)
    x = torch.randn(2, 4, 5)
    assert torch.equal(params.apply(x), module(x))
    assert torch.equal(params.to_module()(x), module(x))
    assert params.weight.data_ptr() != module.weight.data_ptr()
    with pytest.raises(ValueError, match=r"nn\.Linear"):
        LinearParams.from_module(nn.Conv1d(1, 1, 1))
    with pytest.raises(ValueError, match="bias"):
        LinearParams(torch.ones(3, 2), torch.ones(2))


# ------------------------------------------------------------------------------------------
# ConvParams
# ------------------------------------------------------------------------------------------


@given(data=st.data(), ndim=st.sampled_from([1, 2, 3]))
def test_conv_params_module_round_trip(data, ndim):
    torch.manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    c_in = data.draw(st.integers(1, 6))
    g = data.draw(st.sampled_from(divisors(c_in)))
    c_out = g * data.draw(st.integers(1, max(1, 6 // g)))
    kernel = tuple(data.draw(st.integers(1, 3)) for _ in range(ndim))
    module = CONV_MODULE[ndim](
        c_in,
        c_out,
        kernel,
        stride=tuple(data.draw(st.integers(1, 2)) for _ in range(ndim)),
        padding=tuple(data.draw(st.integers(0, 2)) for _ in range(ndim)),
        dilation=tuple(data.draw(st.integers(1, 2)) for _ in range(ndim)),
        groups=g,
        bias=data.draw(st.booleans()),
        dtype=torch.float64,
    )
    params = ConvParams.from_module(module)
    assert (params.ndim, params.in_channels, params.out_channels) == (ndim, c_in, c_out)
    assert params.kernel_size == kernel
    assert params.weight.data_ptr() != module.weight.data_ptr()
    x = torch.randn(2, c_in, *([7] * ndim), dtype=torch.float64)
    ref = module(x)
    assert torch.equal(params.apply(x), ref)
    assert params.output_size(tuple(x.shape[2:])) == tuple(ref.shape[2:])
    back = params.to_module()
    assert type(back) is type(module)
    assert torch.equal(back(x), ref)
    # Dense expansion computes the same convolution without groups.
    dense = conv_to_dense_weight(params)
    assert dense.shape == (c_out, c_in, *kernel)
    dense_out = CONV[ndim](
        x, dense, params.bias, params.stride, params.padding, params.dilation, groups=1
    )
    assert rel_err(dense_out, ref) <= 1e-12
    as32 = params.to(torch.float32)
    assert as32.weight.dtype == torch.float32
    assert as32.groups == g


def test_conv_params_same_and_valid_padding():
    m = nn.Conv2d(2, 3, (3, 5), padding="same", dilation=(2, 1))
    p = ConvParams.from_module(m)
    assert p.padding == (2, 2)
    x = torch.randn(1, 2, 6, 7)
    assert torch.allclose(p.apply(x), m(x))
    assert ConvParams.from_module(nn.Conv1d(2, 3, 4, padding="valid")).padding == (0,)
    with pytest.raises(ValueError, match="asymmetric"):
        ConvParams.from_module(nn.Conv2d(2, 3, (3, 4), padding="same"))
    with pytest.raises(ValueError, match="padding_mode"):
        ConvParams.from_module(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="Conv"):
        ConvParams.from_module(nn.ConvTranspose2d(2, 3, 3))


def test_conv_params_negative_padding():
    p = _layer(2, 2, (3, 1), padding=(-1, -2)).params()
    x = randn(torch.Generator().manual_seed(0), 1, 2, 8, 9)
    assert p.output_size((8, 9)) == (4, 5)
    assert torch.equal(p.apply(x), ref_layer(x, p))
    with pytest.raises(ValueError, match="negative padding"):
        p.to_module()
    with pytest.raises(ValueError, match="too small"):
        p.output_size((4, 9))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weight": torch.ones(2, 2)}, "3, 4 or 5 dims"),
        ({"stride": (1,)}, "stride"),
        ({"stride": 0}, "stride"),
        ({"dilation": (1, 0)}, "dilation"),
        ({"padding": (1, 1.5)}, "padding"),
        ({"groups": 3}, "groups=3"),
        ({"groups": 0}, "groups"),
        ({"bias": torch.ones(3)}, "bias"),
    ],
)
def test_conv_params_validation(kwargs, match):
    args = {
        "weight": torch.ones(4, 2, 3, 3),
        "bias": None,
        "stride": (1, 1),
        "padding": (0, 0),
        "dilation": (1, 1),
        "groups": 2,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ConvParams(**args)


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_identity(ndim):
    skip = identity(3, ndim, dtype=torch.float64)
    assert (skip.groups, skip.kernel_size, skip.bias) == (3, (1,) * ndim, None)
    x = randn(torch.Generator().manual_seed(0), 2, 3, *([6] * ndim))
    assert torch.equal(ref_layer(x, skip), x)
    cropped = identity(3, ndim, padding=-1, dtype=torch.float64)
    assert torch.equal(ref_layer(x, cropped), x[(..., *([slice(1, -1)] * ndim))])
    with pytest.raises(ValueError, match="ndim"):
        identity(3, 4)
