"""Channel structure of grouped convolutions, and a grouped weight as a dense one.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fxcompress.maths.params import ConvParams

__all__ = ["conv_to_dense_weight", "embed_channels", "intervals", "largest_groups"]


# --------------------------------------------------------------------------------------------
# Channel structure.
#
# A grouped conv connects output channel o to the contiguous input interval
# [lo(o), lo(o) + C_in/groups) with lo(o) = (o // (C_out/groups)) * (C_in/groups). Sums and
# compositions of such layers still connect each output to one contiguous interval (the union of
# overlapping intervals, resp. of consecutive ones), so (lo, hi) per output channel describes the
# structural connectivity exactly, and the largest block-diagonal `groups` follows from it.
# --------------------------------------------------------------------------------------------


def intervals(p: ConvParams) -> tuple[Tensor, Tensor]:
    """Per output channel, the half-open interval of input channels it is connected to."""
    cout_g = p.out_channels // p.groups
    cin_g = p.in_channels // p.groups
    lo = (torch.arange(p.out_channels) // cout_g) * cin_g
    return lo, lo + cin_g


def largest_groups(lo: Tensor, hi: Tensor, in_channels: int) -> int:
    """Largest ``g`` such that every output's interval lies inside its diagonal block."""
    out_channels = lo.numel()
    common = math.gcd(out_channels, in_channels)
    outs = torch.arange(out_channels)
    for g in sorted((g for g in range(1, common + 1) if common % g == 0), reverse=True):
        block = outs // (out_channels // g)
        width = in_channels // g
        if bool(((lo >= block * width) & (hi <= (block + 1) * width)).all()):
            return g
    return 1  # pragma: no cover - g = 1 always satisfies the test


def embed_channels(w: Tensor, lo: Tensor, cin_r: int) -> Tensor:
    """Place ``w`` (``C, cin_g, *k``) into ``(C, cin_r, *k)`` at in-channel offsets ``lo % cin_r``.

    ``lo[c]`` is the first input channel of channel ``c``; the caller guarantees that
    ``[lo, lo + cin_g)`` does not cross a multiple of ``cin_r``.
    """
    rows, cin_g = int(w.shape[0]), int(w.shape[1])
    if cin_g == cin_r:
        return w
    offset = lo % cin_r
    index = offset[:, None] + torch.arange(cin_g)[None, :]
    index = index.reshape(rows, cin_g, *([1] * (w.dim() - 2))).expand_as(w).to(w.device)
    out = torch.zeros((rows, cin_r, *w.shape[2:]), dtype=w.dtype, device=w.device)
    return out.scatter(1, index, w)


def conv_to_dense_weight(p: ConvParams) -> Tensor:
    """The ``(C_out, C_in, *kernel)`` weight of ``p`` as an ungrouped convolution.

    Structurally absent (cross-group) connections are zero; dtype and device are unchanged.

    Examples
    --------
    >>> p = ConvParams(torch.ones(2, 1, 1), None, stride=1, padding=0, dilation=1, groups=2)
    >>> conv_to_dense_weight(p)[..., 0]
    tensor([[1., 0.],
            [0., 1.]])
    """
    lo, _ = intervals(p)
    return embed_channels(p.weight.detach().clone(), lo, p.in_channels)
