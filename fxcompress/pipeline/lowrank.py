"""``optimize(..., methods=("lowrank",))``: the low-rank method under optimize's budget and report.

The decomposition is :func:`fxcompress.lowrank.decompose` (ALDS allocation); this stage hands it
the budget and the fine-tune, and reports it as :class:`~fxcompress.report.Report`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from torch import fx, nn

from fxcompress import meta
from fxcompress.budget import Budget
from fxcompress.latency.table import LatencyTable
from fxcompress.pipeline.captured import capture_once
from fxcompress.pipeline.finetune import weights_back
from fxcompress.pipeline.measure import Measure
from fxcompress.pipeline.reporting import asked, report_budget
from fxcompress.report import Report, count_macs, count_params

__all__ = ["optimize_lowrank"]

logger = logging.getLogger("fxcompress")


def optimize_lowrank(
    model: nn.Module,
    b: Budget,
    inputs: tuple[Any, ...],
    *,
    table: LatencyTable,
    measure: Measure,
    finetune: Callable[[fx.GraphModule], None] | None,
    check: bool,
    progress: bool | None,
    leaf_modules: Sequence[str],
) -> fx.GraphModule:
    """Decompose ``model`` into low-rank pairs under ``b``; the result carries a Report."""
    from fxcompress import lowrank  # imported late: it builds on this package's neighbours

    t0 = time.perf_counter()
    target: Any = {"latency": b.fraction} if b.fraction is not None else b
    result = lowrank.decompose(
        model,
        target,
        inputs,
        latency=table,
        finetune=None if finetune is None else weights_back(finetune),
        check=check,
        progress=progress,
        leaf_modules=leaf_modules,
    )
    decomposition = result.meta[meta.LOWRANK].to_dict()
    report = Report(
        budget=report_budget(b),
        target=asked(b),
        latency_mode=table.mode,
        params_before=decomposition["params_before"],  # counted on decompose's own capture
        params_after=count_params(result),
        macs_before=decomposition["macs_before"],
        macs_after=decomposition.get("macs_after", count_macs(result)),
    )
    report.events = [{"kind": "lowrank", **decomposition}]
    report.stage_seconds = {"lowrank": time.perf_counter() - t0}
    if table.mode == "measure":  # the original is traced again only to be timed
        original = capture_once(model, inputs, leaf_modules=leaf_modules).gm
        report.original_ms, report.final_ms = measure(original, result, inputs)
        report.budget = report_budget(b, report.original_ms)
    if finetune is None and report.macs_after != report.macs_before:
        logger.warning(
            "the low-rank factors approximate the layers they replace and no fine-tuning was "
            "asked for, so the result is not trained to recover; pass finetune= to optimize"
        )
    result.meta[meta.REPORT] = report
    return result
