"""The dynamic programme over time bins, its back-tracking, and :func:`solve`.

See the package docstring for the algorithm and its guarantees.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from fxcompress.depth.planner.checks import check_budget, integer
from fxcompress.depth.planner.extremes import Extremes, find_extremes
from fxcompress.depth.planner.index import Index, PlacedChoice
from fxcompress.depth.planner.problem import (
    Problem,
    Solution,
    index_of,
    make_solution,
)
from fxcompress.errors import InfeasibleBudget

__all__ = [
    "TIE_RTOL",
    "Tables",
    "backtrack",
    "best_bins",
    "bin_counts",
    "breakpoints",
    "full_range",
    "min_bins",
    "run_dp",
    "solve",
    "time_grid",
]

TIE_RTOL = 1e-12
"""Damages within this relative distance of the optimum count as ties."""

_RETRIES = 4
"""How many times :func:`solve` doubles the resolution before falling back."""


def bin_counts(idx: Index, width: Fraction, cap: int) -> list[int]:
    """Bins ``ceil(latency / width)`` of every option's own latency, in exact arithmetic.

    ``cap + 1`` marks the options that can never fit.
    """
    limit = cap + 1
    approx = float(width)
    out = []
    for option in idx.options:
        latency = option.choice.latency
        if latency == 0:
            out.append(0)
        elif width == 0 or (approx > 0 and latency / approx > 2 * limit):
            out.append(limit)
        else:
            num, den = latency.as_integer_ratio()
            # ceil((num / den) / (width.numerator / width.denominator)), on integers
            out.append(min(limit, -((-num * width.denominator) // (den * width.numerator))))
    return out


def min_bins(idx: Index, bins: Sequence[int], cap: int) -> float:
    """The fewest bins of any configuration (``inf`` if none uses at most ``cap`` per option)."""
    least: dict[str, float] = {}
    for name in idx.order:
        length = idx.chains[name].length
        best = [math.inf] * length + [0.0]
        for k in range(length - 1, -1, -1):
            for stop, options in idx.steps[name][k]:
                for option in options:
                    b = bins[option.uid]
                    if b <= cap:
                        total = b + sum(least[s] for s in option.subs) + best[stop]
                        best[k] = min(best[k], total)
        least[name] = best[0]
    return sum((least[r] for r in idx.roots), 0.0)


def breakpoints(profile: np.ndarray) -> np.ndarray:
    """Indices where a non-increasing profile is finite and strictly below its predecessor."""
    drop = np.empty(profile.shape[0], dtype=bool)
    drop[0] = True
    np.less(profile[1:], profile[:-1], out=drop[1:])
    return np.flatnonzero(drop & np.isfinite(profile))


def _minplus(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Min-plus convolution ``c[t] = min_s a[s] + b[t - s]`` of two non-increasing profiles.

    Only the breakpoints of the operand with fewer of them are shifted: between two breakpoints
    ``a`` is constant, and a larger shift of a non-increasing ``b`` cannot help.
    """
    size = a.shape[0]
    shifts = breakpoints(a)
    other = breakpoints(b)
    if other.shape[0] < shifts.shape[0]:
        a, b, shifts = b, a, other
    out = np.full(size, np.inf)
    for s in shifts.tolist():
        view = out[s:]
        np.minimum(view, a[s] + b[: size - s], out=view)
    return out


@dataclass(frozen=True, eq=False)
class Tables:
    """Everything the back-tracking needs, for one bin width and capacity."""

    idx: Index
    bins: list[int]
    rows: dict[str, list[np.ndarray]]  # rows[name][k][t]: least damage of positions k..n in t bins
    own: dict[int, np.ndarray]  # per option with sub chains: its own cost plus its sub chains'
    folds: dict[int, list[np.ndarray]]  # per option with subs: prefix min-plus folds of the subs
    root_folds: list[np.ndarray]  # prefix min-plus folds of the root profiles

    @property
    def final(self) -> np.ndarray:
        return self.root_folds[-1]


