"""Training a prepared model: the collapse penalty and the slopes it pulls towards 1.

Step 2 of LayerCollapse (see :mod:`.pipeline`): train with ``loss + regularizer(prepared)``,
optionally with :func:`slope_parameters` in their own optimiser group.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fxcompress.collapse.maths import Blend
from fxcompress.errors import InvalidArgument

__all__ = ["blends", "regularizer", "slope_parameters", "slopes"]


def blends(gm: nn.Module) -> list[tuple[str, Blend]]:
    """``(name, module)`` of every :class:`Blend` of ``gm``."""
    return [(n, m) for n, m in gm.named_modules() if isinstance(m, Blend)]


def regularizer(prepared: nn.Module, strength: float = 1.0, *, weighting: str = "params") -> Tensor:
    """The collapse penalty ``strength * sum_i w_i (1 - a_i)^2`` over the blends' slopes.

    Add it to the training loss. With ``weighting="params"`` (default) ``w_i`` is the number of
    parameters collapsing site ``i`` saves, divided by the largest such saving (so the most
    rewarding site has weight 1 and sites that would not shrink have weight 0); with
    ``"uniform"`` every ``w_i`` is 1. ``strength`` is in units of the training loss: at slope
    ``a`` a site of weight 1 costs ``strength * (1 - a)^2``, so a slope stops where the task
    loss's gradient ``dL/da`` balances ``2 * strength * (1 - a)``: larger values push harder
    and cost more accuracy. In ``benchmarks/bench_collapse.py`` (cross-entropy losses, slopes
    in their own Adam group at lr 0.03) ``strength=1`` brought all four MLP slopes of a small
    transformer LM within 0.05 of 1 in 400 steps, while the two ReLUs of a CNN's MLP head,
    which make the whole head linear together, needed ``strength=4``.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from fxcompress.collapse import prepare
    >>> p = prepare(nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 4)), torch.ones(1, 4))
    >>> float(regularizer(p, 0.5).detach())
    0.5
    """
    if weighting not in ("params", "uniform"):
        raise InvalidArgument(f"weighting must be 'params' or 'uniform', got {weighting!r}")
    if not strength >= 0:
        raise InvalidArgument(f"strength must be >= 0, got {strength!r}")
    found = blends(prepared)
    if not found:
        raise InvalidArgument(
            "the module has no Blend sites; pass the result of fxcompress.collapse.prepare"
        )
    terms = [
        (b.penalty_weight if weighting == "params" else 1.0) * (1 - b.slope) ** 2
        for _, b in found
    ]
    return strength * torch.stack([torch.as_tensor(t) for t in terms]).sum()


def slope_parameters(prepared: nn.Module) -> list[nn.Parameter]:
    """The slope parameters of every :class:`Blend` (e.g. for their own optimiser group)."""
    return [b.slope for _, b in blends(prepared)]


def slopes(prepared: nn.Module) -> dict[str, float]:
    """The current slope of every :class:`Blend`, by module name."""
    return {n: float(b.slope.detach()) for n, b in blends(prepared)}
