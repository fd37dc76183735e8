"""Small modules that fxcompress inserts into rewritten graphs.

They are plain ``nn.Module`` subclasses with tensor-only forwards, so graphs that contain them
still pass ``torch.export``, ``torch.compile`` and ONNX export.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Pad"]


class Pad(nn.Module):
    """Pad (positive amounts) or crop (negative amounts) the trailing spatial axes symmetrically.

    Parameters
    ----------
    amounts : tuple of int
        One amount per spatial axis, in axis order (for a 4-D NCHW tensor: ``(pad_h, pad_w)``).
        Positive values add that many zeros on both sides, negative values remove that many
        positions from both sides.

    Examples
    --------
    >>> import torch
    >>> Pad((-1, 2))(torch.ones(1, 1, 4, 4)).shape
    torch.Size([1, 1, 2, 8])
    >>> torch.fx.symbolic_trace(Pad((-1, 0)))(torch.ones(2, 3, 5)).shape
    torch.Size([2, 1, 5])
    """

    def __init__(self, amounts: tuple[int, ...]) -> None:
        super().__init__()
        self.amounts = tuple(int(a) for a in amounts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # written with constants only (no x.dim()), so that torch.fx can trace through it
        if any(a < 0 for a in self.amounts):
            crop = tuple(slice(-a, a) if a < 0 else slice(None) for a in self.amounts)
            x = x[(Ellipsis, *crop)]
        if any(a > 0 for a in self.amounts):
            pads: list[int] = []
            for a in reversed(self.amounts):
                pads += [max(a, 0), max(a, 0)]
            x = F.pad(x, pads)
        return x

    def extra_repr(self) -> str:
        return f"amounts={self.amounts}"