def _fold(profiles: Sequence[np.ndarray]) -> list[np.ndarray]:
    folds = [profiles[0]]
    for profile in profiles[1:]:
        folds.append(_minplus(folds[-1], profile))
    return folds


def run_dp(idx: Index, bins: list[int], cap: int) -> Tables:
    size = cap + 1
    rows: dict[str, list[np.ndarray]] = {}
    own: dict[int, np.ndarray] = {}
    folds: dict[int, list[np.ndarray]] = {}
    unreachable = np.full(size, np.inf)
    for name in idx.order:
        length = idx.chains[name].length
        table: list[np.ndarray] = [unreachable] * length + [np.zeros(size)]
        for k in range(length - 1, -1, -1):
            acc = np.full(size, np.inf)
            for stop, options in idx.steps[name][k]:
                rest = table[stop]
                if not math.isfinite(rest[-1]):
                    continue
                nested: np.ndarray | None = None
                for option in options:
                    b = bins[option.uid]
                    if b > cap:
                        continue
                    if not option.subs:
                        view = acc[b:]
                        np.minimum(view, option.choice.damage + rest[: size - b], out=view)
                        continue
                    chain_folds = _fold([rows[s][0] for s in option.subs])
                    cost = np.full(size, np.inf)
                    cost[b:] = option.choice.damage + chain_folds[-1][: size - b]
                    folds[option.uid] = chain_folds
                    own[option.uid] = cost
                    nested = cost if nested is None else np.minimum(nested, cost)
                if nested is not None:
                    np.minimum(acc, _minplus(nested, rest), out=acc)
            table[k] = acc
        rows[name] = table
    root_folds = _fold([rows[r][0] for r in idx.roots]) if idx.roots else [np.zeros(size)]
    return Tables(idx, bins, rows, own, folds, root_folds)


def _first_hit(left: np.ndarray, right: np.ndarray, t: int, target: float) -> int:
    """Smallest ``s <= t`` with ``left[s] + right[t - s] == target`` (the value the DP stored)."""
    hits = np.flatnonzero(left[: t + 1] + right[t::-1] == target)
    return int(hits[0]) if hits.shape[0] else -1


def _track_folds(
    tables: Tables, names: Sequence[str], folds: Sequence[np.ndarray], t: int, out: list
) -> None:
    for i in range(len(names) - 1, 0, -1):
        s = _first_hit(folds[i - 1], tables.rows[names[i]][0], t, folds[i][t])
        if s < 0:  # pragma: no cover - the DP stored one of these sums
            raise AssertionError("planner back-tracking lost the optimum")
        _track_chain(tables, names[i], t - s, out)
        t = s
    _track_chain(tables, names[0], t, out)


def _track_chain(tables: Tables, name: str, t: int, out: list) -> None:
    table = tables.rows[name]
    k = 0
    while k < len(table) - 1:
        target = table[k][t]
        for stop, options in tables.idx.steps[name][k]:
            rest = table[stop]
            if not math.isfinite(rest[-1]):  # skipped by the DP as well
                continue
            for option in options:
                b = tables.bins[option.uid]
                if b > t:
                    continue
                if not option.subs:
                    if option.choice.damage + rest[t - b] == target:
                        out.append(option)
                        used = b
                        break
                    continue
                s = _first_hit(tables.own[option.uid], rest, t, target)
                if s >= 0:
                    out.append(option)
                    _track_folds(tables, option.subs, tables.folds[option.uid], s - b, out)
                    used = s
                    break
            else:
                continue
            break
        else:  # pragma: no cover - the DP stored one of these sums
            raise AssertionError("planner back-tracking lost the optimum")
        k, t = stop, t - used


def backtrack(tables: Tables, t: int) -> list[PlacedChoice]:
    """Back-track the configuration the DP found for exactly the value ``final[t]``."""
    out: list[PlacedChoice] = []
    if tables.idx.roots:
        _track_folds(tables, tables.idx.roots, tables.root_folds, t, out)
    return out


