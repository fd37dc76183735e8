"""Global rank allocation under a budget: pure Python, no torch.

Every layer offers a few *options* (a ``(k, j)`` decomposition) besides staying dense. Each option
has a *quality key* (higher is better) and an additive *cost* (parameters, MACs or predicted
milliseconds). An allocation at level ``q`` gives each layer its cheapest option whose key is at
least ``q``; staying dense always qualifies (its key is ``+inf``). Lowering ``q`` can only lower
the total cost, so the best level meeting a budget is found exactly by bisection over the finite
set of keys.

With ``key = -error`` this is ALDS's min-max problem, solved exactly: no allocation within the
budget has a smaller maximum error than the one returned (each layer takes the cheapest option
meeting the level, so any allocation with maximum error ``e`` costs at least the level-``-e`` one).
The baselines use other keys: the kept rank fraction ``j / max_rank`` (uniform) and minus the
discarded spectral energy (SVD energy threshold).

Ties are broken deterministically: among options of equal cost, the higher key, then the order
given.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

from fxcompress.errors import InfeasibleBudget, InvalidArgument

__all__ = ["Allocation", "LayerOptions", "Option", "allocate"]


@dataclass(frozen=True)
class Option:
    """One decomposition of a layer: ``k`` groups of rank ``j``, its quality ``key`` and cost."""

    k: int
    j: int
    key: float
    cost: float


@dataclass(frozen=True)
class LayerOptions:
    """A layer's ``dense`` cost and its decomposition ``options`` (any order)."""

    name: str
    dense: float
    options: tuple[Option, ...]


@dataclass(frozen=True)
class Allocation:
    """The chosen option per layer (``None``: dense), the level reached and the total cost.

    ``level`` is ``+inf`` when every layer stays dense.
    """

    choices: tuple[Option | None, ...]
    level: float
    cost: float


class _Menu:
    """One layer's options by decreasing key, with the running cheapest (for O(log n) lookups)."""

    def __init__(self, layer: LayerOptions) -> None:
        ranked = sorted(enumerate(layer.options), key=lambda io: (-io[1].key, io[1].cost, io[0]))
        self.neg_keys = [-o.key for _, o in ranked]
        self.best: list[Option | None] = []
        cheapest: Option | None = None
        cheapest_cost = layer.dense
        for _, o in ranked:
            if o.cost < cheapest_cost:
                cheapest, cheapest_cost = o, o.cost
            self.best.append(cheapest)
        self.dense = layer.dense

    def pick(self, level: float) -> tuple[Option | None, float]:
        """The cheapest option with ``key >= level`` (``None`` = dense) and its cost."""
        n = bisect.bisect_right(self.neg_keys, -level)
        choice = self.best[n - 1] if n else None
        return choice, (self.dense if choice is None else choice.cost)


def _check(layers: Sequence[LayerOptions], budget: float, fixed: float) -> None:
    for name, value in (("budget", budget), ("fixed", fixed)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise InvalidArgument(f"{name} must be a number, got {name}={value!r}")
    for layer in layers:
        if not isinstance(layer, LayerOptions):
            raise InvalidArgument(f"layers must be LayerOptions, got {type(layer).__name__}")
        for o in layer.options:
            if math.isnan(o.key) or math.isnan(o.cost):
                raise InvalidArgument(f"option {o} of layer {layer.name!r} has a NaN key or cost")


def allocate(layers: Sequence[LayerOptions], budget: float, *, fixed: float = 0.0) -> Allocation:
    """The highest level whose allocation costs at most ``budget`` (with ``fixed`` added).

    Parameters
    ----------
    layers : sequence of LayerOptions
    budget : float
        Upper bound of ``fixed + sum of the chosen costs``.
    fixed : float
        Cost of everything that is not a candidate layer.

    Returns
    -------
    Allocation

    Raises
    ------
    InfeasibleBudget
        If even the cheapest option of every layer exceeds the budget; ``minimum`` is the
        least total cost reachable.

    Examples
    --------
    >>> a = LayerOptions("a", 100, (Option(1, 1, -0.5, 20), Option(1, 2, -0.2, 40)))
    >>> b = LayerOptions("b", 100, (Option(1, 1, -0.4, 30), Option(1, 3, -0.1, 60)))
    >>> alloc = allocate([a, b], 110)
    >>> [(c.j if c else None) for c in alloc.choices], alloc.level, alloc.cost
    ([2, 3], -0.2, 100.0)
    >>> allocate([a, b], 1000).choices
    (None, None)
    """
    _check(layers, budget, fixed)
    menus = [_Menu(layer) for layer in layers]

    def total(level: float) -> float:
        return fixed + sum(m.pick(level)[1] for m in menus)

    if total(math.inf) <= budget:
        return Allocation(tuple(None for _ in layers), math.inf, total(math.inf))
    keys = sorted({o.key for layer in layers for o in layer.options}, reverse=True)
    if not keys or total(keys[-1]) > budget:
        least = total(keys[-1]) if keys else total(math.inf)
        raise InfeasibleBudget(
            f"the budget {budget:g} is below the least cost reachable, {least:g}", minimum=least
        )
    lo, hi = 0, len(keys) - 1  # the answer is the first key (highest level) that is feasible
    while lo < hi:
        mid = (lo + hi) // 2
        if total(keys[mid]) <= budget:
            hi = mid
        else:
            lo = mid + 1
    level = keys[lo]
    choices = tuple(m.pick(level)[0] for m in menus)
    return Allocation(choices, level, total(level))
