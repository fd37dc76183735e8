"""The latency model the DP prices options with, calibrated to the whole network when measured.

Ops timed in isolation do not add up to the network's time (caches, threading), so a measured
table is calibrated to the whole network: the analytic model splits the exactly-merged network's
measured time into chains and the rest, and chain latencies are scaled so that keeping everything
predicts exactly the measured time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from fxcompress.cache import as_cache_dir, resolve_cache_dir
from fxcompress.depth.analysis import Analysis, Residual, units_of
from fxcompress.depth.merge import merge
from fxcompress.depth.options import baseline_latency, item_latency
from fxcompress.depth.segment import Segment
from fxcompress.errors import InvalidArgument
from fxcompress.graph.util import shape_of
from fxcompress.latency import LatencyTable, OpSpec
from fxcompress.pipeline.captured import Captured
from fxcompress.pipeline.measure import Measure

__all__ = [
    "Pricing",
    "device_of",
    "dtype_name",
    "kept_latency",
    "latency_table",
    "price",
    "rest_estimate",
]

logger = logging.getLogger("fxcompress")


def latency_table(latency: Any, device: str, cache_dir: Any, progress: bool | None) -> LatencyTable:
    """``latency`` itself if it is a table, else a table of that mode on ``device``.

    A measured table is cached in ``cache_dir`` as :func:`fxcompress.cache.resolve_cache_dir`
    resolves it (None: the default cache; False: none).
    """
    if isinstance(latency, LatencyTable):
        return latency
    if latency not in ("measure", "flops"):
        raise InvalidArgument(
            f"latency must be 'measure', 'flops' or a LatencyTable, got "
            f"latency={latency!r} (type={type(latency).__name__})"
        )
    if latency == "flops":
        as_cache_dir(cache_dir)  # checked only: analytic values cost less than reading a cache
        return LatencyTable(mode="flops", device=device, progress=progress)
    directory = resolve_cache_dir(cache_dir)
    return LatencyTable(mode="measure", device=device, cache_dir=directory, progress=progress)


def device_of(model: nn.Module) -> str:
    """The device of ``model``'s first parameter (``"cpu"`` without parameters)."""
    for p in model.parameters():
        return str(p.device)
    return "cpu"


def dtype_name(gm: fx.GraphModule) -> str:
    """The dtype of ``gm``'s first parameter, as the latency table names it."""
    for p in gm.parameters():
        return str(p.dtype).replace("torch.", "")
    return "float32"


def kept_latency(
    segment: Segment, analysis: Analysis, table: Callable[[OpSpec], float], dtype: str
) -> float:
    """Predicted latency of a segment's items kept as they are."""
    items = analysis.chain(segment.chain).items[segment.start : segment.stop]
    return sum(item_latency(it, table, dtype) for it in items)


def rest_estimate(
    gm: fx.GraphModule, analysis: Analysis, table: Callable[[OpSpec], float], dtype: str
) -> float:
    """Analytic cost of the nodes outside chains: one elementwise pass over each output."""
    covered: set[str] = set()
    for c in analysis.chains:
        for it in c.items:
            for u in units_of(it):
                covered.update(n for n in (u.layer, u.bn, u.act) if n)
            if isinstance(it, Residual):
                covered.update(n for n in (it.add, it.act) if n)
    total = 0.0
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr") or node.name in covered:
            continue
        shape = shape_of(node)
        if shape:
            total += table(OpSpec(kind="act", input_shape=shape, dtype=dtype, activation="relu"))
    return total


@dataclass(frozen=True)
class Pricing:
    """The latency model of one planning problem.

    Attributes
    ----------
    table : callable
        ``table(op) -> ms`` the DP prices options with (a measured table scaled to the network).
    dtype : str
    original : float
        The original model's latency (ms): measured, or the analytic estimate.
    fixed : float
        The latency of the parts outside chains, which no plan changes (ms).
    """

    table: Callable[[OpSpec], float]
    dtype: str
    original: float
    fixed: float


def price(captured: Captured, table: LatencyTable, measure: Measure) -> Pricing:
    """The :class:`Pricing` of ``captured`` on ``table`` (``measure`` times the whole network
    when the table is measured)."""
    gm, analysis = captured.gm, captured.analysis
    dtype = dtype_name(gm)
    baseline = baseline_latency(analysis, table, dtype)
    if table.mode != "measure":
        original = baseline + rest_estimate(gm, analysis, table, dtype)
        return Pricing(table, dtype, original, max(0.0, original - baseline))
    # the budget is a fraction of the model as given; the parts outside chains are priced on
    # its exactly-merged form (BN folded), which is what every planned result builds on
    original, exact = measure(gm, merge(gm), captured.inputs)
    analytic = LatencyTable(mode="flops")
    rest_a = rest_estimate(gm, analysis, analytic, dtype)
    base_a = baseline_latency(analysis, analytic, dtype)
    fixed = exact * rest_a / max(rest_a + base_a, 1e-12)
    scale = (exact - fixed) / baseline if baseline > 0 else 1.0
    logger.info("latency table calibrated to the whole network: scale %.3f", scale)

    def scaled(op: OpSpec) -> float:
        return scale * table(op)

    return Pricing(scaled, dtype, original, fixed)
