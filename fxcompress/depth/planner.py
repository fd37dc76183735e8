"""Latency-budgeted choice of a configuration per chain of a network.

The problem
-----------
A network is a set of *chains*. A chain of length ``n`` has positions ``0..n``; a *segment*
``(start, stop)`` with ``0 <= start < stop <= n`` covers the items ``start + 1 .. stop`` and offers
one or more *choices*. A choice has a ``key`` (chosen by the caller), a ``latency`` (ms, >= 0), a
``damage`` (>= 0) and optionally ``sub``: names of other chains whose own configuration is part of
the choice (a nested branch, for example a residual block kept un-merged whose branch is planned
on its own). A *configuration* of a chain is a partition of ``0..n`` into consecutive listed
segments with one choice per segment and, recursively, a configuration of every sub chain of every
chosen choice. The *root* chains are the chains no choice refers to; they all run, so their
latencies add, and the problem's ``fixed_latency`` (the part of the network outside any chain) is
added on top. The planner minimises the total damage subject to ``total latency <= budget``.

Invariants of the input, checked when a :class:`Problem` is built (:class:`InvalidArgument`
otherwise): chain names are unique, segments lie in their chain and are not repeated, every
segment has at least one choice and its keys are unique, numbers are finite and non-negative,
every ``sub`` names another existing chain, a chain is referred to by choices of at most one
segment (several choices of that segment may share it), references have no cycle, and every
chain has at least one partition into its segments.

The algorithm
-------------
:func:`solve` discretises time with the bin width ``delta = (budget - fixed_latency) /
resolution``. A latency ``x`` takes ``ceil(x / delta)`` bins, rounded up in exact rational
arithmetic (``x``, ``budget`` and ``fixed_latency`` are read as the exact values of their floats,
so a latency of exactly ``k * delta`` takes ``k`` bins and no floating error can round down); a
configuration whose bins fit in ``resolution`` therefore fits the budget exactly.

Chains are processed bottom-up (sub chains first). For each, a dynamic programme over the
positions builds the *profile* ``P[t]``, the least damage of a configuration using at most ``t``
bins (non-increasing in ``t``). A choice with sub chains contributes its own latency and damage
plus the min-plus convolution of its sub chains' profiles. The root profiles are combined by
min-plus convolution (a knapsack over chains) and the answer is read at ``t = resolution``, then
back-tracked. One chain costs ``O(#choices * T)`` numpy work (``T = resolution + 1``) plus
``O(T * k)`` per min-plus convolution, where ``k <= T`` is the number of distinct damage levels of
the smaller operand.

Guarantees of :func:`solve`:

* the returned configuration satisfies ``latency <= budget`` (``latency`` is ``fixed_latency``
  plus the :func:`math.fsum` of the true latencies, never the rounded ones);
* its damage is the least among the configurations whose rounded latencies fit in
  ``resolution`` bins; in particular it is at most the exact optimum for the budget
  ``budget - m * delta``, where ``m`` is the largest number of choices in a configuration,
  and never less than the exact optimum for ``budget``;
* any budget ``>= min_latency(problem)`` gets a solution: when rounding leaves no configuration
  in ``resolution`` bins, the resolution is doubled (up to 4 times), and if that is still not
  enough, the least-damage configuration of the lowest latency is returned;
* among configurations of (up to a relative ``1e-12``) equal damage the one with the fewest bins
  is preferred, and the remaining ties are broken by a fixed order (chains by name; segments by
  ascending ``stop``; choices by ascending key), so the same input always gives the same
  :class:`Solution`.

For a fixed resolution, the damage is non-increasing in the budget. The retries above use a finer
grid, so a budget just under the point where ``resolution`` bins start to suffice can get a
*better* plan than a budget just above it.

:func:`solve_exhaustive` enumerates every configuration; it is exact and exponential, meant as a
test oracle and for tiny instances.

Examples
--------
>>> conv = Segment(0, 1, (Choice("keep", 2.0, 0.0), Choice("prune", 1.0, 0.5)))
>>> act = Segment(1, 2, (Choice("keep", 1.0, 0.0),))
>>> fused = Segment(0, 2, (Choice("merge", 2.0, 0.3),))
>>> problem = Problem((Chain("body", 2, (conv, act, fused)),), fixed_latency=0.5)
>>> min_latency(problem)
2.5
>>> [(d.start, d.stop, d.key) for d in solve(problem, 3.0).decisions]
[(0, 2, 'merge')]
>>> [(d.start, d.stop, d.key) for d in solve(problem, 4.0).decisions]
[(0, 1, 'keep'), (1, 2, 'keep')]
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from numbers import Real
from typing import Any

import numpy as np

from fxcompress.errors import InfeasibleBudget, InvalidArgument

__all__ = [
    "Chain",
    "Choice",
    "Decision",
    "Problem",
    "Segment",
    "Solution",
    "alternatives",
    "min_latency",
    "pareto_front",
    "ranked",
    "solve",
    "solve_exhaustive",
]

_TIE_RTOL = 1e-12
"""Damages within this relative distance of the optimum count as ties."""

_RETRIES = 4
"""How many times :func:`solve` doubles the resolution before falling back."""

_EXHAUSTIVE_LIMIT = 1_000_000
"""The largest number of configurations :func:`solve_exhaustive` agrees to enumerate."""


# --------------------------------------------------------------------------- input checking


def _number(value: object, what: str) -> float:
    """Return ``value`` as a float if it is a finite non-negative real, else raise."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, Real):
        raise InvalidArgument(
            f"{what} must be a finite non-negative number, got {value!r} of type "
            f"{type(value).__name__}"
        )
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise InvalidArgument(f"{what} must be a finite non-negative number, got {value!r}")
    return number


