"""The planner's input (:class:`Problem` of :class:`ChainSpec` of :class:`Span` of
:class:`Choice`) and output (:class:`Solution`), each checked when built and JSON-able."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fxcompress.depth.planner.checks import expect_keys, integer, list_of, number, tuple_of
from fxcompress.depth.planner.index import Index, PlacedChoice, build_index
from fxcompress.depth.segment import Segment
from fxcompress.errors import InvalidArgument

__all__ = ["ChainSpec", "Choice", "Problem", "Solution", "Span", "index_of", "make_solution"]


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
        object.__setattr__(self, "latency", number(self.latency, f"latency of {self.key!r}"))
        object.__setattr__(self, "damage", number(self.damage, f"damage of {self.key!r}"))
        sub = tuple_of(self.sub, str, f"sub of choice {self.key!r}")
        if len(set(sub)) != len(sub):
            raise InvalidArgument(f"choice {self.key!r} names a sub chain twice: {sub!r}")
        object.__setattr__(self, "sub", sub)


@dataclass(frozen=True)
class Span:
    """The items ``start + 1 .. stop`` of a chain and the choices that implement them.

    Examples
    --------
    >>> Span(0, 2, [Choice("merge", 1.5, 0.2)]).choices
    (Choice(key='merge', latency=1.5, damage=0.2, sub=()),)
    """

    start: int
    stop: int
    choices: tuple[Choice, ...]

    def __post_init__(self) -> None:
        start = integer(self.start, "segment start", minimum=0)
        stop = integer(self.stop, "segment stop", minimum=0)
        if stop <= start:
            raise InvalidArgument(f"segment ({start}, {stop}) must have start < stop")
        choices = tuple_of(self.choices, Choice, f"choices of segment ({start}, {stop})")
        if not choices:
            raise InvalidArgument(f"segment ({start}, {stop}) has no choices")
        keys = [choice.key for choice in choices]
        if len(set(keys)) != len(keys):
            raise InvalidArgument(f"segment ({start}, {stop}) repeats a choice key: {keys!r}")
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "choices", choices)


@dataclass(frozen=True)
class ChainSpec:
    """A chain of ``length`` items with positions ``0..length`` and its candidate segments.

    Examples
    --------
    >>> ChainSpec("stem", 1, [Span(0, 1, [Choice("keep", 1.0, 0.0)])]).length
    1
    >>> ChainSpec("stem", 2, [Span(0, 1, [Choice("keep", 1.0, 0.0)])])
    Traceback (most recent call last):
    ...
    fxcompress.errors.InvalidArgument: chain 'stem' has no partition of 0..2 into its segments \
(position 2 is never reached)
    """

    name: str
    length: int
    segments: tuple[Span, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise InvalidArgument(
                f"chain name must be a str, got {self.name!r} of type {type(self.name).__name__}"
            )
        length = integer(self.length, f"length of chain {self.name!r}", minimum=1)
        segments = tuple_of(self.segments, Span, f"segments of chain {self.name!r}")
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
class Problem:
    """A set of chains to configure, plus the latency of the rest of the network.

    Parameters
    ----------
    chains : tuple of ChainSpec
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
    >>> block = ChainSpec("block", 1, [Span(0, 1, [merged, kept])])
    >>> branch = ChainSpec("branch", 1, [Span(0, 1, [Choice("conv", 1.0, 0.0)])])
    >>> problem = Problem([block, branch], fixed_latency=0.25)
    >>> Problem.from_dict(problem.to_dict()) == problem
    True
    >>> Problem([block])
    Traceback (most recent call last):
    ...
    fxcompress.errors.InvalidArgument: choice 'kept' of segment (0, 1) of chain 'block' refers \
to an unknown chain 'branch'
    """

    chains: tuple[ChainSpec, ...]
    fixed_latency: float = 0.0

    def __post_init__(self) -> None:
        chains = tuple_of(self.chains, ChainSpec, "chains")
        object.__setattr__(self, "chains", chains)
        object.__setattr__(self, "fixed_latency", number(self.fixed_latency, "fixed_latency"))
        object.__setattr__(self, "_index", build_index(chains))

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
        data = expect_keys(data, {"chains"}, {"fixed_latency"}, "problem")
        chains = []
        for chain_data in list_of(data["chains"], "chains"):
            chain_data = expect_keys(chain_data, {"name", "length", "segments"}, set(), "chain")
            segments = []
            for seg_data in list_of(chain_data["segments"], "segments"):
                seg_data = expect_keys(seg_data, {"start", "stop", "choices"}, set(), "segment")
                choices = []
                for ch_data in list_of(seg_data["choices"], "choices"):
                    ch_data = expect_keys(ch_data, {"key", "latency", "damage"}, {"sub"}, "choice")
                    sub = list_of(ch_data.get("sub", []), "sub")
                    choices.append(
                        Choice(ch_data["key"], ch_data["latency"], ch_data["damage"], tuple(sub))
                    )
                segments.append(Span(seg_data["start"], seg_data["stop"], tuple(choices)))
            chains.append(ChainSpec(chain_data["name"], chain_data["length"], tuple(segments)))
        return cls(tuple(chains), data.get("fixed_latency", 0.0))


@dataclass(frozen=True)
class Solution:
    """A configuration of every used chain and what it costs.

    Attributes
    ----------
    decisions : tuple of Segment
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
    >>> sol = Solution((Segment("body", 0, 1, "keep"),), latency=1.5, damage=0.0, budget=2.0)
    >>> sol.to_dict()
    {'budget': 2.0, 'latency': 1.5, 'damage': 0.0, 'decisions': [{'chain': 'body', 'start': 0, \
'stop': 1, 'key': 'keep'}]}
    >>> Solution.from_dict(sol.to_dict()) == sol
    True
    """

    decisions: tuple[Segment, ...]
    latency: float
    damage: float
    budget: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "decisions", tuple_of(self.decisions, Segment, "decisions"))

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
        data = expect_keys(data, {"budget", "latency", "damage", "decisions"}, set(), "solution")
        decisions = []
        for item in list_of(data["decisions"], "decisions"):
            item = expect_keys(item, {"chain", "start", "stop", "key"}, set(), "decision")
            decisions.append(Segment(item["chain"], item["start"], item["stop"], item["key"]))
        return cls(
            tuple(decisions), float(data["latency"]), float(data["damage"]), float(data["budget"])
        )


def index_of(problem: Problem) -> Index:
    if not isinstance(problem, Problem):
        raise InvalidArgument(
            f"problem must be a Problem, got {problem!r} of type {type(problem).__name__}"
        )
    return problem._index  # type: ignore[attr-defined]


def make_solution(problem: Problem, picks: Iterable[PlacedChoice], budget: float) -> Solution:
    picks = list(picks)
    decisions = sorted(
        (option.segment() for option in picks), key=lambda d: (d.chain, d.start, d.stop, d.key)
    )
    latency = math.fsum([problem.fixed_latency, *(option.choice.latency for option in picks)])
    damage = math.fsum(option.choice.damage for option in picks)
    return Solution(tuple(decisions), latency, damage, budget)