def best_bins(final: np.ndarray, cap: int) -> int:
    """Fewest bins whose least damage ties (relative ``1e-12``) the least damage within ``cap``."""
    best = final[cap]
    return int(np.flatnonzero(final <= best + TIE_RTOL * best)[0])


def full_range(problem: Problem, idx: Index, ext: Extremes, resolution: int) -> Tables:
    """Tables in which every configuration fits: the bins span the highest latency."""
    cap = resolution + ext.max_count + 1  # each option may round up by one bin
    return run_dp(idx, bin_counts(idx, ext.max_chain_latency / resolution, cap), cap)


def solve(problem: Problem, budget: float, *, resolution: int = 2000) -> Solution:
    """Return a least-damage configuration whose latency fits ``budget``.

    Parameters
    ----------
    problem : Problem
    budget : float
        Total latency allowed (ms, ``fixed_latency`` included); ``inf`` means no limit.
    resolution : int
        Number of time bins between ``fixed_latency`` and ``budget``; the rounding can cost up to
        one bin per choice of a configuration (see the module docstring).

    Returns
    -------
    Solution
        With ``solution.latency <= budget``.

    Raises
    ------
    InfeasibleBudget
        If ``budget < min_latency(problem)``; ``minimum`` holds that latency.
    InvalidArgument
        If ``budget`` is nan, negative or not a number, or ``resolution`` is not a positive int.

    Examples
    --------
    >>> from fxcompress.depth.planner import ChainSpec, Choice, Problem, Span
    >>> layer = Span(0, 1, [Choice("dense", 3.0, 0.0), Choice("sparse", 1.0, 0.7)])
    >>> problem = Problem([ChainSpec("mlp", 1, [layer])])
    >>> solve(problem, 2.0)
    Solution(decisions=(Segment(chain='mlp', start=0, stop=1, key='sparse', pruned=()),), \
latency=1.0, damage=0.7, budget=2.0)
    >>> solve(problem, 0.5)
    Traceback (most recent call last):
    ...
    fxcompress.errors.InfeasibleBudget: budget 0.5 ms is below the lowest reachable latency 1.0 ms
    """
    idx = index_of(problem)
    budget = check_budget(budget)
    resolution = integer(resolution, "resolution", minimum=1)
    ext = find_extremes(problem, idx)
    lowest = float(ext.min_latency)
    if budget < lowest:
        raise InfeasibleBudget(
            f"budget {budget!r} ms is below the lowest reachable latency {lowest!r} ms",
            minimum=lowest,
        )
    if math.isinf(budget):
        tables = full_range(problem, idx, ext, resolution)
        cap = len(tables.final) - 1
        return make_solution(problem, backtrack(tables, best_bins(tables.final, cap)), budget)
    grid = time_grid(problem, idx, budget, resolution)
    if grid is None:
        solution = make_solution(problem, ext.min_picks, budget)
        assert solution.latency <= budget, "the fastest configuration must fit a budget >= it"
        return solution
    bins, cap = grid
    tables = run_dp(idx, bins, cap)
    solution = make_solution(problem, backtrack(tables, best_bins(tables.final, cap)), budget)
    # exact: sum(latency) <= sum(bins) * room / cap <= room, and fsum rounds monotonically
    assert solution.latency <= budget, "rounded-up latencies must fit the budget"
    return solution


def time_grid(
    problem: Problem, idx: Index, budget: float, resolution: int
) -> tuple[list[int], int] | None:
    """The bins of every option and the capacity :func:`solve` plans with for a finite budget
    ``>= min_latency``: the first of ``resolution`` and its doublings in which some
    configuration fits, or None if none does (then the fastest configuration is the answer)."""
    room = Fraction(budget) - Fraction(problem.fixed_latency)  # >= 0 as budget >= lowest
    for doubling in range(_RETRIES + 1):
        cap = resolution << doubling
        bins = bin_counts(idx, room / cap, cap)
        if min_bins(idx, bins, cap) <= cap:
            return bins, cap
    return None
