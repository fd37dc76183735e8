"""Choosing among the planner's best plan and its runners-up by a trial fine-tune of each
(``optimize(plan_candidates=k)``; the choice itself is
:func:`fxcompress.pipeline.selection.choose`).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import fx

from fxcompress import meta
from fxcompress.depth import planner
from fxcompress.depth.importance import Calibration, evaluate, fingerprint, reference_outputs
from fxcompress.pipeline import selection
from fxcompress.pipeline.build import Builder
from fxcompress.pipeline.finetune import run_finetune
from fxcompress.pipeline.measure import Measure
from fxcompress.pipeline.plan import Plan
from fxcompress.pipeline.problem import Planning, Prepared, plan_of

__all__ = ["Picked", "choose_by_trial"]

logger = logging.getLogger("fxcompress")


@dataclass(frozen=True)
class Picked:
    """The plan kept, its measured ratio, its trial-trained relaxed network and every trial
    (as the report's dicts)."""

    plan: Plan
    ratio: float | None
    trained: fx.GraphModule
    trials: list[dict[str, Any]]


def _runners_up(
    builder: Builder,
    prepared: Prepared,
    best: tuple[Plan, fx.GraphModule, float | None],
    count: int,
    measure: Measure | None,
    limit: float,
) -> tuple[list[Plan], list[float | None]]:
    """The best plan and its runners-up by planned damage, until ``count`` plans can be trained.

    A runner-up that relaxes to a network already seen is skipped, one measured slower than
    ``limit`` is kept on record but not trained. At most ``4 * count`` runners-up are looked at
    and ``2 * (count - 1)`` measured (a measurement times the whole network; ``measure`` None:
    not measured).
    """
    plan, relaxed, ratio = best
    solutions = itertools.islice(
        planner.ranked(prepared.problem, plan.budget_ms, resolution=prepared.resolution),
        1,
        4 * count,
    )
    nothing = Calibration([], [])
    seen = {fingerprint(relaxed, nothing)}
    plans: list[Plan] = [plan]
    ratios: list[float | None] = [ratio]
    trainable = 1
    for solution in solutions:
        if trainable == count or len(plans) > 2 * (count - 1):
            break
        other = plan_of(prepared, solution, plan.budget_ms, plan.front)
        other_relaxed = builder.relax(other)
        digest = fingerprint(other_relaxed, nothing)
        if digest in seen:
            continue  # other decisions, the same trainable network (e.g. a one-item "merge")
        seen.add(digest)
        measured_ratio = None
        if measure is not None:
            merged = builder.merge(other_relaxed)
            original_ms, measured = measure(builder.captured.gm, merged, builder.inputs)
            measured_ratio = measured / original_ms
        plans.append(other)
        ratios.append(measured_ratio)
        trainable += measured_ratio is None or measured_ratio <= limit
    return plans, ratios


def choose_by_trial(
    builder: Builder,
    prepared: Prepared,
    best: tuple[Plan, fx.GraphModule, float | None],
    *,
    count: int,
    trial: Callable[[fx.GraphModule], Any],
    measure: Measure | None,
    limit: float,
    how: Planning,
) -> Picked:
    """The plan kept among ``best`` (plan, relaxed network, measured ratio) and its runners-up
    by a trial fine-tune of each, scored on the calibration batches of ``how``."""
    plans, ratios = _runners_up(builder, prepared, best, count, measure, limit)
    inputs = builder.inputs
    calib = Calibration.from_data(how.data, inputs, max_batches=how.calibration_batches)
    loss = how.loss_fn if calib.targets[0] is not None else None
    reference = reference_outputs(builder.captured.gm, calib)

    def run_trial(net: fx.GraphModule) -> fx.GraphModule:
        plan = Plan.from_dict(net.meta[meta.PLAN])  # set by relax
        return run_finetune(trial, net, inputs, plan, "trial_finetune")

    picked = selection.choose(
        plans,
        ratios,
        limit=limit,
        describe=lambda p: (p.damage, p.predicted_ms),
        relax=builder.relax,
        trial=run_trial,
        score=lambda net: evaluate(net, calib, reference, loss),
        progress=how.progress,
    )
    logger.info(
        "kept plan %d of %d after trial fine-tunes (scores %s)",
        picked.index,
        len(plans),
        [t.score for t in picked.trials],
    )
    return Picked(
        picked.plan, ratios[picked.index], picked.trained, [t.to_dict() for t in picked.trials]
    )
