"""What a :func:`~fxcompress.lowrank.decompose` call chose, per layer (frozen, JSON-able).

:class:`LowRankReport` follows the report protocol (:class:`fxcompress.report.MethodReport`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from fxcompress.report import known_fields

__all__ = ["LayerDecision", "LowRankReport"]


@dataclass(frozen=True)
class LayerDecision:
    """One candidate layer: ``k`` groups of rank ``j`` (``k == j == 0``: left dense).

    ``error`` is the exact relative spectral error of the folded weight (0 when dense);
    ``ms_*`` are the latency table's predictions for the layer (``None`` unless the budget is a
    latency). ``note`` says why a layer stayed dense.
    """

    name: str
    node: str
    kind: str
    weight_shape: tuple[int, ...]
    k: int
    j: int
    error: float
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    ms_before: float | None = None
    ms_after: float | None = None
    note: str = ""

    @property
    def decomposed(self) -> bool:
        return self.k > 0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LayerDecision:
        """A decision from its entry in :meth:`LowRankReport.to_dict`."""
        kw = known_fields(cls, d)
        kw["weight_shape"] = tuple(kw["weight_shape"])
        return cls(**kw)


@dataclass(frozen=True)
class LowRankReport:
    """Summary of a decomposition: the budget, the level reached and every layer's decision.

    Attributes
    ----------
    method : str
        ``"alds"`` (min-max spectral error), ``"uniform"`` (same rank fraction everywhere) or
        ``"energy"`` (same discarded SVD energy everywhere).
    metric : str
        What the budget bounds: ``"params"``, ``"macs"`` or ``"latency"``.
    fraction : float
        The budget as a fraction of the original model's ``metric``.
    before, after : float
        The original and predicted totals of ``metric`` (the whole model).
    level : float
        The allocation's threshold (``0`` when everything stays dense): for ``"alds"`` the
        largest relative spectral error allowed, for ``"uniform"`` the least fraction of each
        layer's rank kept, for ``"energy"`` the largest share of squared singular values
        discarded.
    max_error : float
        The largest relative spectral error over the decomposed layers.
    skipped : tuple of (name, reason)
        Conv/linear layers that are not candidates.
    finetuned : bool
        Whether the ``finetune`` callback ran (errors are those before retraining).
    """

    method: str
    metric: str
    fraction: float
    before: float
    after: float
    level: float
    max_error: float
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    layers: tuple[LayerDecision, ...]
    skipped: tuple[tuple[str, str], ...] = ()
    finetuned: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only (``inf`` levels become ``None``)."""
        d = asdict(self)
        if not math.isfinite(d["level"]):
            d["level"] = None
        return json.loads(json.dumps(d))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LowRankReport:
        """A report from :meth:`to_dict` (a ``None`` level is ``inf``); unknown keys are ignored.

        Examples
        --------
        >>> layer = LayerDecision("fc", "fc", "linear", (4, 8), 1, 2, 0.5, 36, 28, 36, 28)
        >>> r = LowRankReport("alds", "params", 0.8, 36.0, 28.0, 0.5, 0.5, 36, 28, 36, 28,
        ...                   (layer,), (("head", "excluded by the caller"),))
        >>> LowRankReport.from_dict(json.loads(r.to_json())) == r
        True
        """
        kw = known_fields(cls, d)
        if kw.get("level") is None:
            kw["level"] = math.inf
        kw["layers"] = tuple(LayerDecision.from_dict(x) for x in kw.get("layers", ()))
        kw["skipped"] = tuple(tuple(s) for s in kw.get("skipped", ()))
        return cls(**kw)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    def to_markdown(self) -> str:
        """A table of the decisions, one row per candidate layer."""
        lines = [
            f"# low-rank decomposition ({self.method}, {self.metric} budget {self.fraction:g})",
            "",
            f"- {self.metric}: {self.before:,.6g} → {self.after:,.6g} "
            f"({self.after / self.before:.3f} of the original)"
            if self.before
            else "",
            f"- parameters: {self.params_before:,} → {self.params_after:,}; "
            f"MACs: {self.macs_before:,} → {self.macs_after:,}",
            f"- max relative spectral error: {self.max_error:.4f}"
            + (" (before retraining)" if self.finetuned else ""),
            "",
            "| layer | shape | k | j | error | params | MACs |",
            "|---|---|---|---|---|---|---|",
        ]
        for d in self.layers:
            kj = (str(d.k), str(d.j)) if d.decomposed else ("dense", "")
            lines.append(
                f"| {d.name} | {'×'.join(map(str, d.weight_shape))} | {kj[0]} | {kj[1]} | "
                f"{d.error:.4f} | {d.params_before:,} → {d.params_after:,} | "
                f"{d.macs_before:,} → {d.macs_after:,} |"
            )
        if self.skipped:
            lines += ["", "Left as they are: " + "; ".join(f"{n} ({r})" for n, r in self.skipped)]
        return "\n".join(lines) + "\n"
