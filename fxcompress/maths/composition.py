"""Composition of two layers into one, and sums of parallel layers into one.
"""

from __future__ import annotations

import itertools
import math

import torch

from fxcompress.errors import InvalidArgument
from fxcompress.maths.channels import embed_channels, intervals, largest_groups
from fxcompress.maths.params import ConvParams, LinearParams, f64, spatial_dims

__all__ = ["add_parallel", "compose", "compose_linear"]


# --------------------------------------------------------------------------------------------
# Composition and parallel sums.
# --------------------------------------------------------------------------------------------


def compose(first: ConvParams, second: ConvParams) -> ConvParams:
    """One convolution equal to ``second(first(x))`` for every input ``x``.

    Per axis, with ``first = (k1, s1, p1, d1)`` and ``second = (k2, s2, p2, d2)``, the result
    has stride ``s1 * s2``, padding ``p1 + s1 * p2`` and taps at offsets
    ``d1 * t + s1 * d2 * u``; its dilation is the gcd of those offsets (so
    ``gcd(d1, s1 * d2)``, where an axis with a single tap does not constrain it). The weight is
    ``W[o, i] = sum_{m, u} W2[o, m, u] * shift(W1[m, i], s1 * d2 * u)`` and the bias is
    ``b2 + sum_{m, u} W2[o, m, u] * b1[m]`` (None only if both biases are None).
    The result's ``groups`` is the largest block-diagonal structure of the composed channel
    connectivity: depthwise after depthwise stays depthwise, dense anywhere makes it dense.

    Parameters
    ----------
    first : ConvParams
        Any padding, including negative (a crop).
    second : ConvParams
        ``second.in_channels == first.out_channels`` and the same number of spatial axes.
        ``padding <= 0`` (a crop) on every axis, or ``padding > 0`` on an axis where ``first``
        has no bias and ``first.padding >= first.dilation * (first.kernel_size - 1)``: then
        every intermediate position that ``second`` pads is one that ``first`` computes as zero
        from padding alone, so the padding moves onto the input exactly.

    Raises
    ------
    ValueError
        If ``second`` has a positive padding other than in the case above: its zeros would be
        padded onto the intermediate map, and such a zero is not a convolution of the input, so
        no single convolution is equal. Also for mismatched channels or numbers of axes.

    Examples
    --------
    >>> f64 = torch.float64
    >>> a = ConvParams(torch.randn(4, 1, 3, 3, dtype=f64), torch.randn(4, dtype=f64), 1, 1, 1, 4)
    >>> b = ConvParams(torch.randn(4, 1, 3, 3, dtype=f64), None, 2, 0, 1, groups=4)
    >>> c = compose(a, b)
    >>> c.kernel_size, c.stride, c.padding, c.groups
    ((5, 5), (2, 2), (1, 1), 4)
    >>> x = torch.randn(1, 4, 9, 9, dtype=f64)
    >>> torch.allclose(c.apply(x), b.apply(a.apply(x)))
    True
    """
    if first.ndim != second.ndim:
        raise InvalidArgument(f"cannot compose a {first.ndim}-d conv with a {second.ndim}-d conv")
    if first.out_channels != second.in_channels:
        raise InvalidArgument(
            f"first.out_channels={first.out_channels} != second.in_channels={second.in_channels}"
        )
    for ax, pad2 in enumerate(second.padding):
        reach = first.dilation[ax] * (first.kernel_size[ax] - 1)
        if pad2 > 0 and (first.bias is not None or first.padding[ax] < reach):
            why = "has a bias" if first.bias is not None else f"pads {first.padding[ax]} < {reach}"
            raise InvalidArgument(
                f"second conv has padding {second.padding}: zero padding of the intermediate map "
                f"is not representable by one convolution of the input (the first conv {why}, "
                "so it does not compute zeros there); use padding <= 0 on the second conv"
            )
    ndim = first.ndim
    k1, k2 = first.kernel_size, second.kernel_size
    stride, padding, dilation, ratio1, ratio2, kernel = [], [], [], [], [], []
    for ax in range(ndim):
        s1, d1, d2 = first.stride[ax], first.dilation[ax], second.dilation[ax]
        step1 = d1 if k1[ax] > 1 else 0
        step2 = s1 * d2 if k2[ax] > 1 else 0
        dil = math.gcd(step1, step2) or 1
        stride.append(s1 * second.stride[ax])
        padding.append(first.padding[ax] + s1 * second.padding[ax])
        dilation.append(dil)
        ratio1.append(step1 // dil)
        ratio2.append(step2 // dil)
        kernel.append(ratio1[-1] * (k1[ax] - 1) + ratio2[-1] * (k2[ax] - 1) + 1)

    # Channel structure of the result.
    c_in, c_mid, c_out = first.in_channels, first.out_channels, second.out_channels
    lo1, hi1 = intervals(first)
    g2 = second.groups
    mid_g = c_mid // g2
    mid_lo = (torch.arange(c_out) // (c_out // g2)) * mid_g
    lo, hi = lo1[mid_lo], hi1[mid_lo + mid_g - 1]
    groups = largest_groups(lo, hi, c_in)
    cin_r = c_in // groups

    dtype, device = first.weight.dtype, first.weight.device
    w1 = embed_channels(f64(first.weight), lo1, cin_r)  # (C_mid, cin_r, *k1)
    w2 = f64(second.weight).to(device)  # (C_out, C_mid/g2, *k2)
    w1_blocks = w1.reshape(g2, mid_g, -1)
    out = torch.zeros((c_out, cin_r, *kernel), dtype=torch.float64, device=device)
    for taps in itertools.product(*(range(k) for k in k2)):
        w2_tap = w2[(slice(None), slice(None), *taps)].reshape(g2, c_out // g2, mid_g)
        term = torch.bmm(w2_tap, w1_blocks).reshape(c_out, cin_r, *k1)
        where = tuple(
            slice(u * r2, u * r2 + r1 * (k - 1) + 1, max(r1, 1))
            for u, r1, r2, k in zip(taps, ratio1, ratio2, k1)
        )
        out[(slice(None), slice(None), *where)] += term

    bias = None
    if first.bias is not None or second.bias is not None:
        bias = torch.zeros(c_out, dtype=torch.float64, device=device)
        if second.bias is not None:
            bias += f64(second.bias).to(device)
        if first.bias is not None:
            w2_sum = w2.sum(dim=spatial_dims(ndim))  # (C_out, C_mid/g2)
            b1 = f64(first.bias).to(device)[mid_lo[:, None] + torch.arange(mid_g)[None, :]]
            bias += (w2_sum * b1).sum(dim=1)
        bias = bias.to(dtype)
    return ConvParams(out.to(dtype), bias, tuple(stride), tuple(padding), tuple(dilation), groups)


def add_parallel(a: ConvParams, b: ConvParams, *more: ConvParams) -> ConvParams:
    """One convolution equal to ``a(x) + b(x) + ...`` for every input ``x``.

    Per axis, operand ``j`` reads offsets ``-p_j + t * d_j`` relative to ``i * stride``; all tap
    sets are embedded in one kernel with padding ``max_j p_j`` and dilation the gcd of the
    dilations and of the offset differences (an axis with a single tap does not constrain it).
    ``groups`` is the largest block-diagonal structure containing every operand's channel
    connectivity. The sum is taken in float64 over all operands at once (a structural
    re-parameterisation such as RepVGG's ``conv3x3 + conv1x1 + BN`` is one call), then cast to
    the dtype of ``a``. On the ``meta`` device only the geometry is computed (to price a
    candidate without summing weights).

    Raises
    ------
    ValueError
        If the channels, the number of axes or the strides differ, or if the operands do not
        produce the same output size for every input size, i.e. ``2 * p - d * (k - 1)`` differs
        on some axis.

    Examples
    --------
    Fold a residual skip into a centred 3x3 convolution:

    >>> conv = ConvParams(torch.randn(3, 3, 3, 3, dtype=torch.float64), None, 1, 1, 1)
    >>> from fxcompress.maths import identity
    >>> skip = add_parallel(conv, identity(3, 2))
    >>> skip.kernel_size, skip.padding, skip.groups
    ((3, 3), (1, 1), 1)
    >>> x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    >>> torch.allclose(skip.apply(x), conv.apply(x) + x)
    True

    A RepVGG block (3x3 + 1x1 + identity) is one 3x3 convolution:

    >>> one = ConvParams(torch.randn(3, 3, 1, 1, dtype=torch.float64), None, 1, 0, 1)
    >>> rep = add_parallel(conv, one, identity(3, 2, dtype=torch.float64))
    >>> torch.allclose(rep.apply(x), conv.apply(x) + one.apply(x) + x)
    True
    """
    operands = (a, b, *more)
    for p in operands[1:]:
        if p.ndim != a.ndim:
            raise InvalidArgument(f"cannot add a {a.ndim}-d conv and a {p.ndim}-d conv")
        if (p.in_channels, p.out_channels) != (a.in_channels, a.out_channels):
            raise InvalidArgument(
                f"channels differ: {a.in_channels}->{a.out_channels} vs "
                f"{p.in_channels}->{p.out_channels}"
            )
        if p.stride != a.stride:
            raise InvalidArgument(f"strides differ: {a.stride} vs {p.stride}")
    ndim = a.ndim
    padding, dilation, kernel = [], [], []
    places: list[list[tuple[int, int, int]]] = [[] for _ in operands]
    for ax in range(ndim):
        for p in operands[1:]:
            size_a = 2 * a.padding[ax] - a.dilation[ax] * (a.kernel_size[ax] - 1)
            size_p = 2 * p.padding[ax] - p.dilation[ax] * (p.kernel_size[ax] - 1)
            if size_a != size_p:
                raise InvalidArgument(
                    f"output sizes differ on axis {ax}: 2*padding - dilation*(kernel-1) is "
                    f"{size_a} vs {size_p} (padding {a.padding[ax]} vs {p.padding[ax]}, "
                    f"dilation {a.dilation[ax]} vs {p.dilation[ax]}, kernel "
                    f"{a.kernel_size[ax]} vs {p.kernel_size[ax]})"
                )
        pad = max(p.padding[ax] for p in operands)
        steps = [p.dilation[ax] if p.kernel_size[ax] > 1 else 0 for p in operands]
        dil = 0
        for p, step in zip(operands, steps):
            dil = math.gcd(dil, math.gcd(step, pad - p.padding[ax]))
        dil = dil or 1
        padding.append(pad)
        dilation.append(dil)
        extent = max(
            pad - p.padding[ax] + p.dilation[ax] * (p.kernel_size[ax] - 1) for p in operands
        )
        kernel.append(extent // dil + 1)
        for j, (p, step) in enumerate(zip(operands, steps)):
            places[j].append(((pad - p.padding[ax]) // dil, step // dil, p.kernel_size[ax]))

    lo, hi = intervals(a)
    for p in operands[1:]:
        lo_p, hi_p = intervals(p)
        lo, hi = torch.minimum(lo, lo_p), torch.maximum(hi, hi_p)
    groups = largest_groups(lo, hi, a.in_channels)
    cin_r = a.in_channels // groups

    dtype, device = a.weight.dtype, a.weight.device
    if device.type == "meta":  # geometry only (e.g. to price candidates): nothing to sum
        return ConvParams(
            torch.empty((a.out_channels, cin_r, *kernel), dtype=dtype, device=device),
            None
            if all(p.bias is None for p in operands)
            else torch.empty(a.out_channels, dtype=dtype, device=device),
            a.stride,
            tuple(padding),
            tuple(dilation),
            groups,
        )
    out = torch.zeros((a.out_channels, cin_r, *kernel), dtype=torch.float64, device=device)
    for p, place in zip(operands, places):
        lo_p, _ = intervals(p)
        w = embed_channels(f64(p.weight).to(device), lo_p, cin_r)
        where = tuple(
            slice(start, start + step * (k - 1) + 1, max(step, 1)) for start, step, k in place
        )
        out[(slice(None), slice(None), *where)] += w

    bias = None
    if any(p.bias is not None for p in operands):
        bias = torch.zeros(a.out_channels, dtype=torch.float64, device=device)
        for p in operands:
            if p.bias is not None:
                bias += f64(p.bias).to(device)
        bias = bias.to(dtype)
    return ConvParams(out.to(dtype), bias, a.stride, tuple(padding), tuple(dilation), groups)


def compose_linear(first: LinearParams, second: LinearParams) -> LinearParams:
    """One linear layer equal to ``second(first(x))``: ``W = W2 @ W1``, ``b = W2 @ b1 + b2``.

    Raises
    ------
    ValueError
        If ``first.out_features != second.in_features``.

    Examples
    --------
    >>> f = LinearParams(torch.tensor([[1.0, 2.0]]), torch.tensor([1.0]))
    >>> s = LinearParams(torch.tensor([[3.0], [4.0]]), None)
    >>> c = compose_linear(f, s)
    >>> c.weight.tolist(), c.bias.tolist()
    ([[3.0, 6.0], [4.0, 8.0]], [3.0, 4.0])
    """
    if first.out_features != second.in_features:
        raise InvalidArgument(
            f"first.out_features={first.out_features} != second.in_features={second.in_features}"
        )
    dtype, device = first.weight.dtype, first.weight.device
    w1 = f64(first.weight)
    w2 = f64(second.weight).to(device)
    bias = None
    if first.bias is not None or second.bias is not None:
        bias = torch.zeros(second.out_features, dtype=torch.float64, device=device)
        if first.bias is not None:
            bias += w2 @ f64(first.bias)
        if second.bias is not None:
            bias += f64(second.bias).to(device)
        bias = bias.to(dtype)
    return LinearParams((w2 @ w1).to(dtype), bias)