def _integer(value: object, what: str, *, minimum: int) -> int:
    """Return ``value`` as an int if it is an integer ``>= minimum``, else raise."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InvalidArgument(
            f"{what} must be an integer, got {value!r} of type {type(value).__name__}"
        )
    if value < minimum:
        raise InvalidArgument(f"{what} must be >= {minimum}, got {value!r}")
    return int(value)


def _tuple_of(value: object, kind: type, what: str) -> tuple[Any, ...]:
    """Return ``value`` (any non-string iterable) as a tuple whose items are all ``kind``."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise InvalidArgument(
            f"{what} must be a sequence of {kind.__name__}, got {value!r} of type "
            f"{type(value).__name__}"
        )
    items = tuple(value)
    for item in items:
        if not isinstance(item, kind):
            raise InvalidArgument(
                f"{what} must hold {kind.__name__} items, got {item!r} of type "
                f"{type(item).__name__}"
            )
    return items


def _check_budget(budget: object) -> float:
    """Return ``budget`` as a float; it may be ``inf`` but not nan, negative or a non-number."""
    if isinstance(budget, (bool, np.bool_)) or not isinstance(budget, Real):
        raise InvalidArgument(
            f"budget must be a non-negative number of ms, got {budget!r} of type "
            f"{type(budget).__name__}"
        )
    value = float(budget)
    if math.isnan(value) or value < 0:
        raise InvalidArgument(
            f"budget must be a non-negative number of ms, got {budget!r} of type "
            f"{type(budget).__name__}"
        )
    return value


def _expect_keys(data: object, required: set[str], optional: set[str], what: str) -> Mapping:
    """Check that ``data`` is a mapping with exactly the given keys."""
    if not isinstance(data, Mapping):
        raise InvalidArgument(f"{what} must be a mapping, got {type(data).__name__}")
    missing = required - data.keys()
    unknown = data.keys() - required - optional
    if missing or unknown:
        raise InvalidArgument(
            f"{what} has missing keys {sorted(missing)} and unknown keys {sorted(unknown)}"
        )
    return data


def _list_of(data: object, what: str) -> list[Any]:
    """Return ``data`` as a list if it is a list or a tuple (as JSON decoding gives)."""
    if not isinstance(data, (list, tuple)):
        raise InvalidArgument(f"{what} must be a list, got {type(data).__name__}")
    return list(data)


# --------------------------------------------------------------------------- public data types


