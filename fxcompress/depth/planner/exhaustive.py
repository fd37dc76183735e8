"""The brute-force oracle: :func:`solve_exhaustive` enumerates every configuration (exact,
exponential; for tests and tiny instances)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable

from fxcompress.depth.planner.checks import check_budget
from fxcompress.depth.planner.dp import TIE_RTOL
from fxcompress.depth.planner.extremes import find_extremes
from fxcompress.depth.planner.index import Index, PlacedChoice
from fxcompress.depth.planner.problem import (
    Problem,
    Solution,
    index_of,
    make_solution,
)
from fxcompress.errors import InfeasibleBudget, InvalidArgument

__all__ = ["solve_exhaustive"]

_EXHAUSTIVE_LIMIT = 1_000_000
"""The largest number of configurations :func:`solve_exhaustive` agrees to enumerate."""


def _count_configurations(idx: Index) -> int:
    counts: dict[str, int] = {}
    for name in idx.order:
        length = idx.chains[name].length
        ways = [0] * length + [1]
        for k in range(length - 1, -1, -1):
            for stop, options in idx.steps[name][k]:
                for option in options:
                    ways[k] += math.prod(counts[s] for s in option.subs) * ways[stop]
        counts[name] = ways[0]
    return math.prod(counts[r] for r in idx.roots)


def _configurations(idx: Index) -> Iterable[tuple[PlacedChoice, ...]]:
    """Every configuration of the problem, as the tuple of its chosen options."""
    memo: dict[str, list[tuple[PlacedChoice, ...]]] = {}
    for name in idx.order:
        length = idx.chains[name].length
        tails: list[list[tuple[PlacedChoice, ...]]] = [[] for _ in range(length)] + [[()]]
        for k in range(length - 1, -1, -1):
            for stop, options in idx.steps[name][k]:
                for option in options:
                    for subs in itertools.product(*(memo[s] for s in option.subs)):
                        head = (option, *itertools.chain.from_iterable(subs))
                        tails[k].extend(head + tail for tail in tails[stop])
        memo[name] = tails[0]
    for parts in itertools.product(*(memo[r] for r in idx.roots)):
        yield tuple(itertools.chain.from_iterable(parts))


def solve_exhaustive(problem: Problem, budget: float) -> Solution:
    """Exact optimum by enumerating every configuration (a test oracle; exponential).

    Among the configurations with ``latency <= budget``, returns one of least damage; ties (a
    relative ``1e-12``) go to the lowest latency, then to the smallest sorted decision tuple.

    Raises
    ------
    InfeasibleBudget
        If ``budget < min_latency(problem)``.
    InvalidArgument
        For an invalid budget, or if the problem has more than a million configurations.

    Examples
    --------
    >>> from fxcompress.depth.planner import ChainSpec, Choice, Problem, Span
    >>> layer = Span(0, 1, [Choice("dense", 3.0, 0.0), Choice("sparse", 1.0, 0.7)])
    >>> solve_exhaustive(Problem([ChainSpec("mlp", 1, [layer])]), 3.0).damage
    0.0
    """
    idx = index_of(problem)
    budget = check_budget(budget)
    lowest = float(find_extremes(problem, idx).min_latency)
    if budget < lowest:
        raise InfeasibleBudget(
            f"budget {budget!r} ms is below the lowest reachable latency {lowest!r} ms",
            minimum=lowest,
        )
    total = _count_configurations(idx)
    if total > _EXHAUSTIVE_LIMIT:
        raise InvalidArgument(
            f"the problem has {total} configurations, more than solve_exhaustive enumerates "
            f"({_EXHAUSTIVE_LIMIT}); use solve"
        )
    fitting = []
    for picks in _configurations(idx):
        solution = make_solution(problem, picks, budget)
        if solution.latency <= budget:
            fitting.append(solution)
    least = min(solution.damage for solution in fitting)
    return min(
        (s for s in fitting if s.damage <= least + TIE_RTOL * least),
        key=lambda s: (s.latency, [(d.chain, d.start, d.stop, d.key) for d in s.decisions]),
    )
