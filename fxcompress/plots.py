"""PNG plots of a :class:`~fxcompress.report.Report` (needs matplotlib: the ``plot`` extra).

Two panels: the Pareto front of the plan (predicted latency against predicted damage) with the
chosen plan and, when latency was measured, the measured result; and each segment's predicted
latency kept as it is against as planned. matplotlib is imported only when a plot is drawn, and
only its object-oriented API is used, so pyplot's global state and backend are left alone.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fxcompress.errors import InvalidArgument
from fxcompress.report import Report

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_report", "report_figure"]

#: the message when matplotlib is missing (the command line reports it before any work starts)
MISSING_MATPLOTLIB = (
    "plotting needs matplotlib: install the plot extra, pip install 'fxcompress[plot]'"
)


def _as_dict(report: Report | dict[str, Any]) -> dict[str, Any]:
    if isinstance(report, Report):
        return report.to_dict()
    if isinstance(report, dict):
        return report
    raise InvalidArgument(
        f"report must be a fxcompress Report or its to_dict(), got {type(report).__name__}"
    )


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def report_figure(report: Report | dict[str, Any]) -> Figure:
    """The report's plots as a matplotlib ``Figure`` (front on the left, segments on the right).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> import fxcompress
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
    ...                       nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()).eval()
    >>> out = fxcompress.optimize(model, 0.7, example_inputs=torch.randn(1, 3, 16, 16),
    ...                           latency="flops")
    >>> fig = report_figure(out.meta["fxcompress"])
    >>> [ax.get_title() for ax in fig.axes]
    ['Pareto front', 'Segments: predicted latency']
    """
    d = _as_dict(report)
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ModuleNotFoundError(MISSING_MATPLOTLIB) from exc

    decisions = list(d.get("decisions") or [])
    height = max(3.5, 0.22 * len(decisions) + 1.2)
    fig = Figure(figsize=(11, height), layout="constrained")
    front_ax, seg_ax = fig.subplots(1, 2, width_ratios=(1.1, 1))
    _draw_front(front_ax, d)
    _draw_segments(seg_ax, decisions)
    return fig


def _draw_front(ax: Any, d: dict[str, Any]) -> None:
    ax.set_title("Pareto front")
    ax.set_xlabel(f"latency, ms ({d.get('latency_mode', 'measure')} table)")
    ax.set_ylabel("predicted damage")
    front = [p for p in d.get("front") or [] if len(p) == 2]
    if not front:
        ax.text(0.5, 0.5, "no plan (budget 1.0: exact rewrites only)", ha="center",
                va="center", transform=ax.transAxes)
        return
    ms, damage = zip(*sorted(front))
    ax.step(ms, damage, where="post", marker=".", label="front (predicted)")
    damage_chosen = _number(d.get("damage")) or 0.0
    predicted = _number(d.get("predicted_ms"))
    if predicted is not None:
        ax.plot([predicted], [damage_chosen], "o", ms=9, label="chosen (predicted)")
    final = _number(d.get("final_ms"))
    if final is not None:
        ax.plot([final], [damage_chosen], "X", ms=10, label="measured result")
    original = _number(d.get("original_ms"))
    budget = _number(d.get("budget"))
    if original is not None and budget is not None:
        ax.axvline(budget * original, color="grey", ls="--", lw=1, label=f"budget {budget:g}")
    if original is not None:
        ax.axvline(original, color="black", ls=":", lw=1, label="original")
    ax.legend(fontsize=8)


def _draw_segments(ax: Any, decisions: list[dict[str, Any]]) -> None:
    ax.set_title("Segments: predicted latency")
    rows = [
        (f"{e['chain']} {e['start']}–{e['stop']}", _number(e.get("ms_kept")),
         _number(e.get("ms_planned")), e.get("key") != "keep")
        for e in decisions
    ]
    rows = [r for r in rows if r[1] is not None and r[2] is not None]
    if not rows:
        ax.text(0.5, 0.5, "no per-segment latencies", ha="center", va="center",
                transform=ax.transAxes)
        return
    y = range(len(rows))
    ax.barh([i - 0.2 for i in y], [r[1] for r in rows], height=0.4, label="kept as is")
    ax.barh([i + 0.2 for i in y], [r[2] for r in rows], height=0.4, label="as planned")
    ax.set_yticks(list(y), [r[0] + (" *" if r[3] else "") for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ms (* merged or pruned)")
    ax.legend(fontsize=8)


def plot_report(report: Report | dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write the report's plots (see :func:`report_figure`) as a PNG file and return its path.

    Raises
    ------
    ModuleNotFoundError
        If matplotlib is not installed (install the ``plot`` extra).
    InvalidArgument
        If ``report`` is not a report or ``path`` does not end in ``.png``.

    Examples
    --------
    >>> import tempfile
    >>> from fxcompress.report import Report
    >>> r = Report(budget=0.5, original_ms=10.0, predicted_ms=5.0, damage=0.1,
    ...            front=[[4.0, 0.3], [5.0, 0.1], [10.0, 0.0]])
    >>> with tempfile.TemporaryDirectory() as d:
    ...     plot_report(r, d + "/r.png").read_bytes()[:4]
    b'\\x89PNG'
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise InvalidArgument(f"plot_report writes PNG; use a '.png' path, got {str(path)!r}")
    fig = report_figure(report)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