@dataclass(frozen=True)
class Choice:
    """One way to implement a segment.

    Parameters
    ----------
    key : str
        Caller's name of the choice, unique within its segment.
    latency, damage : float
        Finite and non-negative; ints are converted to floats.
    sub : tuple of str
        Names of the chains whose configuration is part of this choice (nested branches); their
        latency and damage add to this choice's own.

    Examples
    --------
    >>> Choice("kept", 1, 0.0, sub=["branch"])
    Choice(key='kept', latency=1.0, damage=0.0, sub=('branch',))
    """

    key: str
    latency: float
    damage: float
    sub: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.key, str):
            raise InvalidArgument(
                f"choice key must be a str, got {self.key!r} of type {type(self.key).__name__}"
            )
        object.__setattr__(self, "latency", _number(self.latency, f"latency of {self.key!r}"))
        object.__setattr__(self, "damage", _number(self.damage, f"damage of {self.key!r}"))
        sub = _tuple_of(self.sub, str, f"sub of choice {self.key!r}")
        if len(set(sub)) != len(sub):
            raise InvalidArgument(f"choice {self.key!r} names a sub chain twice: {sub!r}")
        object.__setattr__(self, "sub", sub)


@dataclass(frozen=True)
class Segment:
    """The items ``start + 1 .. stop`` of a chain and the choices that implement them.

    Examples
    --------
    >>> Segment(0, 2, [Choice("merge", 1.5, 0.2)]).choices
    (Choice(key='merge', latency=1.5, damage=0.2, sub=()),)
    """

    start: int
    stop: int
    choices: tuple[Choice, ...]

    def __post_init__(self) -> None:
        start = _integer(self.start, "segment start", minimum=0)
        stop = _integer(self.stop, "segment stop", minimum=0)
        if stop <= start:
            raise InvalidArgument(f"segment ({start}, {stop}) must have start < stop")
        choices = _tuple_of(self.choices, Choice, f"choices of segment ({start}, {stop})")
        if not choices:
            raise InvalidArgument(f"segment ({start}, {stop}) has no choices")
        keys = [choice.key for choice in choices]
        if len(set(keys)) != len(keys):
            raise InvalidArgument(f"segment ({start}, {stop}) repeats a choice key: {keys!r}")
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "choices", choices)


