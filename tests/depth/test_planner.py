"""Tests of fxcompress.depth.planner against brute-force oracles written here, independently."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from fxcompress.depth.planner import (
    ChainSpec,
    Choice,
    Problem,
    Solution,
    Span,
    alternatives,
    min_latency,
    pareto_front,
    solve,
    solve_exhaustive,
)
from fxcompress.depth.segment import Segment
from fxcompress.errors import InfeasibleBudget, InvalidArgument

ROOT = Path(__file__).resolve().parents[2]
RETRIES = 4  # solve doubles the resolution at most this many times

# --------------------------------------------------------------------------- oracles


def configurations(problem: Problem, name: str) -> list[tuple[tuple[str, int, int, Choice], ...]]:
    """Every configuration of one chain (with its nested sub chains), by brute force."""
    chain = next(c for c in problem.chains if c.name == name)

    def from_position(k: int) -> list[tuple[tuple[str, int, int, Choice], ...]]:
        if k == chain.length:
            return [()]
        out = []
        for segment in chain.segments:
            if segment.start != k:
                continue
            for choice in segment.choices:
                nested = [configurations(problem, sub) for sub in choice.sub]
                for parts in itertools.product(*nested):
                    head = ((name, segment.start, segment.stop, choice), *sum(parts, ()))
                    out.extend(head + tail for tail in from_position(segment.stop))
        return out

    return from_position(0)


def roots(problem: Problem) -> list[str]:
    used = {sub for c in problem.chains for s in c.segments for ch in s.choices for sub in ch.sub}
    return sorted(c.name for c in problem.chains if c.name not in used)


def per_root(problem: Problem) -> list[list[tuple[tuple[str, int, int, Choice], ...]]]:
    return [configurations(problem, name) for name in roots(problem)]


def all_configurations(problem: Problem):
    for parts in itertools.product(*per_root(problem)):
        yield sum(parts, ())


def exact_latency(problem: Problem, config) -> Fraction:
    return Fraction(problem.fixed_latency) + sum(Fraction(item[3].latency) for item in config)


def float_latency(problem: Problem, config) -> float:
    return math.fsum([problem.fixed_latency, *(item[3].latency for item in config)])


def float_damage(config) -> float:
    return math.fsum(item[3].damage for item in config)


def rounded_bins(latency: float, room: Fraction, cap: int) -> int | None:
    """Bins of a latency when ``room`` (exact) is split in ``cap`` bins; None if never fits."""
    if latency == 0:
        return 0
    if room == 0:
        return None
    bins = math.ceil(Fraction(latency) * cap / room)
    return bins if bins <= cap else None


def rounded_optimum(problem: Problem, budget: float, cap: int) -> float | None:
    """Least damage over configurations whose rounded latencies fit in ``cap`` bins."""
    room = Fraction(budget) - Fraction(problem.fixed_latency)
    combined = {0: 0.0}  # bins -> least damage, over the roots seen so far
    for configs in per_root(problem):
        table: dict[int, float] = {}
        for config in configs:
            bins = [rounded_bins(item[3].latency, room, cap) for item in config]
            if None in bins or sum(bins) > cap:
                continue
            total, damage = sum(bins), float_damage(config)
            table[total] = min(table.get(total, math.inf), damage)
        merged: dict[int, float] = {}
        for (b1, d1), (b2, d2) in itertools.product(combined.items(), table.items()):
            if b1 + b2 <= cap:
                merged[b1 + b2] = min(merged.get(b1 + b2, math.inf), d1 + d2)
        combined = merged
    return min(combined.values()) if combined else None


def exact_optimum(problem: Problem, budget: float | Fraction) -> float:
    """Least damage with latency <= budget: the float (fsum) latency for a float budget, the
    exact latency for a Fraction budget. None if nothing fits."""
    fits = [
        float_damage(c)
        for c in all_configurations(problem)
        if (
            exact_latency(problem, c) <= budget
            if isinstance(budget, Fraction)
            else float_latency(problem, c) <= budget
        )
    ]
    return min(fits) if fits else None


def expected_damage(problem: Problem, budget: float, resolution: int) -> tuple[float, bool]:
    """What solve must reach: the rounded optimum of the first resolution that fits, else the
    least damage at the exact lowest latency. Also says whether ``resolution`` itself fits."""
    for doubling in range(RETRIES + 1):
        found = rounded_optimum(problem, budget, resolution << doubling)
        if found is not None:
            return found, doubling == 0
    configs = list(all_configurations(problem))
    lowest = min(exact_latency(problem, c) for c in configs)
    return min(float_damage(c) for c in configs if exact_latency(problem, c) == lowest), False


def check_solution(problem: Problem, solution: Solution, budget: float) -> None:
    """The decisions form a configuration, and latency/damage are recomputed from them."""
    chains = {c.name: c for c in problem.chains}
    by_chain: dict[str, list[Segment]] = {}
    for decision in solution.decisions:
        by_chain.setdefault(decision.chain, []).append(decision)
    assert list(solution.decisions) == sorted(solution.decisions, key=lambda d: (d.chain, d.start))
    pending, used, chosen = list(roots(problem)), set(), []
    while pending:
        name = pending.pop()
        assert name not in used
        used.add(name)
        position = 0
        for decision in by_chain.get(name, []):
            assert decision.start == position
            segment = next(
                s
                for s in chains[name].segments
                if (s.start, s.stop) == (decision.start, decision.stop)
            )
            choice = next(c for c in segment.choices if c.key == decision.key)
            chosen.append(choice)
            pending.extend(choice.sub)
            position = decision.stop
        assert position == chains[name].length
    assert set(by_chain) == used
    assert solution.latency == math.fsum([problem.fixed_latency, *(c.latency for c in chosen)])
    assert solution.damage == math.fsum(c.damage for c in chosen)
    assert solution.latency <= budget
    assert solution.budget == budget


# --------------------------------------------------------------------------- strategies

KEYS = st.sampled_from("abcdef")
numbers = st.one_of(
    st.integers(0, 6).map(float),
    st.floats(0, 10, allow_nan=False, allow_infinity=False),
)


@st.composite
def segments(draw, length: int, spans: int, choices: int, subs_for=None) -> tuple[Span, ...]:
    """All length-1 segments plus random longer ones (up to ``spans`` items)."""
    longer = [(a, b) for a in range(length) for b in range(a + 2, min(length, a + spans) + 1)]
    extra = draw(st.lists(st.sampled_from(longer), unique=True, max_size=3)) if longer else []
    out = []
    for start, stop in sorted({(k, k + 1) for k in range(length)} | set(extra)):
        count = draw(st.integers(1, choices))
        keys = draw(st.lists(KEYS, min_size=count, max_size=count, unique=True))
        subs = subs_for(draw) if subs_for else ()
        out.append(
            Span(
                start,
                stop,
                tuple(
                    Choice(
                        key,
                        draw(numbers),
                        draw(numbers),
                        tuple(s for s in subs if draw(st.booleans())),
                    )
                    for key in keys
                ),
            )
        )
    return tuple(out)


@st.composite
def problems(draw, max_length: int = 4, nesting: bool = True) -> Problem:
    chains: list[ChainSpec] = []
    names = iter(f"s{i}" for i in range(100))
    budget_of_subs = [draw(st.sampled_from([0, 1, 2, 2])) if nesting else 0]

    def subs_for(draw) -> tuple[str, ...]:
        if budget_of_subs[0] == 0 or not draw(st.booleans()):
            return ()
        count = draw(st.integers(1, budget_of_subs[0]))
        budget_of_subs[0] -= count
        made = []
        for _ in range(count):
            name = next(names)
            length = draw(st.integers(1, 2))
            chains.append(ChainSpec(name, length, draw(segments(length, 2, 2))))
            made.append(name)
        return tuple(made)

    count = draw(st.integers(1, 2))
    for i in range(count):
        length = draw(st.integers(1, max_length if count == 1 else min(max_length, 3)))
        chains.append(ChainSpec(f"r{i}", length, draw(segments(length, 3, 3, subs_for))))
    fixed = draw(st.one_of(st.just(0.0), numbers))
    problem = Problem(tuple(draw(st.permutations(chains))), fixed_latency=fixed)
    assume(math.prod(len(c) for c in per_root(problem)) <= 4000)
    return problem


def max_latency(problem: Problem) -> float:
    return max(float_latency(problem, c) for c in all_configurations(problem))


def max_count(problem: Problem) -> int:
    return max(len(c) for c in all_configurations(problem))


resolutions = st.sampled_from([1, 2, 3, 7, 50, 2000])
fractions = st.one_of(st.just(0.0), st.just(1.0), st.floats(0, 1))

# --------------------------------------------------------------------------- DP vs oracles


@given(problems(), fractions, resolutions)
def test_solve_matches_rounded_oracle(problem, u, resolution):
    lo, hi = min_latency(problem), max_latency(problem)
    budget = min(max(lo + u * (hi - lo), lo), hi)
    solution = solve(problem, budget, resolution=resolution)
    check_solution(problem, solution, budget)
    expected, _ = expected_damage(problem, budget, resolution)
    assert solution.damage == pytest.approx(expected, rel=1e-9, abs=1e-12)


@given(problems(), fractions, st.sampled_from([1, 5, 50, 2000]))
def test_solve_sandwiched_by_exact_optimum(problem, u, resolution):
    """exact(budget) <= solve(budget) <= exact(budget - m * delta) whenever the latter exists.

    ``m`` is the most choices of a configuration: each rounds up by less than one bin."""
    lo, hi = min_latency(problem), max_latency(problem)
    budget = min(max(lo + u * (hi - lo), lo), hi)
    solution = solve(problem, budget, resolution=resolution)
    assert solution.damage >= exact_optimum(problem, budget) * (1 - 1e-9) - 1e-12
    room = Fraction(budget) - Fraction(problem.fixed_latency)
    smaller = Fraction(budget) - max_count(problem) * room / resolution
    bound = exact_optimum(problem, smaller)
    if bound is not None:
        assert solution.damage <= bound * (1 + 1e-9) + 1e-12


@given(problems(max_length=3), fractions)
def test_exhaustive_matches_enumeration(problem, u):
    lo, hi = min_latency(problem), max_latency(problem)
    budget = min(max(lo + u * (hi - lo), lo), hi)
    solution = solve_exhaustive(problem, budget)
    check_solution(problem, solution, budget)
    assert solution.damage == pytest.approx(exact_optimum(problem, budget), rel=1e-12, abs=0)


@given(problems())
def test_min_latency_is_exact(problem):
    configs = list(all_configurations(problem))
    assert min_latency(problem) == float(min(exact_latency(problem, c) for c in configs))


@given(problems(), fractions, fractions, resolutions)
def test_damage_non_increasing_in_budget(problem, u, v, resolution):
    """For budgets solved at the same resolution (no retry), more budget never hurts."""
    lo, hi = min_latency(problem), max_latency(problem)
    small, large = sorted(min(max(lo + w * (hi - lo), lo), hi) for w in (u, v))
    assume(expected_damage(problem, small, resolution)[1])  # then ``large`` fits as well
    first = solve(problem, small, resolution=resolution)
    second = solve(problem, large, resolution=resolution)
    assert second.damage <= first.damage * (1 + 1e-9) + 1e-12


@given(problems(), fractions)
def test_deterministic_and_round_trips(problem, u):
    lo, hi = min_latency(problem), max_latency(problem)
    budget = min(max(lo + u * (hi - lo), lo), hi)
    solution = solve(problem, budget)
    text = json.dumps(solution.to_dict())
    assert json.dumps(solve(problem, budget).to_dict()) == text
    rebuilt = Problem.from_dict(json.loads(json.dumps(problem.to_dict())))
    assert rebuilt == problem
    assert json.dumps(solve(rebuilt, budget).to_dict()) == text
    assert Solution.from_dict(json.loads(text)) == solution


@given(problems(), st.floats(0, 1, exclude_max=True))
def test_budget_below_minimum_is_infeasible(problem, u):
    lo = min_latency(problem)
    budget = u * lo
    assume(budget < lo)
    for function in (solve, solve_exhaustive):
        with pytest.raises(InfeasibleBudget, match="below the lowest reachable latency") as info:
            function(problem, budget)
        assert info.value.minimum == pytest.approx(lo)


def first_cap(problem: Problem, budget: float, resolution: int) -> int | None:
    """The capacity solve plans with: the first doubling of ``resolution`` that fits."""
    for doubling in range(RETRIES + 1):
        if rounded_optimum(problem, budget, resolution << doubling) is not None:
            return resolution << doubling
    return None


def fitting_damages(problem: Problem, budget: float, cap: int) -> list[float]:
    """Damages of every configuration whose rounded latencies fit in ``cap`` bins, sorted."""
    room = Fraction(budget) - Fraction(problem.fixed_latency)
    fits = []
    for config in all_configurations(problem):
        bins = [rounded_bins(item[3].latency, room, cap) for item in config]
        if None not in bins and sum(bins) <= cap:
            fits.append(float_damage(config))
    return sorted(fits)


@given(problems(), fractions, resolutions, st.integers(1, 12))
def test_alternatives_are_the_least_damage_configurations(problem, u, resolution, count):
    lo, hi = min_latency(problem), max_latency(problem)
    budget = min(max(lo + u * (hi - lo), lo), hi)
    found = alternatives(problem, budget, count, resolution=resolution)
    assert found[0] == solve(problem, budget, resolution=resolution)
    for solution in found:
        check_solution(problem, solution, budget)
    assert len({s.decisions for s in found}) == len(found)
    cap = first_cap(problem, budget, resolution)
    if cap is None:  # solve fell back to the fastest configuration
        assert found == (found[0],)
        return
    # brute force: the k smallest damages over every configuration on solve's time grid
    expected = fitting_damages(problem, budget, cap)[:count]
    assert [s.damage for s in found] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    # asking for fewer returns a prefix
    assert alternatives(problem, budget, 1, resolution=resolution) == found[:1]
    if count > 2:
        assert alternatives(problem, budget, 2, resolution=resolution) == found[:2]


def test_alternatives_checks_count_and_budget():
    problem = Problem([ChainSpec("c", 1, [Span(0, 1, [Choice("a", 1.0, 0.0)])])])
    with pytest.raises(InvalidArgument, match="count"):
        alternatives(problem, 2.0, 0)
    with pytest.raises(InvalidArgument, match="finite budget"):
        alternatives(problem, math.inf, 2)
    with pytest.raises(InfeasibleBudget, match="below the lowest reachable latency"):
        alternatives(problem, 0.5, 2)
    assert alternatives(problem, 2.0, 3) == (solve(problem, 2.0),)


@given(problems(), resolutions)
def test_minimum_budget_always_solves(problem, resolution):
    budget = min_latency(problem)
    solution = solve(problem, budget, resolution=resolution)
    check_solution(problem, solution, budget)
    assert solution.latency == budget


@given(problems())
def test_unbounded_budget_reaches_least_damage(problem):
    solution = solve(problem, math.inf)
    check_solution(problem, solution, math.inf)
    least = min(float_damage(c) for c in all_configurations(problem))
    assert solution.damage == pytest.approx(least, rel=1e-9, abs=1e-12)


@given(problems(), st.sampled_from([1, 3, 50, 2000]))
def test_pareto_front(problem, resolution):
    front = pareto_front(problem, resolution=resolution)
    configs = list(all_configurations(problem))
    points = {(float_latency(problem, c), float_damage(c)) for c in configs}
    assert front
    assert set(front) <= points  # every point is a real configuration
    assert list(front) == sorted(front)
    assert all(a[1] > b[1] for a, b in itertools.pairwise(front))
    assert front[-1][1] == pytest.approx(min(d for _, d in points), rel=1e-9, abs=1e-12)
    # Every configuration is matched, within one bin per choice, by a point at least as good.
    width = (Fraction(max_latency(problem)) - Fraction(problem.fixed_latency)) / resolution
    slack = (max_count(problem) + 1) * width
    for latency, damage in points:
        assert any(
            Fraction(lat) <= Fraction(latency) + slack and dmg <= damage * (1 + 1e-9) + 1e-12
            for lat, dmg in front
        )


# --------------------------------------------------------------------------- examples


def residual_problem() -> Problem:
    merged = Choice("merged", 1.0, 0.4)
    kept = Choice("kept", 0.5, 0.0, sub=("branch",))
    skipped = Choice("kept-light", 0.5, 0.1, sub=("branch",))
    block = ChainSpec("block", 2, [Span(0, 1, [merged, kept, skipped]), Span(1, 2, [merged])])
    branch = ChainSpec(
        "branch",
        2,
        [
            Span(0, 1, [Choice("conv", 1.0, 0.0), Choice("thin", 0.5, 0.3)]),
            Span(1, 2, [Choice("conv", 1.0, 0.0)]),
            Span(0, 2, [Choice("fused", 1.2, 0.2)]),
        ],
    )
    return Problem([branch, block], fixed_latency=0.25)


def test_residual_example():
    problem = residual_problem()
    assert min_latency(problem) == 2.25
    assert [d.key for d in solve(problem, 2.3).decisions] == ["merged", "merged"]
    best = solve(problem, 10.0)
    assert best.damage == 0.4  # the second segment has only the damaging "merged" choice
    assert [(d.chain, d.start, d.key) for d in best.decisions] == [
        ("block", 0, "kept"),
        ("block", 1, "merged"),
        ("branch", 0, "conv"),
        ("branch", 1, "conv"),
    ]
    assert best.latency == 0.25 + 0.5 + 2.0 + 1.0
    mid = solve(problem, 3.0)  # kept + fused branch: 0.25 + 0.5 + 1.2 + 1.0 = 2.95
    assert [(d.chain, d.key) for d in mid.decisions] == [
        ("block", "kept"),
        ("block", "merged"),
        ("branch", "fused"),
    ]
    assert mid.damage == pytest.approx(0.6)


def test_ties_prefer_lower_latency_then_order():
    same = Span(0, 1, [Choice("z", 1.0, 0.5), Choice("b", 2.0, 0.5), Choice("a", 1.0, 0.5)])
    problem = Problem([ChainSpec("c", 1, [same])])
    assert solve(problem, 5.0).decisions == (Segment("c", 0, 1, "a"),)
    assert solve_exhaustive(problem, 5.0).decisions == (Segment("c", 0, 1, "a"),)


def test_empty_problem():
    problem = Problem((), fixed_latency=1.5)
    assert min_latency(problem) == 1.5
    assert solve(problem, 2.0) == Solution((), 1.5, 0.0, 2.0)
    assert pareto_front(problem) == ((1.5, 0.0),)
    with pytest.raises(InfeasibleBudget):
        solve(problem, 1.0)


def test_zero_latency_budget():
    free = Span(0, 1, [Choice("free", 0.0, 1.0), Choice("slow", 1.0, 0.0)])
    problem = Problem([ChainSpec("c", 1, [free])])
    assert solve(problem, 0.0).decisions == (Segment("c", 0, 1, "free"),)
    assert solve(problem, 0.0, resolution=1).latency == 0.0


def test_fallback_to_fastest_configuration():
    # Three choices of float(1/3) ms sum to just under 1 ms, but rounded up to bins of width
    # 1/r ms they never fit in r bins for r = 1, 2, ..., 16: the fallback returns them anyway.
    segments = [Span(k, k + 1, [Choice("x", 1 / 3, 0.0)]) for k in range(3)]
    problem = Problem([ChainSpec("c", 3, segments)])
    budget = min_latency(problem)
    assert budget == 1.0
    solution = solve(problem, budget, resolution=1)
    assert solution.latency == budget
    assert len(solution.decisions) == 3


@pytest.mark.parametrize(
    "budget", [math.nan, -1.0, -math.inf, "1", None, True, False, 1 + 2j, [1.0]]
)
def test_invalid_budget(budget):
    problem = residual_problem()
    for function in (solve, solve_exhaustive):
        with pytest.raises(InvalidArgument, match="budget") as info:
            function(problem, budget)
        assert type(budget).__name__ in str(info.value)


@pytest.mark.parametrize("resolution", [0, -3, 1.5, True, "10"])
def test_invalid_resolution(resolution):
    with pytest.raises(InvalidArgument, match="resolution"):
        solve(residual_problem(), 3.0, resolution=resolution)
    with pytest.raises(InvalidArgument, match="resolution"):
        pareto_front(residual_problem(), resolution=resolution)


def test_problem_must_be_a_problem():
    with pytest.raises(InvalidArgument, match="Problem"):
        solve({"chains": []}, 1.0)


def one(key: str = "k", latency: float = 1.0, damage: float = 0.0, sub=()) -> Span:
    return Span(0, 1, [Choice(key, latency, damage, sub)])


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Choice(3, 1.0, 0.0), "key must be a str"),
        (lambda: Choice("k", -1.0, 0.0), "latency"),
        (lambda: Choice("k", math.nan, 0.0), "latency"),
        (lambda: Choice("k", 1.0, math.inf), "damage"),
        (lambda: Choice("k", True, 0.0), "latency"),
        (lambda: Choice("k", 1.0, 0.0, sub="ab"), "sub"),
        (lambda: Choice("k", 1.0, 0.0, sub=("a", "a")), "twice"),
        (lambda: Span(1, 1, [Choice("k", 1, 0)]), "start < stop"),
        (lambda: Span(-1, 1, [Choice("k", 1, 0)]), "start"),
        (lambda: Span(0, 1, []), "no choices"),
        (lambda: Span(0, 1, [Choice("k", 1, 0), Choice("k", 2, 0)]), "repeats"),
        (lambda: ChainSpec("c", 0, [one()]), "length"),
        (lambda: ChainSpec("c", 1, [Span(0, 2, [Choice("k", 1, 0)])]), "ends after"),
        (lambda: ChainSpec("c", 1, [one(), one()]), "twice"),
        (lambda: ChainSpec("c", 2, [one()]), "no partition"),
        (lambda: Problem([ChainSpec("c", 1, [one()])], fixed_latency=-1), "fixed_latency"),
        (lambda: Problem([ChainSpec("c", 1, [one()]), ChainSpec("c", 1, [one()])]), "used twice"),
        (lambda: Problem([ChainSpec("c", 1, [one(sub=("d",))])]), "unknown chain 'd'"),
        (lambda: Problem([ChainSpec("c", 1, [one(sub=("c",))])]), "cycle"),
        (
            lambda: Problem(
                [ChainSpec("c", 1, [one(sub=("d",))]), ChainSpec("d", 1, [one(sub=("c",))])]
            ),
            "cycle",
        ),
        (
            lambda: Problem(
                [
                    ChainSpec("c", 2, [one(sub=("d",)), Span(1, 2, [Choice("k", 1, 0, ("d",))])]),
                    ChainSpec("d", 1, [one()]),
                ]
            ),
            "sub chain of two segments",
        ),
        (
            lambda: Problem(
                [
                    ChainSpec("c", 1, [one(sub=("d",))]),
                    ChainSpec("e", 1, [one(sub=("d",))]),
                    ChainSpec("d", 1, [one()]),
                ]
            ),
            "sub chain of two segments",
        ),
        (lambda: Problem("c"), "chains"),
        (lambda: Problem.from_dict({"chains": [], "extra": 1}), "unknown keys"),
        (lambda: Problem.from_dict({"chains": [{"name": "c"}]}), "missing keys"),
        (lambda: Problem.from_dict([]), "mapping"),
    ],
)
def test_invalid_problems(build, message):
    with pytest.raises(InvalidArgument, match=message):
        build()


def test_shared_sub_within_one_segment_is_valid():
    segment = Span(0, 1, [Choice("x", 1, 0, ("d",)), Choice("y", 2, 0, ("d",))])
    problem = Problem([ChainSpec("c", 1, [segment]), ChainSpec("d", 1, [one()])])
    assert min_latency(problem) == 2.0


def test_exhaustive_refuses_huge_problems():
    wide = [Span(k, k + 1, [Choice(str(i), i, 0) for i in range(4)]) for k in range(12)]
    with pytest.raises(InvalidArgument, match="configurations"):
        solve_exhaustive(Problem([ChainSpec("c", 12, wide)]), 100.0)


def test_planner_does_not_import_torch():
    code = f"""
