"""Beyond the single best plan: the runners-up (:func:`alternatives`, :func:`ranked`) and the
trade-off front (:func:`pareto_front`)."""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Iterator
from typing import Any

from fxcompress.depth.planner.checks import integer
from fxcompress.depth.planner.dp import (
    backtrack,
    best_bins,
    breakpoints,
    full_range,
    min_bins,
    run_dp,
    solve,
    time_grid,
)
from fxcompress.depth.planner.extremes import find_extremes
from fxcompress.depth.planner.problem import (
    Problem,
    Solution,
    index_of,
    make_solution,
)
from fxcompress.errors import InvalidArgument

__all__ = ["alternatives", "pareto_front", "ranked"]


def alternatives(
    problem: Problem, budget: float, count: int, *, resolution: int = 2000
) -> tuple[Solution, ...]:
    """Return the ``count`` least-damage configurations within the budget, best first.

    The first is :func:`solve`'s answer; the others are the runners-up by damage on the same
    time grid (so each fits the budget). They are found best-first: a configuration's
    neighbours are the best configurations that also avoid one more of its choices (the dynamic
    programme re-run with those choices forbidden), and every configuration of the grid is
    reached this way with no more damage than it has. Ties are broken by latency, then by the
    decisions. They are the plans a caller can tell apart by something the damage model does not
    see, for example a short fine-tuning of each (:func:`ranked` yields them lazily).

    Parameters
    ----------
    problem : Problem
    budget : float
        As for :func:`solve` (finite).
    count : int
        At most this many solutions (``>= 1``); fewer when fewer configurations fit.
    resolution : int
        As for :func:`solve`.

    Returns
    -------
    tuple of Solution
        ``result[0] == solve(problem, budget, resolution=resolution)``; damages do not
        decrease along the tuple, and no two solutions have the same decisions.

    Raises
    ------
    InfeasibleBudget, InvalidArgument
        As for :func:`solve`; also if ``count`` is not a positive int or ``budget`` is ``inf``.

    Examples
    --------
    >>> from fxcompress.depth.planner import ChainSpec, Choice, Problem, Span
    >>> a = Span(0, 1, [Choice("keep", 2.0, 0.0), Choice("thin", 1.0, 0.2)])
    >>> b = Span(1, 2, [Choice("keep", 2.0, 0.0), Choice("thin", 1.0, 0.5)])
    >>> problem = Problem([ChainSpec("c", 2, [a, b])])
    >>> [[d.key for d in s.decisions] for s in alternatives(problem, 3.5, 3)]
    [['thin', 'keep'], ['keep', 'thin'], ['thin', 'thin']]
    """
    count = integer(count, "count", minimum=1)
    return tuple(itertools.islice(ranked(problem, budget, resolution=resolution), count))


def ranked(problem: Problem, budget: float, *, resolution: int = 2000) -> Iterator[Solution]:
    """Yield the configurations within the budget by increasing damage (see :func:`alternatives`).

    Each solution after the first costs up to one run of the dynamic programme per choice of
    each configuration yielded before it, so take only as many as needed.

    Examples
    --------
    >>> from fxcompress.depth.planner import ChainSpec, Choice, Problem, Span
    >>> layer = Span(0, 1, [Choice("a", 1.0, 0.0), Choice("b", 0.5, 0.1), Choice("c", 3.0, 0.0)])
    >>> [s.decisions[0].key for s in ranked(Problem([ChainSpec("mlp", 1, [layer])]), 2.0)]
    ['a', 'b']
    """
    best = solve(problem, budget, resolution=resolution)
    if math.isinf(best.budget):
        raise InvalidArgument("ranked configurations need a finite budget, got inf")
    idx = index_of(problem)
    grid = time_grid(problem, idx, best.budget, integer(resolution, "resolution", minimum=1))
    yield best
    if grid is None:
        return  # solve fell back to the fastest configuration: no grid to rank others on
    bins, cap = grid
    uid = {option.segment(): option.uid for option in idx.options}

    def solve_avoiding(forbidden: frozenset[int]) -> Solution | None:
        width = list(bins)
        for u in forbidden:
            width[u] = cap + 1  # the DP skips options wider than cap
        if min_bins(idx, width, cap) > cap:
            return None  # every configuration that fits uses a forbidden choice
        tables = run_dp(idx, width, cap)
        solution = make_solution(
            problem, backtrack(tables, best_bins(tables.final, cap)), best.budget
        )
        assert solution.latency <= best.budget, "rounded-up latencies must fit the budget"
        return solution

    # Best-first over sets of forbidden choices. A node's solution is the best avoiding its set,
    # so a child (one more choice of that solution forbidden) never does better, and any
    # configuration S is reached through nodes no worse than S: at a node whose solution T is
    # not S, some choice of T is not in S, and forbidding it keeps S available.
    yielded = {best.decisions}
    expanded: set[frozenset[int]] = set()
    # (damage, latency, decisions, tie-breaking counter, solution, forbidden set): the counter is
    # unique, so the solution and the set are never compared
    heap: list[tuple[float, float, tuple[Any, ...], int, Solution, frozenset[int]]] = []
    order = itertools.count()

    def expand(solution: Solution, forbidden: frozenset[int]) -> None:
        for decision in solution.decisions:
            child = forbidden | {uid[decision]}
            if child in expanded:
                continue
            expanded.add(child)
            found = solve_avoiding(child)
            if found is not None:
                key = (found.damage, found.latency, _order_key(found), next(order))
                heapq.heappush(heap, (*key, found, child))

    expand(best, frozenset())
    while heap:
        *_, solution, forbidden = heapq.heappop(heap)
        # a configuration can be the best of several nodes: yield it once, expand every node
        if solution.decisions not in yielded:
            yielded.add(solution.decisions)
            yield solution
        expand(solution, forbidden)


def _order_key(solution: Solution) -> tuple[tuple[str, int, int, str], ...]:
    return tuple((d.chain, d.start, d.stop, d.key) for d in solution.decisions)


def pareto_front(problem: Problem, *, resolution: int = 2000) -> tuple[tuple[float, float], ...]:
    """Return the ``(latency, damage)`` trade-offs found by one DP pass over the full range.

    The bin width is ``(highest latency - fixed_latency) / resolution`` with room for every
    configuration; the configuration back-tracked at each bin count where the least damage drops
    is evaluated exactly, and the non-dominated points are returned by increasing latency (so
    with strictly decreasing damage). The last point has the least damage of any configuration.

    Examples
    --------
    >>> from fxcompress.depth.planner import ChainSpec, Choice, Problem, Span
    >>> layer = Span(0, 1, [Choice("dense", 3.0, 0.0), Choice("sparse", 1.0, 0.7),
    ...                        Choice("wasteful", 4.0, 0.9)])
    >>> pareto_front(Problem([ChainSpec("mlp", 1, [layer])], fixed_latency=0.5))
    ((1.5, 0.7), (3.5, 0.0))
    """
    idx = index_of(problem)
    resolution = integer(resolution, "resolution", minimum=1)
    tables = full_range(problem, idx, find_extremes(problem, idx), resolution)
    points = set()
    for t in breakpoints(tables.final).tolist():
        solution = make_solution(problem, backtrack(tables, t), math.inf)
        points.add((solution.latency, solution.damage))
    front: list[tuple[float, float]] = []
    for latency, damage in sorted(points):
        if not front or damage < front[-1][1]:
            front.append((latency, damage))
    return tuple(front)