@dataclass(frozen=True)
class Chain:
    """A chain of ``length`` items with positions ``0..length`` and its candidate segments.

    Examples
    --------
    >>> Chain("stem", 1, [Segment(0, 1, [Choice("keep", 1.0, 0.0)])]).length
    1
    >>> Chain("stem", 2, [Segment(0, 1, [Choice("keep", 1.0, 0.0)])])
    Traceback (most recent call last):
    ...
    fxcompress.errors.InvalidArgument: chain 'stem' has no partition of 0..2 into its segments \
(position 2 is never reached)
    """

    name: str
    length: int
    segments: tuple[Segment, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise InvalidArgument(
                f"chain name must be a str, got {self.name!r} of type {type(self.name).__name__}"
            )
        length = _integer(self.length, f"length of chain {self.name!r}", minimum=1)
        segments = _tuple_of(self.segments, Segment, f"segments of chain {self.name!r}")
        seen: set[tuple[int, int]] = set()
        for segment in segments:
            span = (segment.start, segment.stop)
            if segment.stop > length:
                raise InvalidArgument(
                    f"segment {span} of chain {self.name!r} ends after its length {length}"
                )
            if span in seen:
                raise InvalidArgument(f"chain {self.name!r} lists segment {span} twice")
            seen.add(span)
        reached = [False] * (length + 1)
        reached[0] = True
        for segment in sorted(segments, key=lambda s: s.start):
            if reached[segment.start]:
                reached[segment.stop] = True
        if not reached[length]:
            raise InvalidArgument(
                f"chain {self.name!r} has no partition of 0..{length} into its segments "
                f"(position {length} is never reached)"
            )
        object.__setattr__(self, "length", length)
        object.__setattr__(self, "segments", segments)


@dataclass(frozen=True)
class Decision:
    """The choice ``key`` made for segment ``(start, stop)`` of chain ``chain``."""

    chain: str
    start: int
    stop: int
    key: str


@dataclass(frozen=True, eq=False)
class _Option:
    """A choice of a segment, with its sub chains in canonical (sorted) order."""

    uid: int
    chain: str
    start: int
    stop: int
    choice: Choice
    subs: tuple[str, ...]

    def decision(self) -> Decision:
        return Decision(self.chain, self.start, self.stop, self.choice.key)


@dataclass(frozen=True, eq=False)
class _Index:
    """Validated, canonically ordered view of a problem."""

    chains: Mapping[str, Chain]
    order: tuple[str, ...]  # every chain after all of its sub chains
    roots: tuple[str, ...]  # sorted by name
    options: tuple[_Option, ...]  # by uid
    # steps[name][k]: the segments starting at k as (stop, options by key), by ascending stop
    steps: Mapping[str, tuple[tuple[tuple[int, tuple[_Option, ...]], ...], ...]]


def _build_index(chains: tuple[Chain, ...]) -> _Index:
    """Check the cross-chain invariants of a problem and return its canonical index."""
    by_name: dict[str, Chain] = {}
    for chain in chains:
        if chain.name in by_name:
            raise InvalidArgument(f"chain name {chain.name!r} is used twice")
        by_name[chain.name] = chain
    holder: dict[str, tuple[str, int, int]] = {}
    deps: dict[str, set[str]] = {name: set() for name in by_name}
    for chain in chains:
        for segment in chain.segments:
            for choice in segment.choices:
                for sub in choice.sub:
                    if sub not in by_name:
                        raise InvalidArgument(
                            f"choice {choice.key!r} of segment ({segment.start}, {segment.stop}) "
                            f"of chain {chain.name!r} refers to an unknown chain {sub!r}"
                        )
                    where = (chain.name, segment.start, segment.stop)
                    if holder.setdefault(sub, where) != where:
                        first = holder[sub]
                        raise InvalidArgument(
                            f"chain {sub!r} is a sub chain of two segments: {first[1:]} of chain "
                            f"{first[0]!r} and {where[1:]} of chain {where[0]!r}"
                        )
                    deps[chain.name].add(sub)
    # Kahn's algorithm, smallest name first: every chain comes after its sub chains.
    waiting = {name: len(subs) for name, subs in deps.items()}
    users: dict[str, list[str]] = {name: [] for name in by_name}
    for name, subs in deps.items():
        for sub in subs:
            users[sub].append(name)
    ready = [name for name, count in waiting.items() if count == 0]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        name = heapq.heappop(ready)
        order.append(name)
        for user in users[name]:
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, user)
    if len(order) != len(by_name):
        stuck = sorted(set(by_name) - set(order))
        raise InvalidArgument(f"sub chain references form a cycle among chains {stuck}")
    options: list[_Option] = []
    steps: dict[str, tuple[tuple[tuple[int, tuple[_Option, ...]], ...], ...]] = {}
    for name in order:
        chain = by_name[name]
        starts: list[list[tuple[int, tuple[_Option, ...]]]] = [[] for _ in range(chain.length)]
        for segment in sorted(chain.segments, key=lambda s: (s.start, s.stop)):
            opts = []
            for choice in sorted(segment.choices, key=lambda c: c.key):
                option = _Option(
                    len(options),
                    name,
                    segment.start,
                    segment.stop,
                    choice,
                    tuple(sorted(choice.sub)),
                )
                options.append(option)
                opts.append(option)
            starts[segment.start].append((segment.stop, tuple(opts)))
        steps[name] = tuple(tuple(row) for row in starts)
    roots = tuple(sorted(name for name in by_name if name not in holder))
    return _Index(by_name, tuple(order), roots, tuple(options), steps)


