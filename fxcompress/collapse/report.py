"""What a :func:`~fxcompress.collapse.apply` call did, per site (frozen, JSON-able).

:class:`CollapseReport` follows the report protocol (:class:`fxcompress.report.MethodReport`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from fxcompress.report import known_fields

__all__ = ["CollapseReport", "SiteDecision"]


@dataclass(frozen=True)
class SiteDecision:
    """What :func:`apply` did with one site.

    Attributes
    ----------
    name : str
        The site (its :class:`Blend` module's name).
    slope : float
        Its learned slope ``a``.
    action : str
        ``"merged"`` (identity, and its layers composed into one), ``"identity"`` (identity, layers
        kept factored because merging would not be smaller), or ``"kept"`` (``|1 - a| > tol``).
    layers : tuple of str
        For a merged site, the layer nodes composed into one (the whole run).
    bound : float
        ``|1 - a| * c * ||T||_2``: the output of the collapsed run changes by at most
        ``bound * ||z||`` per position (token/pixel), ``z`` being the site's input, summed
        over the linearised sites of the run. 0 for kept sites.
    """

    name: str
    slope: float
    action: str
    layers: tuple[str, ...] = ()
    bound: float = 0.0


@dataclass(frozen=True)
class CollapseReport:
    """Result of :func:`apply`: per-site decisions and sizes (stored in ``meta``).

    Examples
    --------
    >>> site = SiteDecision("0_act", 0.98, "merged", ("0", "2"), 0.1)
    >>> r = CollapseReport((site,), 1097, 72, 0.05)
    >>> CollapseReport.from_dict(r.to_dict()) == r
    True
    """

    sites: tuple[SiteDecision, ...]
    params_before: int
    params_after: int
    tol: float
    output_error: float | None = None
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CollapseReport:
        """A report from :meth:`to_dict`; unknown keys are ignored."""
        kw = known_fields(cls, d)
        kw["sites"] = tuple(
            SiteDecision(**{**s, "layers": tuple(s.get("layers", ()))}) for s in kw["sites"]
        )
        kw["notes"] = tuple(kw.get("notes", ()))
        return cls(**kw)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    def to_markdown(self) -> str:
        """A markdown table of the decisions."""
        lines = [
            f"LayerCollapse (tol={self.tol:g}): parameters {self.params_before:,} -> "
            f"{self.params_after:,}",
            "",
            "| site | slope | action | bound | layers |",
            "|---|---:|---|---:|---|",
        ]
        for s in self.sites:
            lines.append(
                f"| {s.name} | {s.slope:.4f} | {s.action} | {s.bound:.3g} | "
                f"{', '.join(s.layers)} |"
            )
        if self.output_error is not None:
            lines += ["", f"max relative output change on the data: {self.output_error:.3g}"]
        return "\n".join(lines) + "\n"
