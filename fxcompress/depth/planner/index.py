"""The validated, canonically ordered view of a :class:`~.problem.Problem` that the solvers walk.

:func:`build_index` checks the invariants that span chains (unique names, known sub chains, one
holder per sub chain, no cycles) and orders everything: chains after their sub chains, choices
by key, each choice numbered (:attr:`PlacedChoice.uid`).
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fxcompress.depth.segment import Segment
from fxcompress.errors import InvalidArgument

if TYPE_CHECKING:
    from fxcompress.depth.planner.problem import ChainSpec, Choice

__all__ = ["Index", "PlacedChoice", "build_index"]


@dataclass(frozen=True, eq=False)
class PlacedChoice:
    """A choice of a segment, with its sub chains in canonical (sorted) order."""

    uid: int
    chain: str
    start: int
    stop: int
    choice: Choice
    subs: tuple[str, ...]

    def segment(self) -> Segment:
        """The decision this choice stands for."""
        return Segment(self.chain, self.start, self.stop, self.choice.key)


@dataclass(frozen=True, eq=False)
class Index:
    """Validated, canonically ordered view of a problem."""

    chains: Mapping[str, ChainSpec]
    order: tuple[str, ...]  # every chain after all of its sub chains
    roots: tuple[str, ...]  # sorted by name
    options: tuple[PlacedChoice, ...]  # by uid
    # steps[name][k]: the segments starting at k as (stop, options by key), by ascending stop
    steps: Mapping[str, tuple[tuple[tuple[int, tuple[PlacedChoice, ...]], ...], ...]]


def build_index(chains: tuple[ChainSpec, ...]) -> Index:
    """Check the cross-chain invariants of a problem and return its canonical index."""
    by_name: dict[str, ChainSpec] = {}
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
    options: list[PlacedChoice] = []
    steps: dict[str, tuple[tuple[tuple[int, tuple[PlacedChoice, ...]], ...], ...]] = {}
    for name in order:
        chain = by_name[name]
        starts: list[list[tuple[int, tuple[PlacedChoice, ...]]]] = [[] for _ in range(chain.length)]
        for segment in sorted(chain.segments, key=lambda s: (s.start, s.stop)):
            opts = []
            for choice in sorted(segment.choices, key=lambda c: c.key):
                option = PlacedChoice(
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
    return Index(by_name, tuple(order), roots, tuple(options), steps)
