"""MAC counts of the report: hooked layers still count, unbatched convs are counted per sample."""

from __future__ import annotations

import math

import torch
from torch import nn

from fxcompress.graph.capture import capture
from fxcompress.report import count_macs


def _conv_macs(conv: nn.Conv1d, out_shape: tuple[int, ...]) -> int:
    return math.prod(out_shape) * conv.in_channels // conv.groups * math.prod(conv.kernel_size)


def test_a_hooked_conv_is_counted_like_the_conv_inside():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    x = torch.randn(2, 3, 8, 8)
    plain = count_macs(capture(model, (x,)))
    model[0].register_forward_hook(lambda m, i, o: o * 2)
    hooked = count_macs(capture(model, (x,)))
    assert plain == _conv_macs(model[0], (2, 4, 6, 6))
    assert hooked == plain


def test_an_unbatched_conv_is_counted_from_its_output_shape():
    model = nn.Sequential(nn.Conv1d(4, 8, 3)).eval()
    x = torch.randn(4, 10)  # no batch axis: the output is (8, 8)
    assert count_macs(capture(model, (x,))) == _conv_macs(model[0], (8, 8))
