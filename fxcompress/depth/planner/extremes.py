"""Exact (rational) extremes over every configuration of a problem: the lowest latency and its
least-damage configuration, the highest latency and the largest number of choices."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from fractions import Fraction

from fxcompress.depth.planner.index import Index, PlacedChoice
from fxcompress.depth.planner.problem import Problem, index_of

__all__ = ["Extremes", "find_extremes", "min_latency"]


@dataclass(frozen=True)
class Extremes:
    min_latency: Fraction  # exact, fixed latency included
    min_picks: tuple[PlacedChoice, ...]  # least damage among the configurations of that latency
    max_chain_latency: Fraction  # exact, fixed latency excluded
    max_count: int  # most choices in one configuration


def find_extremes(problem: Problem, idx: Index) -> Extremes:
    """Exact (rational) lowest/highest latency and largest size over all configurations."""
    low: dict[str, tuple[Fraction, Fraction, tuple[PlacedChoice, ...]]] = {}
    high: dict[str, Fraction] = {}
    count: dict[str, int] = {}
    for name in idx.order:
        length = idx.chains[name].length
        best_low: list[tuple[Fraction, Fraction, tuple[PlacedChoice, ...]] | None] = [None] * length
        best_low.append((Fraction(0), Fraction(0), ()))
        best_high: list[Fraction | None] = [None] * length + [Fraction(0)]
        best_count: list[int | None] = [None] * length + [0]
        for k in range(length - 1, -1, -1):
            for stop, options in idx.steps[name][k]:
                rest_low, rest_high, rest_count = best_low[stop], best_high[stop], best_count[stop]
                if rest_low is None or rest_high is None or rest_count is None:
                    continue
                for option in options:
                    lat = Fraction(option.choice.latency) + sum(low[s][0] for s in option.subs)
                    dmg = Fraction(option.choice.damage) + sum(low[s][1] for s in option.subs)
                    picks = sum((low[s][2] for s in option.subs), (option,))
                    cand = (lat + rest_low[0], dmg + rest_low[1], picks + rest_low[2])
                    current = best_low[k]
                    if current is None or cand[:2] < current[:2]:
                        best_low[k] = cand
                    top = Fraction(option.choice.latency) + sum(high[s] for s in option.subs)
                    top += rest_high
                    best_high[k] = top if best_high[k] is None else max(best_high[k], top)
                    size = 1 + sum(count[s] for s in option.subs) + rest_count
                    best_count[k] = size if best_count[k] is None else max(best_count[k], size)
        low[name] = best_low[0]  # type: ignore[assignment]  # a partition exists (ChainSpec checks)
        high[name] = best_high[0]  # type: ignore[assignment]
        count[name] = best_count[0]  # type: ignore[assignment]
    return Extremes(
        min_latency=Fraction(problem.fixed_latency) + sum(low[r][0] for r in idx.roots),
        min_picks=tuple(itertools.chain.from_iterable(low[r][2] for r in idx.roots)),
        max_chain_latency=sum((high[r] for r in idx.roots), Fraction(0)),
        max_count=sum(count[r] for r in idx.roots),
    )


def min_latency(problem: Problem) -> float:
    """Return the lowest total latency any configuration reaches, computed exactly.

    The sum is done in rational arithmetic and rounded once, so it equals the :func:`math.fsum`
    of the latencies of the fastest configuration (plus ``fixed_latency``).

    Examples
    --------
    >>> from fxcompress.depth.planner import ChainSpec, Choice, Problem, Span
    >>> fast = Span(0, 1, [Choice("a", 0.1, 1.0), Choice("b", 0.2, 0.0)])
    >>> min_latency(Problem([ChainSpec("c", 1, [fast])], fixed_latency=0.2))
    0.30000000000000004
    """
    idx = index_of(problem)
    return float(find_extremes(problem, idx).min_latency)
