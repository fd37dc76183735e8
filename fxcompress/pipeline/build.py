"""Networks built from plans: relaxed from the captured graph, fine-tuned, merged and checked."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import fx

from fxcompress.depth.merge import merge
from fxcompress.depth.partition import latency_cost
from fxcompress.latency.table import LatencyTable
from fxcompress.pipeline.captured import Captured
from fxcompress.pipeline.checks import check_outputs
from fxcompress.pipeline.finetune import run_finetune
from fxcompress.pipeline.measure import Stopwatch
from fxcompress.pipeline.plan import Plan, relax_graph

__all__ = ["Builder"]


class Builder:
    """Builds the networks of plans on one captured model.

    Parameters
    ----------
    captured : Captured
        The model, captured once; every relaxation starts from a copy of it.
    table : LatencyTable
        Each linear run is merged in the parts the table prices cheapest.
    check : bool
        Check every merge numerically against the relaxed network it merges.
    watch : Stopwatch
        Collects the seconds of ``relax``, ``merge`` and ``finetune``.

    Attributes
    ----------
    max_rel_error : float or None
        The error of the latest checked merge.
    """

    def __init__(
        self, captured: Captured, table: LatencyTable, *, check: bool, watch: Stopwatch
    ) -> None:
        self.captured = captured
        self.table = table
        self.check = check
        self.watch = watch
        self.max_rel_error: float | None = None

    @property
    def inputs(self) -> tuple[Any, ...]:
        return self.captured.inputs

    def relax(self, plan: Plan) -> fx.GraphModule:
        """A fresh trainable network of ``plan``."""
        return relax_graph(self.captured, plan)

    def merge(self, relaxed: fx.GraphModule) -> fx.GraphModule:
        """``merge(relaxed)`` with each linear run split as the latency table prices it."""
        return merge(relaxed, cost=latency_cost(self.table))

    def check_merge(self, relaxed: fx.GraphModule, result: fx.GraphModule, what: str) -> None:
        """With ``check``, compare ``result`` with ``relaxed`` (``what`` names the step)."""
        if self.check:
            self.max_rel_error = check_outputs(relaxed, result, self.inputs, what)

    def build(self, plan: Plan) -> tuple[fx.GraphModule, fx.GraphModule]:
        """``plan``'s relaxed network and its merge."""
        with self.watch("relax"):
            relaxed = self.relax(plan)
        with self.watch("merge"):
            result = self.merge(relaxed)
        self.check_merge(relaxed, result, "merge of the relaxed model")
        return relaxed, result

    def finetuned(
        self, plan: Plan, finetune: Callable[[fx.GraphModule], Any]
    ) -> tuple[fx.GraphModule, fx.GraphModule]:
        """``plan`` relaxed afresh, fine-tuned by the caller's callback, and merged."""
        with self.watch("finetune"):
            relaxed = run_finetune(finetune, self.relax(plan), self.inputs, plan, "finetune")
            result = self.merge(relaxed)
        self.check_merge(relaxed, result, "merge of the fine-tuned model")
        return relaxed, result
