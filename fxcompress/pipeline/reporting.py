"""How the pipeline fills its :class:`~fxcompress.report.Report` (the classes live in
:mod:`fxcompress.report`)."""

from __future__ import annotations

from typing import Any

from torch import fx

from fxcompress import meta
from fxcompress.budget import Budget
from fxcompress.depth.analysis import Analysis
from fxcompress.pipeline.plan import Plan
from fxcompress.report import Report

__all__ = ["asked", "decisions", "kept", "report_budget"]


def report_budget(b: Budget, original_ms: float | None = None) -> float:
    """The budget as a fraction of the original latency, for the report (NaN if not known:
    a ``latency_ms`` budget before the original is timed, a parameter or MAC budget)."""
    if not b.is_latency or (b.latency_ms is not None and not original_ms):
        return float("nan")
    return b.fraction_of(original_ms or 1.0)


def asked(b: Budget) -> dict[str, float]:
    """The budget as it was asked (``{"speedup": 2.0}``), for the report."""
    return {
        name: float(value)
        for name in ("fraction", "latency_ms", "speedup", "params", "macs")
        if (value := getattr(b, name)) is not None
    }


def kept(gm: fx.GraphModule, analysis: Analysis) -> list[list[str]]:
    """The parts left as they are, with why; a hooked module says which hooks keep it."""
    hooked = gm.meta.get(meta.HOOKED, {})
    targets = {n.name: str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    out = []
    for node, reason in analysis.kept:
        target = targets.get(node)
        if target in hooked:
            reason = f"module '{target}' has {', '.join(hooked[target])}"
        out.append([node, reason])
    return out


def decisions(gm: fx.GraphModule, plan: Plan) -> list[dict[str, Any]]:
    """The report's decision dicts of ``plan``'s segments on the graph it was made for."""
    ms = plan.segment_ms or ((float("nan"), float("nan")),) * len(plan.segments)
    return Report.decisions_of(gm, plan.segments, ms)  # names the layers