@dataclass(frozen=True)
class Problem:
    """A set of chains to configure, plus the latency of the rest of the network.

    Parameters
    ----------
    chains : tuple of Chain
        Any iterable of chains is accepted and stored as a tuple.
    fixed_latency : float
        Latency (ms) outside every chain, added to every configuration.

    Raises
    ------
    InvalidArgument
        If an invariant listed in the module docstring does not hold.

    Examples
    --------
    >>> merged = Choice("merged", 1.0, 0.4)
    >>> kept = Choice("kept", 0.5, 0.0, sub=("branch",))
    >>> block = Chain("block", 1, [Segment(0, 1, [merged, kept])])
    >>> branch = Chain("branch", 1, [Segment(0, 1, [Choice("conv", 1.0, 0.0)])])
    >>> problem = Problem([block, branch], fixed_latency=0.25)
    >>> Problem.from_dict(problem.to_dict()) == problem
    True
    >>> Problem([block])
    Traceback (most recent call last):
    ...
    fxcompress.errors.InvalidArgument: choice 'kept' of segment (0, 1) of chain 'block' refers \
to an unknown chain 'branch'
    """

    chains: tuple[Chain, ...]
    fixed_latency: float = 0.0

    def __post_init__(self) -> None:
        chains = _tuple_of(self.chains, Chain, "chains")
        object.__setattr__(self, "chains", chains)
        object.__setattr__(self, "fixed_latency", _number(self.fixed_latency, "fixed_latency"))
        object.__setattr__(self, "_index", _build_index(chains))

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict; :meth:`from_dict` rebuilds an equal problem."""
        return {
            "fixed_latency": self.fixed_latency,
            "chains": [
                {
                    "name": chain.name,
                    "length": chain.length,
                    "segments": [
                        {
                            "start": segment.start,
                            "stop": segment.stop,
                            "choices": [
                                {
                                    "key": choice.key,
                                    "latency": choice.latency,
                                    "damage": choice.damage,
                                    "sub": list(choice.sub),
                                }
                                for choice in segment.choices
                            ],
                        }
                        for segment in chain.segments
                    ],
                }
                for chain in self.chains
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Problem:
        """Build a problem from the output of :meth:`to_dict` (for example after JSON)."""
        data = _expect_keys(data, {"chains"}, {"fixed_latency"}, "problem")
        chains = []
        for chain_data in _list_of(data["chains"], "chains"):
            chain_data = _expect_keys(chain_data, {"name", "length", "segments"}, set(), "chain")
            segments = []
            for seg_data in _list_of(chain_data["segments"], "segments"):
                seg_data = _expect_keys(seg_data, {"start", "stop", "choices"}, set(), "segment")
                choices = []
                for ch_data in _list_of(seg_data["choices"], "choices"):
                    ch_data = _expect_keys(ch_data, {"key", "latency", "damage"}, {"sub"}, "choice")
                    sub = _list_of(ch_data.get("sub", []), "sub")
                    choices.append(
                        Choice(ch_data["key"], ch_data["latency"], ch_data["damage"], tuple(sub))
                    )
                segments.append(Segment(seg_data["start"], seg_data["stop"], tuple(choices)))
            chains.append(Chain(chain_data["name"], chain_data["length"], tuple(segments)))
        return cls(tuple(chains), data.get("fixed_latency", 0.0))


@dataclass(frozen=True)
class Solution:
    """A configuration of every used chain and what it costs.

    Attributes
    ----------
    decisions : tuple of Decision
        One per segment of every used chain (the root chains and, recursively, the sub chains of
        the chosen choices), sorted by ``(chain, start)``.
    latency : float
        ``fixed_latency`` plus the sum of the true latencies of the chosen choices.
    damage : float
        Sum of the damages of the chosen choices.
    budget : float
        The budget that was asked for.

    Examples
    --------
    >>> sol = Solution((Decision("body", 0, 1, "keep"),), latency=1.5, damage=0.0, budget=2.0)
    >>> sol.to_dict()
    {'budget': 2.0, 'latency': 1.5, 'damage': 0.0, 'decisions': [{'chain': 'body', 'start': 0, \
'stop': 1, 'key': 'keep'}]}
    >>> Solution.from_dict(sol.to_dict()) == sol
    True
    """

    decisions: tuple[Decision, ...]
    latency: float
    damage: float
    budget: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "decisions", _tuple_of(self.decisions, Decision, "decisions"))

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict with a fixed key order (an ``inf`` budget stays ``inf``)."""
        return {
            "budget": self.budget,
            "latency": self.latency,
            "damage": self.damage,
            "decisions": [
                {"chain": d.chain, "start": d.start, "stop": d.stop, "key": d.key}
                for d in self.decisions
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Solution:
        """Rebuild a solution from the output of :meth:`to_dict`."""
        data = _expect_keys(data, {"budget", "latency", "damage", "decisions"}, set(), "solution")
        decisions = []
        for item in _list_of(data["decisions"], "decisions"):
            item = _expect_keys(item, {"chain", "start", "stop", "key"}, set(), "decision")
            decisions.append(Decision(item["chain"], item["start"], item["stop"], item["key"]))
        return cls(
            tuple(decisions), float(data["latency"]), float(data["damage"]), float(data["budget"])
        )


def _index_of(problem: Problem) -> _Index:
    if not isinstance(problem, Problem):
        raise InvalidArgument(
            f"problem must be a Problem, got {problem!r} of type {type(problem).__name__}"
        )
    return problem._index  # type: ignore[attr-defined]


def _make_solution(problem: Problem, picks: Iterable[_Option], budget: float) -> Solution:
    picks = list(picks)
    decisions = sorted(
        (option.decision() for option in picks), key=lambda d: (d.chain, d.start, d.stop, d.key)
    )
    latency = math.fsum([problem.fixed_latency, *(option.choice.latency for option in picks)])
    damage = math.fsum(option.choice.damage for option in picks)
    return Solution(tuple(decisions), latency, damage, budget)


# --------------------------------------------------------------------------- exact extremes


@dataclass(frozen=True)
class _Extremes:
    min_latency: Fraction  # exact, fixed latency included
    min_picks: tuple[_Option, ...]  # least damage among the configurations of that latency
    max_chain_latency: Fraction  # exact, fixed latency excluded
    max_count: int  # most choices in one configuration


def _extremes(problem: Problem, idx: _Index) -> _Extremes:
    """Exact (rational) lowest/highest latency and largest size over all configurations."""
    low: dict[str, tuple[Fraction, Fraction, tuple[_Option, ...]]] = {}
    high: dict[str, Fraction] = {}
    count: dict[str, int] = {}
    for name in idx.order:
        length = idx.chains[name].length
        best_low: list[tuple[Fraction, Fraction, tuple[_Option, ...]] | None] = [None] * length
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
        low[name] = best_low[0]  # type: ignore[assignment]  # a partition exists (Chain checks)
        high[name] = best_high[0]  # type: ignore[assignment]
        count[name] = best_count[0]  # type: ignore[assignment]
    return _Extremes(
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
    >>> fast = Segment(0, 1, [Choice("a", 0.1, 1.0), Choice("b", 0.2, 0.0)])
    >>> min_latency(Problem([Chain("c", 1, [fast])], fixed_latency=0.2))
    0.30000000000000004
    """
    idx = _index_of(problem)
    return float(_extremes(problem, idx).min_latency)


# --------------------------------------------------------------------------- dynamic programme


def _bins(idx: _Index, width: Fraction, cap: int) -> list[int]:
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


def _min_bins(idx: _Index, bins: Sequence[int], cap: int) -> float:
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


def _breaks(profile: np.ndarray) -> np.ndarray:
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
    shifts = _breaks(a)
    other = _breaks(b)
    if other.shape[0] < shifts.shape[0]:
        a, b, shifts = b, a, other
    out = np.full(size, np.inf)
    for s in shifts.tolist():
        view = out[s:]
        np.minimum(view, a[s] + b[: size - s], out=view)
    return out


@dataclass(frozen=True, eq=False)
class _Tables:
    """Everything the back-tracking needs, for one bin width and capacity."""

    idx: _Index
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


def _run_dp(idx: _Index, bins: list[int], cap: int) -> _Tables:
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
    return _Tables(idx, bins, rows, own, folds, root_folds)


def _first_hit(left: np.ndarray, right: np.ndarray, t: int, target: float) -> int:
    """Smallest ``s <= t`` with ``left[s] + right[t - s] == target`` (the value the DP stored)."""
    hits = np.flatnonzero(left[: t + 1] + right[t::-1] == target)
    return int(hits[0]) if hits.shape[0] else -1


def _track_folds(
    tables: _Tables, names: Sequence[str], folds: Sequence[np.ndarray], t: int, out: list
) -> None:
    for i in range(len(names) - 1, 0, -1):
        s = _first_hit(folds[i - 1], tables.rows[names[i]][0], t, folds[i][t])
        if s < 0:  # pragma: no cover - the DP stored one of these sums
            raise AssertionError("planner back-tracking lost the optimum")
        _track_chain(tables, names[i], t - s, out)
        t = s
    _track_chain(tables, names[0], t, out)


def _track_chain(tables: _Tables, name: str, t: int, out: list) -> None:
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


def _track(tables: _Tables, t: int) -> list[_Option]:
    """Back-track the configuration the DP found for exactly the value ``final[t]``."""
    out: list[_Option] = []
    if tables.idx.roots:
        _track_folds(tables, tables.idx.roots, tables.root_folds, t, out)
    return out


def _best_bins(final: np.ndarray, cap: int) -> int:
    """Fewest bins whose least damage ties (relative ``1e-12``) the least damage within ``cap``."""
    best = final[cap]
    return int(np.flatnonzero(final <= best + _TIE_RTOL * best)[0])


def _full_range(problem: Problem, idx: _Index, ext: _Extremes, resolution: int) -> _Tables:
    """Tables in which every configuration fits: the bins span the highest latency."""
    cap = resolution + ext.max_count + 1  # each option may round up by one bin
    return _run_dp(idx, _bins(idx, ext.max_chain_latency / resolution, cap), cap)


# --------------------------------------------------------------------------- public solvers


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
    >>> layer = Segment(0, 1, [Choice("dense", 3.0, 0.0), Choice("sparse", 1.0, 0.7)])
    >>> problem = Problem([Chain("mlp", 1, [layer])])
    >>> solve(problem, 2.0)
    Solution(decisions=(Decision(chain='mlp', start=0, stop=1, key='sparse'),), latency=1.0, \
damage=0.7, budget=2.0)
    >>> solve(problem, 0.5)
    Traceback (most recent call last):
    ...
    fxcompress.errors.InfeasibleBudget: budget 0.5 ms is below the lowest reachable latency 1.0 ms
    """
    idx = _index_of(problem)
    budget = _check_budget(budget)
    resolution = _integer(resolution, "resolution", minimum=1)
    ext = _extremes(problem, idx)
    lowest = float(ext.min_latency)
    if budget < lowest:
        raise InfeasibleBudget(
            f"budget {budget!r} ms is below the lowest reachable latency {lowest!r} ms",
            minimum=lowest,
        )
    if math.isinf(budget):
        tables = _full_range(problem, idx, ext, resolution)
        cap = len(tables.final) - 1
        return _make_solution(problem, _track(tables, _best_bins(tables.final, cap)), budget)
    grid = _grid(problem, idx, budget, resolution)
    if grid is None:
        solution = _make_solution(problem, ext.min_picks, budget)
        assert solution.latency <= budget, "the fastest configuration must fit a budget >= it"
        return solution
    bins, cap = grid
    tables = _run_dp(idx, bins, cap)
    solution = _make_solution(problem, _track(tables, _best_bins(tables.final, cap)), budget)
    # exact: sum(latency) <= sum(bins) * room / cap <= room, and fsum rounds monotonically
    assert solution.latency <= budget, "rounded-up latencies must fit the budget"
    return solution


def _grid(
    problem: Problem, idx: _Index, budget: float, resolution: int
) -> tuple[list[int], int] | None:
    """The bins of every option and the capacity :func:`solve` plans with for a finite budget
    ``>= min_latency``: the first of ``resolution`` and its doublings in which some
    configuration fits, or None if none does (then the fastest configuration is the answer)."""
    room = Fraction(budget) - Fraction(problem.fixed_latency)  # >= 0 as budget >= lowest
    for doubling in range(_RETRIES + 1):
        cap = resolution << doubling
        bins = _bins(idx, room / cap, cap)
        if _min_bins(idx, bins, cap) <= cap:
            return bins, cap
    return None


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
    >>> a = Segment(0, 1, [Choice("keep", 2.0, 0.0), Choice("thin", 1.0, 0.2)])
    >>> b = Segment(1, 2, [Choice("keep", 2.0, 0.0), Choice("thin", 1.0, 0.5)])
    >>> problem = Problem([Chain("c", 2, [a, b])])
    >>> [[d.key for d in s.decisions] for s in alternatives(problem, 3.5, 3)]
    [['thin', 'keep'], ['keep', 'thin'], ['thin', 'thin']]
    """
    count = _integer(count, "count", minimum=1)
    return tuple(itertools.islice(ranked(problem, budget, resolution=resolution), count))


def ranked(problem: Problem, budget: float, *, resolution: int = 2000) -> Iterator[Solution]:
    """Yield the configurations within the budget by increasing damage (see :func:`alternatives`).

    Each solution after the first costs up to one run of the dynamic programme per choice of
    each configuration yielded before it, so take only as many as needed.

    Examples
    --------
    >>> layer = Segment(0, 1, [Choice("a", 1.0, 0.0), Choice("b", 0.5, 0.1), Choice("c", 3.0, 0.0)])
    >>> [s.decisions[0].key for s in ranked(Problem([Chain("mlp", 1, [layer])]), 2.0)]
    ['a', 'b']
    """
    best = solve(problem, budget, resolution=resolution)
    if math.isinf(best.budget):
        raise InvalidArgument("ranked configurations need a finite budget, got inf")
    idx = _index_of(problem)
    grid = _grid(problem, idx, best.budget, _integer(resolution, "resolution", minimum=1))
    yield best
    if grid is None:
        return  # solve fell back to the fastest configuration: no grid to rank others on
    bins, cap = grid
    uid = {option.decision(): option.uid for option in idx.options}

    def solve_avoiding(forbidden: frozenset[int]) -> Solution | None:
        width = list(bins)
        for u in forbidden:
            width[u] = cap + 1  # the DP skips options wider than cap
        if _min_bins(idx, width, cap) > cap:
            return None  # every configuration that fits uses a forbidden choice
        tables = _run_dp(idx, width, cap)
        solution = _make_solution(
            problem, _track(tables, _best_bins(tables.final, cap)), best.budget
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
    >>> layer = Segment(0, 1, [Choice("dense", 3.0, 0.0), Choice("sparse", 1.0, 0.7),
    ...                        Choice("wasteful", 4.0, 0.9)])
    >>> pareto_front(Problem([Chain("mlp", 1, [layer])], fixed_latency=0.5))
    ((1.5, 0.7), (3.5, 0.0))
    """
    idx = _index_of(problem)
    resolution = _integer(resolution, "resolution", minimum=1)
    tables = _full_range(problem, idx, _extremes(problem, idx), resolution)
    points = set()
    for t in _breaks(tables.final).tolist():
        solution = _make_solution(problem, _track(tables, t), math.inf)
        points.add((solution.latency, solution.damage))
    front: list[tuple[float, float]] = []
    for latency, damage in sorted(points):
        if not front or damage < front[-1][1]:
            front.append((latency, damage))
    return tuple(front)


def _count_configurations(idx: _Index) -> int:
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


def _configurations(idx: _Index) -> Iterable[tuple[_Option, ...]]:
    """Every configuration of the problem, as the tuple of its chosen options."""
    memo: dict[str, list[tuple[_Option, ...]]] = {}
    for name in idx.order:
        length = idx.chains[name].length
        tails: list[list[tuple[_Option, ...]]] = [[] for _ in range(length)] + [[()]]
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
    >>> layer = Segment(0, 1, [Choice("dense", 3.0, 0.0), Choice("sparse", 1.0, 0.7)])
    >>> solve_exhaustive(Problem([Chain("mlp", 1, [layer])]), 3.0).damage
    0.0
    """
    idx = _index_of(problem)
    budget = _check_budget(budget)
    lowest = float(_extremes(problem, idx).min_latency)
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
        solution = _make_solution(problem, picks, budget)
        if solution.latency <= budget:
            fitting.append(solution)
    least = min(solution.damage for solution in fitting)
    return min(
        (s for s in fitting if s.damage <= least + _TIE_RTOL * least),
        key=lambda s: (s.latency, [(d.chain, d.start, d.stop, d.key) for d in s.decisions]),
    )
