"""The closed loop below budget 1: build the plan, measure it, re-plan until the measurement fits.

The DP plans on predicted latencies; the network built from a plan is then measured against the
original (timed alternately, see :mod:`fxcompress.pipeline.measure`). A measured ratio outside the
accepted band around the goal (0.85 to 1.05 times it) re-plans at another budget — a secant
estimate, geometric steps past plans already measured, or a bisection once two measurements
bracket the band — at most ``max_replans`` times. The measurement is injectable:
``ClosedLoop(table, measure=callable)``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from torch import fx

from fxcompress.depth import planner
from fxcompress.errors import InfeasibleBudget
from fxcompress.latency.table import LatencyTable
from fxcompress.pipeline.measure import Measure, PairedLatency, Stopwatch
from fxcompress.pipeline.plan import Plan
from fxcompress.pipeline.problem import Prepared, solve_ms

__all__ = ["Attempt", "ClosedLoop", "Outcome", "next_target"]

logger = logging.getLogger("fxcompress")

#: the accepted band of measured ratios, and where a re-plan aims (fractions of the goal ratio)
LOW, HIGH, AIM = 0.85, 1.05, 0.96


def next_target(history: list[tuple[float, float]], aim: float) -> float:
    """The budget (ms) to plan for next so the measured ratio lands on ``aim``.

    ``history`` holds (planned budget ms, measured ratio) of every attempt. Between two attempts
    that bracket ``aim`` the budget is interpolated linearly. Otherwise, the two attempts closest
    to ``aim`` extrapolate along their line when the ratio grows with the budget (the measured
    latency has a part no plan removes, so proportional steps fall short), at most four times
    as far as the proportional step; with one attempt, or a line that does not rise, the
    closest attempt is scaled in proportion to its miss.

    Examples
    --------
    >>> round(next_target([(10.0, 0.4), (20.0, 0.8)], 0.6), 9)
    15.0
    """
    below = [h for h in history if h[1] <= aim]
    above = [h for h in history if h[1] > aim]
    if below and above:
        (t0, r0), (t1, r1) = max(below, key=lambda h: h[1]), min(above, key=lambda h: h[1])
        if r1 > r0:
            return t0 + (t1 - t0) * (aim - r0) / (r1 - r0)
    near = sorted(history, key=lambda h: abs(h[1] - aim))
    target, ratio = near[0]
    proportional = target * aim / ratio
    other = next((h for h in near[1:] if h[0] != target), None)
    if other is not None and (other[1] - ratio) / (other[0] - target) > 0:
        slope = (other[1] - ratio) / (other[0] - target)
        step = (aim - ratio) / slope
        reach = 4 * abs(proportional - target)
        return target + max(-reach, min(reach, step))
    return proportional


@dataclass(frozen=True)
class Attempt:
    """One plan built and measured: its relaxed and merged networks and its measured ratio
    (None when the latency is not measured)."""

    plan: Plan
    relaxed: fx.GraphModule
    result: fx.GraphModule
    ratio: float | None


@dataclass(frozen=True)
class Outcome:
    """What the loop tried, and the re-plans it made (the report's ``replans``)."""

    tried: tuple[Attempt, ...]
    goal_ratio: float
    replans: tuple[dict[str, Any], ...] = field(default=())

    @property
    def limit(self) -> float:
        """The highest measured ratio that meets the goal."""
        return HIGH * self.goal_ratio

    @property
    def best(self) -> Attempt | None:
        """The least damaging attempt whose measurement met the goal (None: none did).

        The band's lower edge only steers the search: an attempt measured below it that also
        does less damage than one inside it is better on both counts, so it wins.
        """
        met = [t for t in self.tried if t.ratio is None or t.ratio <= self.limit]
        if not met:
            return None
        return min(met, key=lambda t: (t.plan.damage, t.plan.predicted_ms))

    @property
    def fastest(self) -> Attempt:
        """The attempt measured fastest."""
        return min(self.tried, key=lambda t: t.ratio or 0.0)


class _Search:
    """Where to re-plan next: the measurements so far, and the DP probed at other budgets."""

    def __init__(
        self, solve: Callable[[float], Plan], goal_ratio: float, prepared: Prepared
    ) -> None:
        self.solve = solve
        self.low, self.high, self.aim = LOW * goal_ratio, HIGH * goal_ratio, AIM * goal_ratio
        self.original = prepared.original
        self.problem = prepared.problem
        # (planned budget ms, measured ratio): every measurement, plus every budget whose plan
        # turned out to be one already measured (the DP is deterministic: its ratio is known)
        self.history: list[tuple[float, float]] = []
        self.measured: dict[tuple[Any, ...], float] = {}

    @cached_property
    def lowest(self) -> float:
        """The lowest reachable latency (ms)."""
        return planner.min_latency(self.problem)

    def record(self, plan: Plan, ratio: float) -> None:
        self.history.append((plan.budget_ms, ratio))
        self.measured[plan.segments] = ratio

    def bracket(self) -> tuple[float, float] | None:
        """The nearest two budgets, one measured below the band and one above it."""
        below = [t for t, r in self.history if r < self.low]
        above = [t for t, r in self.history if r > self.high]
        pairs = [(a, c) for a in below for c in above]
        return min(pairs, key=lambda p: abs(p[0] - p[1])) if pairs else None

    def next_plan(self, looser: bool) -> tuple[Plan | None, str, int]:
        """A plan not measured yet, how its budget was found, and how many probes repeated one.

        At most 16 probes of the DP, which cost no measurement:

        - once two budgets bracket the band (one measured too fast, one too slow), bisect
          between them: measured latency can jump across the band from one plan to the next,
          where a secant overshoots;
        - otherwise, first the secant estimate, then, while the DP answers with a plan already
          measured, geometric steps further the same way, until the budget is clamped at the
          lowest reachable latency or the original one and still gives a measured plan.

        A repeated plan's budget joins the history with that plan's ratio, which can close a
        bracket or narrow one.
        """
        target, how, step, repeats = 0.0, "secant", 0.05, 0
        for _probe in range(16):
            pair = self.bracket()
            if pair is not None:
                if abs(pair[0] - pair[1]) <= 1e-6 * self.original:
                    break  # no other plan lies between the two
                target, how = (pair[0] + pair[1]) / 2, "bisect"
            elif not repeats:
                target = next_target(self.history, self.aim)
            else:
                target, how = target * (1 + step) if looser else target / (1 + step), "step"
                step *= 2
            target = min(max(target, self.lowest), self.original)
            candidate = self.solve(target)
            if candidate.segments not in self.measured:
                return candidate, how, repeats
            repeats += 1
            self.history.append((target, self.measured[candidate.segments]))
            bound = self.original if looser else self.lowest
            if pair is None and self.bracket() is None and target == bound:
                break  # clamped at the bound and still a measured plan: nothing new that way
        return None, how, repeats


class ClosedLoop:
    """Build, measure and re-plan until a plan's measured latency fits its budget.

    Parameters
    ----------
    table : LatencyTable
        The latency model; only a measured one (``table.mode == "measure"``) is measured.
    measure : callable, optional
        ``measure(original, result, inputs) -> (original_ms, result_ms)``; by default both are
        timed alternately on the table's device
        (:class:`~fxcompress.pipeline.measure.PairedLatency`).
    max_replans : int
        At most this many re-plans after the first plan.
    """

    def __init__(
        self, table: LatencyTable, *, measure: Measure | None = None, max_replans: int = 5
    ) -> None:
        self.table = table
        self.measure = measure if measure is not None else PairedLatency(table)
        self.max_replans = max_replans

    def run(
        self,
        prepared: Prepared,
        plan: Plan,
        build: Callable[[Plan], tuple[fx.GraphModule, fx.GraphModule]],
        original: fx.GraphModule,
        watch: Stopwatch | None = None,
    ) -> Outcome:
        """Try ``plan`` and its re-plans; ``build(plan)`` gives its (relaxed, merged) networks,
        measured against ``original`` on ``prepared.inputs``."""
        watch = watch if watch is not None else Stopwatch()
        goal_ratio = plan.budget_ms / plan.original_ms if plan.original_ms > 0 else 1.0

        def solve(target: float) -> Plan:
            with watch("plan"):
                try:
                    return solve_ms(prepared, target)
                except InfeasibleBudget as exc:
                    # rounding at the lowest reachable latency: plan the fastest
                    return solve_ms(prepared, exc.minimum * plan.original_ms)

        search = _Search(solve, goal_ratio, prepared)
        tried: list[Attempt] = []
        replans: list[dict[str, Any]] = []
        for attempt in range(self.max_replans + 1):
            relaxed, result = build(plan)
            if self.table.mode != "measure":
                tried.append(Attempt(plan, relaxed, result, None))
                break
            with watch("measure"):
                original_ms, measured = self.measure(original, result, prepared.inputs)
            ratio = measured / original_ms
            tried.append(Attempt(plan, relaxed, result, ratio))
            search.record(plan, ratio)
            if search.low <= ratio <= search.high or attempt == self.max_replans:
                break
            looser = ratio < search.low
            new_plan, how, repeats = search.next_plan(looser)
            if new_plan is None:
                logger.info(
                    "measured ratio %.3f vs goal %.3f; no other plan to try", ratio, goal_ratio
                )
                break
            replans.append(_replan_record(ratio, goal_ratio, new_plan, looser, how, repeats))
            logger.info(
                "measured ratio %.3f vs goal %.3f; re-planning (%s)", ratio, goal_ratio, how
            )
            plan = new_plan
        return Outcome(tuple(tried), goal_ratio, tuple(replans))


def _replan_record(
    ratio: float, goal_ratio: float, plan: Plan, looser: bool, how: str, repeats: int
) -> dict[str, Any]:
    return {
        "measured_ratio": ratio,
        "goal_ratio": goal_ratio,
        "new_budget_ms": plan.budget_ms,
        "new_predicted_ms": plan.predicted_ms,
        "direction": "looser" if looser else "tighter",
        # how the budget was chosen ("secant", "bisect" or "step"), and how many probed budgets
        # before it gave a plan already measured
        "how": how,
        "repeats": repeats,
    }
