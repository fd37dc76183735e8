"""The grouped linear map used as the encoder of a decomposed ``nn.Linear``."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["GroupedLinear"]


class GroupedLinear(nn.Module):
    """``k`` independent linear maps (no bias), each from ``in_features / k`` consecutive inputs
    to ``out_per_group`` outputs; the outputs of group ``i`` are ``[i * out_per_group, ...)``.

    It is the linear-layer counterpart of a grouped 1x1 convolution: ``weight`` has the same
    ``(k * out_per_group, in_features / k)`` layout as that convolution's weight without its
    kernel axes. Inputs may have any number of leading dimensions.

    Examples
    --------
    >>> m = GroupedLinear(6, 2, groups=3)
    >>> x = torch.randn(4, 5, 6)
    >>> ref = torch.nn.functional.conv1d(x.reshape(-1, 6, 1), m.weight[..., None], groups=3)
    >>> torch.allclose(m(x), ref.reshape(4, 5, 6))
    True
    """

    def __init__(
        self,
        in_features: int,
        out_per_group: int,
        *,
        groups: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if in_features % groups:
            raise ValueError(f"groups={groups} does not divide in_features={in_features}")
        self.in_features = in_features
        self.out_per_group = out_per_group
        self.groups = groups
        self.weight = nn.Parameter(
            torch.empty(groups * out_per_group, in_features // groups, device=device, dtype=dtype)
        )
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, j = self.groups, self.out_per_group
        w = self.weight.reshape(g, j, self.in_features // g)
        y = torch.einsum("...gi,gji->...gj", x.unflatten(-1, (g, self.in_features // g)), w)
        return y.flatten(-2)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_per_group={self.out_per_group}, " + (
            f"groups={self.groups}"
        )
