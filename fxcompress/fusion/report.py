"""What a :func:`~fxcompress.fusion.fuse` call did (frozen, JSON-able).

:class:`FusionReport` follows the report protocol (:class:`fxcompress.report.MethodReport`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from fxcompress.report import known_fields

__all__ = ["Fusion", "FusionReport"]


@dataclass(frozen=True)
class Fusion:
    """One fusion: ``members`` (block names) joined at ``slot`` (share) or as whole blocks."""

    mode: str
    role: str  # signature of the blocks' role
    slot: str | None  # qualified name of the kept module (share mode)
    members: tuple[str, ...]
    score: float
    saved: int  # unique parameters saved


@dataclass(frozen=True)
class FusionReport:
    """What :func:`fuse` did (in ``result.meta["fxcompress.fusion"]``).

    Examples
    --------
    >>> f = Fusion("share", "role", "blocks.0.fc1", ("blocks.0", "blocks.1"), 0.9, 136)
    >>> r = FusionReport("share", 0.5, "weight", 1, 1120, 984, 4, 4, (f,))
    >>> FusionReport.from_dict(json.loads(r.to_json())) == r
    True
    """

    mode: str
    budget: float
    similarity: str
    steps: int
    params_before: int
    params_after: int
    blocks_before: int
    blocks_after: int
    fusions: tuple[Fusion, ...] = ()
    aligned_units: int = 0
    skipped: tuple[tuple[str, str], ...] = field(default=())

    @property
    def ratio(self) -> float:
        """Unique parameters after / before."""
        return self.params_after / self.params_before if self.params_before else 1.0

    def to_dict(self) -> dict[str, Any]:
        """The fields (fusions as dicts) and ``ratio``."""
        d = asdict(self)
        d["ratio"] = self.ratio
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FusionReport:
        """A report from :meth:`to_dict` (or its JSON); unknown keys such as ``ratio`` are
        ignored."""
        kw = known_fields(cls, d)
        kw["fusions"] = tuple(
            Fusion(**{**f, "members": tuple(f["members"])}) for f in kw.get("fusions", ())
        )
        kw["skipped"] = tuple(tuple(s) for s in kw.get("skipped", ()))
        return cls(**kw)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    def to_markdown(self) -> str:
        lines = [
            f"# fxcompress fusion report ({self.mode})",
            "",
            f"- unique parameters: {self.params_before:,} -> {self.params_after:,} "
            f"({self.ratio:.3f}; budget {self.budget:g})",
            f"- residual blocks executed: {self.blocks_before} -> {self.blocks_after}",
            f"- similarity: {self.similarity}; steps: {self.steps}; "
            f"hidden units moved by alignment: {self.aligned_units}",
        ]
        if self.fusions:
            lines += ["", "| members | slot | similarity | saved |", "|---|---|---|---|"]
            lines += [
                f"| {' + '.join(f.members)} | {f.slot or '(block)'} | {f.score:.3f} | {f.saved:,} |"
                for f in self.fusions
            ]
        for name, why in self.skipped:
            lines.append(f"- left as is: {name}: {why}")
        return "\n".join(lines) + "\n"
