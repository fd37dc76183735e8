"""The one shape of a segment choice, from the analysis through the DP and the plan to the report.

A :class:`Segment` names the items ``start .. stop - 1`` of a chain and how they are implemented
(``key``: :data:`KEEP`, :data:`DROP`, ``"merge"`` or ``"merge:prune=a,b"``) with the units
``pruned``. It is a named tuple so that a plan's JSON (``[chain, start, stop, key, pruned]``) reads
and writes it unchanged; its :attr:`~Segment.id` is the one spelling of its name.
"""

from __future__ import annotations

from typing import Any, NamedTuple

__all__ = ["DROP", "KEEP", "MERGE", "Segment"]

#: choice key of a single item left as it is (a residual's branch is planned as a sub-chain)
KEEP = "keep"
#: choice key of a residual whose branch is dropped (the block becomes its shortcut)
DROP = "drop"
#: choice key of a merged segment with nothing pruned (pruned merges add ``:prune=...``)
MERGE = "merge"


class Segment(NamedTuple):
    """The choice ``key`` for items ``start .. stop - 1`` of chain ``chain``.

    Examples
    --------
    >>> s = Segment("layer1", 0, 2, "merge:prune=relu", ("relu",))
    >>> s.id
    'layer1:0-2:merge:prune=relu'
    >>> Segment.from_json(s.to_json()) == s
    True
    """

    chain: str
    start: int
    stop: int
    key: str
    pruned: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        """``chain:start-stop:key``, unique within a plan and stable across runs."""
        return f"{self.chain}:{self.start}-{self.stop}:{self.key}"

    def to_json(self) -> list[Any]:
        """``[chain, start, stop, key, [pruned...]]``, the form plans store."""
        return [self.chain, self.start, self.stop, self.key, list(self.pruned)]

    @classmethod
    def from_json(cls, item: Any) -> Segment:
        """The inverse of :meth:`to_json`."""
        chain, start, stop, key, pruned = item
        return cls(chain, int(start), int(stop), key, tuple(pruned))