import importlib, sys, types
root = {str(ROOT / "fxcompress")!r}
for name, path in (("fxcompress", root), ("fxcompress.depth", root + "/depth")):
    package = types.ModuleType(name)  # empty packages: their __init__ would import torch
    package.__path__ = [path]
    sys.modules[name] = package
planner = importlib.import_module("fxcompress.depth.planner")  # its __init__ and its modules
loaded = sorted(n for n in sys.modules if n.startswith("fxcompress."))
expected = ["fxcompress.depth", "fxcompress.depth.planner", "fxcompress.depth.segment",
            "fxcompress.errors"]
assert set(expected) <= set(loaded), loaded
others = [n for n in loaded if n not in expected and not n.startswith("fxcompress.depth.planner.")]
assert not others, f"planner loaded {{others}}"
assert len(loaded) > len(expected), loaded  # the package's modules were loaded too
seg = planner.Span(0, 1, [planner.Choice("k", 1.0, 0.0)])
assert planner.solve(planner.Problem([planner.ChainSpec("c", 1, [seg])]), 2.0).damage == 0.0
planner.solve_exhaustive(planner.Problem([planner.ChainSpec("c", 1, [seg])]), 2.0)
planner.alternatives(planner.Problem([planner.ChainSpec("c", 1, [seg])]), 2.0, 2)
assert "torch" not in sys.modules, "planner imported torch"
print("ok")
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd="/"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
