"""``optimize``: the whole pipeline as a list of stages.

::

    capture once -> exact rewrites (budget 1)
                 -> prepare (analyze, price, score) -> solve -> closed loop (relax, merge,
                    measure, re-plan) -> trial selection -> fine-tune -> report

Budgets below 1 need all stages; ``budget=1.0`` only runs the function-preserving ones.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor
from typing import Any, Literal, NoReturn

import torch
from torch import fx, nn

from fxcompress import meta
from fxcompress.budget import Budget, as_budget
from fxcompress.cache import resolve_cache_dir
from fxcompress.data import inputs_for
from fxcompress.depth.merge import merge
from fxcompress.depth.options import baseline_latency
from fxcompress.errors import InfeasibleBudget
from fxcompress.latency.table import LatencyTable
from fxcompress.pipeline.build import Builder
from fxcompress.pipeline.captured import Captured, capture_once
from fxcompress.pipeline.checks import (
    METHODS,
    check_methods,
    check_model,
    check_outputs,
    check_trial,
)
from fxcompress.pipeline.closed_loop import ClosedLoop, Outcome
from fxcompress.pipeline.lowrank import optimize_lowrank
from fxcompress.pipeline.measure import Measure, PairedLatency, Stopwatch
from fxcompress.pipeline.plan import Plan
from fxcompress.pipeline.pricing import device_of, dtype_name, latency_table, rest_estimate
from fxcompress.pipeline.problem import Planning, prepare, solve
from fxcompress.pipeline.reporting import asked, decisions, kept, report_budget
from fxcompress.pipeline.trials import choose_by_trial
from fxcompress.report import Report, count_macs, count_params

__all__ = ["optimize"]

logger = logging.getLogger("fxcompress")


def optimize(
    model: nn.Module,
    budget: float | Budget,
    example_inputs: Any = None,
    *,
    data: Iterable[Any] | None = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    finetune: Callable[[fx.GraphModule], None] | None = None,
    latency: str | LatencyTable = "measure",
    device: str | None = None,
    methods: Sequence[str] = METHODS,
    check: bool = True,
    cache_dir: str | os.PathLike[str] | Literal[False] | None = None,
    progress: bool | None = None,
    calibration_batches: int = 4,
    executor: Executor | None = None,
    importance_checkpoint: str | None = None,
    candidate_finetune: Callable[[fx.GraphModule], None] | None = None,
    leaf_modules: Sequence[str] = (),
    max_replans: int = 5,
    plan_candidates: int = 1,
    trial_finetune: Callable[[fx.GraphModule], None] | None = None,
    measure: Measure | None = None,
) -> fx.GraphModule:
    """Compress ``model`` to at most ``budget`` of its latency and return a GraphModule.

    Parameters
    ----------
    model : torch.nn.Module
        The trained model. It is not modified (weights and ``training`` flag stay as they are).
        A submodule with forward hooks or pre-hooks is kept as it is, hooks and all (never
        rewritten, canonicalised or folded; listed among the parts left as they are); see
        :func:`fxcompress.graph.capture.capture`.
    budget : float or Budget
        Target latency as a fraction of the original in (0, 1]; ``1.0`` applies only
        function-preserving rewrites (BatchNorm folding, exact merges, skip folds), and so do
        ``Budget(speedup=1)`` and a ``Budget(latency_ms=...)`` not below the original latency.
    example_inputs : Tensor or tuple of Tensor, optional
        Inputs to trace with; by default the first batch of ``data``. Neither they nor the
        ``data`` batches are ever written: every run of the model, of a candidate, a trial, a
        timing or a check sees copies, so a model that writes its inputs in place is safe.
    data : iterable, optional
        Calibration batches to score merge options: a tensor, a tuple of positional inputs, or
        ``(inputs, targets)``. A dict batch raises :class:`InvalidArgument` (inputs are passed
        positionally; map such a loader to ``(inputs, targets)`` tuples).
    loss_fn : callable, optional
        ``loss_fn(outputs, targets)``; without it, damage is the loss of output fidelity.
    finetune : callable, optional
        ``finetune(relaxed)`` trains the relaxed model (a fresh ``torch.fx.GraphModule``) before
        the final merge. It arrives in **eval mode**: BatchNorm uses its running statistics
        unless the callback calls ``relaxed.train()`` (as :class:`~fxcompress.Distill` does).
        The callback either trains it in place and returns None, or returns the trained model
        (an ``nn.Module``, e.g. a trained copy), which is then merged instead; any other return
        value raises :class:`InvalidArgument`. Either way the model is put back in eval mode
        and merged. With ``methods=("lowrank",)`` a returned model must have the parameters of
        the one given (its weights are copied back). Without any fine-tuning, a budget whose
        plan changes the function logs a warning (logger ``fxcompress``).
    latency : {"measure", "flops"} or LatencyTable
        Measured latency table on ``device`` (cached in ``cache_dir``) or an analytic model.
    device : str, optional
        Device to measure latency on (default: the model's).
    methods : sequence of {"merge", "prune", "drop"}, or ("lowrank",)
        ``"merge"``: remove activations and merge; ``"prune"``: also drop reducible convs
        (the default, LayerMerge's search space); ``"drop"``: also drop whole residual
        branches (a block becomes its shortcut), chosen by the same DP.
        ``("lowrank",)`` instead decomposes conv and linear layers into low-rank pairs
        (:func:`fxcompress.lowrank.decompose`, ALDS allocation) under the budget, which may
        then also be ``Budget(params=...)`` or ``Budget(macs=...)``.
    check : bool
        Compare every exact step numerically against its reference and raise
        :class:`RewriteError` if it differs. The reference of the captured graph, and at a
        budget of 1 of the result, is the caller's model itself (an eval-mode copy run
        eagerly), never a trace of it.
    cache_dir : path or False, optional
        Directory of the persistent cache of latency tables and importance scores. None (the
        default): the default cache dir, :func:`fxcompress.cache.default_cache_dir` (the user
        cache directory, or the environment variable ``FXCOMPRESS_CACHE_DIR``); False: no
        cache. A directory that cannot be created or written logs a warning, and the run works
        in memory.
    progress : bool, optional
        Progress bars (default: only on a terminal).
    calibration_batches : int
        Number of ``data`` batches used for scoring.
    executor : concurrent.futures.Executor, optional
        Scores candidates through it (e.g. a Dask client's executor).
    importance_checkpoint : str, optional
        JSON file of finished damage scores: reused and extended, so an interrupted run resumes
        and runs at several budgets on the same model and data score each option once. Scores
        are stamped with a fingerprint of the graph, its weights, the calibration batches and the
        names of ``loss_fn``/``candidate_finetune``; a file with another fingerprint is ignored
        (with a warning) and overwritten. By default, with a cache (see ``cache_dir``) and
        ``loss_fn`` either None or an ``nn.Module``, scores are kept in the cache under their
        fingerprint; with a plain-function ``loss_fn`` pass a checkpoint explicitly (a
        function's name does not pin down what it computes).
    candidate_finetune : callable, optional
        LayerMerge-faithful importance: briefly train each candidate before scoring it.
    leaf_modules : sequence of str or type
        Submodules to keep opaque when tracing.
    max_replans : int
        Closed loop: if the measured latency misses the budget by more than 5 %, re-plan with a
        tighter budget at most this many times. Each re-plan costs one paired timing of the
        network; depthwise networks at large batches, whose op table predicts poorly, have
        needed three.
    plan_candidates : int
        With ``k > 1``, the planner's best plan and up to ``k - 1`` runners-up by planned
        damage (:func:`fxcompress.depth.planner.alternatives`; plans that relax to the same
        network count once, and those measured slower than the budget allows are passed
        over, up to ``2 (k - 1)`` measured) that measure within the budget are each trained by
        ``trial_finetune``, and the plan whose trained network scores best on the
        calibration batches (``loss_fn``, else output fidelity) is kept; see
        :mod:`fxcompress.pipeline.selection`. Plans of nearly equal planned damage can end far apart
        after fine-tuning, and this is the way to tell them apart. A best plan with no
        measured damage is kept without trials.
    trial_finetune : callable, optional
        ``trial_finetune(relaxed)`` for ``plan_candidates > 1``, typically a shorter version of
        ``finetune`` (e.g. ``Distill(..., epochs=1)``). By default ``finetune`` itself, whose
        result for the kept plan is then used directly. Same contract as ``finetune``.
    measure : callable, optional
        ``measure(original, result, inputs) -> (original_ms, result_ms)``: how whole networks
        are timed where the latency is measured (the table's calibration, the closed loop, the
        runners-up, the final report). By default both are timed alternately on ``device``
        (:class:`~fxcompress.pipeline.measure.PairedLatency`); another runtime's timing, or a
        stand-in in tests, goes here.

    Returns
    -------
    torch.fx.GraphModule
        ``compiled.meta["fxcompress"]`` is a :class:`~fxcompress.report.Report`.

    Raises
    ------
    InvalidArgument
        Bad budget, inputs, methods or latency.
    CaptureError
        The model cannot be traced (the message suggests ``leaf_modules``), fails on the
        example inputs (the message holds the underlying error), or has hooks no graph can
        keep (on the top-level module, or global module hooks).
    InfeasibleBudget
        The budget is below the lowest reachable latency (given in the message; ``.minimum`` as
        a fraction of the original). When only measurement showed the budget out of reach,
        ``.result`` holds the fastest model built.
    RewriteError
        With ``check=True``, a rewrite changed the function it should preserve: a bug in
        fxcompress (please report it with the model).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> import fxcompress
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()).eval()
    >>> x = torch.randn(1, 3, 16, 16)
    >>> compiled = fxcompress.optimize(model, 1.0, example_inputs=x, latency="flops")
    >>> torch.allclose(compiled(x), model(x), atol=1e-5)
    True
    >>> [e["kind"] for e in compiled.meta["fxcompress"].events]
    ['fold_bn']
    """
    b = as_budget(budget)
    check_model(model)
    methods = check_methods(methods, b)
    trial = check_trial(plan_candidates, trial_finetune, finetune, methods)
    inputs = inputs_for(example_inputs, data)
    cache_dir = resolve_cache_dir(cache_dir) or False  # once: one warning if it is unusable
    table = latency_table(latency, device or device_of(model), cache_dir, progress)
    measure = measure if measure is not None else PairedLatency(table)
    if methods == ("lowrank",):
        return optimize_lowrank(
            model,
            b,
            inputs,
            table=table,
            measure=measure,
            finetune=finetune,
            check=check,
            progress=progress,
            leaf_modules=leaf_modules,
        )
    watch = Stopwatch()
    with watch("capture"):  # the one capture of this call: every later stage starts from it
        captured = capture_once(model, inputs, leaf_modules=leaf_modules, check=check)
        # the reference of the final check is the caller's model itself (an eval-mode copy run
        # eagerly), not a trace of it: a trace can already differ (e.g. a dropped hook)
        eager = copy.deepcopy(model).eval() if check else None
        report = Report(
            budget=report_budget(b),
            target=asked(b),
            latency_mode=table.mode,
            params_before=count_params(captured.gm),
            macs_before=count_macs(captured.gm),
        )
        report.events = list(captured.gm.meta.get(meta.EVENTS, []))
    exact, merged = _exact_only(b, captured, table, measure, report)
    if exact:
        with watch("merge"):
            result = merged if merged is not None else merge(captured.gm)
        if eager is not None:
            report.max_rel_error = check_outputs(eager, result, inputs, "capture and merge")
    else:
        if eager is not None:
            check_outputs(eager, captured.gm, inputs, "capture and canonicalization")
        how = Planning(
            methods=methods,
            data=data,
            loss_fn=loss_fn,
            cache_dir=cache_dir,
            progress=progress,
            calibration_batches=calibration_batches,
            executor=executor,
            importance_checkpoint=importance_checkpoint,
            candidate_finetune=candidate_finetune,
        )
        stages = _Stages(captured, table, measure, check, report, watch)
        result = stages.compress(b, how, finetune, trial, max_replans, plan_candidates)
    report.kept = kept(captured.gm, captured.analysis)
    return _finish(captured, result, table, measure, report, watch)


def _exact_only(
    b: Budget, captured: Captured, table: LatencyTable, measure: Measure, report: Report
) -> tuple[bool, fx.GraphModule | None]:
    """Whether ``b`` asks for no speed-up, so only function-preserving rewrites run.

    That is ``budget=1.0``, ``Budget(speedup=1)`` and a ``Budget(latency_ms=...)`` at or above
    the original latency. The latter is timed here (with the exact merge, returned for reuse).
    """
    if b.fraction == 1.0 or b.speedup == 1.0:
        return True, None
    if b.latency_ms is None:
        return False, None
    gm = captured.gm
    merged = merge(gm)
    if table.mode == "measure":
        original, exact_ms = measure(gm, merged, captured.inputs)
        report.original_ms, report.final_ms = original, exact_ms
    else:
        analysis = captured.analysis
        dtype = dtype_name(gm)
        original = baseline_latency(analysis, table, dtype) + rest_estimate(
            gm, analysis, table, dtype
        )
    report.budget = report_budget(b, original)
    if b.latency_ms >= original:
        logger.info(
            "budget %.3f ms is not below the original latency %.3f ms: exact rewrites only",
            b.latency_ms,
            original,
        )
        return True, merged
    report.original_ms = report.final_ms = None  # the plan's own timing takes over
    return False, None


class _Stages:
    """The stages below budget 1, on one captured model: prepare → solve → closed loop →
    trial selection → fine-tune; each fills its part of ``report``."""

    def __init__(
        self,
        captured: Captured,
        table: LatencyTable,
        measure: Measure,
        check: bool,
        report: Report,
        watch: Stopwatch,
    ) -> None:
        self.captured, self.table, self.measure = captured, table, measure
        self.measured = table.mode == "measure"
        self.report, self.watch = report, watch
        self.builder = Builder(captured, table, check=check, watch=watch)

    def compress(
        self,
        b: Budget,
        how: Planning,
        finetune: Callable[[fx.GraphModule], Any] | None,
        trial: Callable[[fx.GraphModule], Any] | None,
        max_replans: int,
        plan_candidates: int,
    ) -> fx.GraphModule:
        """The compressed network of the plan kept for ``b``."""
        report, watch = self.report, self.watch
        prepared = prepare(self.captured, how, self.table, self.measure)
        watch.seconds.update(prepared.seconds)
        with watch("plan"):
            plan = solve(prepared, b)
        report.budget = report_budget(b, plan.original_ms)
        loop = ClosedLoop(self.table, measure=self.measure, max_replans=max_replans)
        outcome = loop.run(prepared, plan, self.builder.build, self.captured.gm, watch)
        report.replans = list(outcome.replans)
        best = outcome.best
        if best is None:
            self._missed(outcome, finetune, max_replans)
        plan, relaxed, result, ratio = best.plan, best.relaxed, best.result, best.ratio
        trained = None
        if trial is not None and plan.damage == 0:
            # the best plan does no measured damage: no other plan can do better, and training
            # noise must not trade it for one that changes the function
            logger.info("best plan has no damage: kept without trial fine-tunes")
        elif trial is not None:
            with watch("select"):
                picked = choose_by_trial(
                    self.builder,
                    prepared,
                    (plan, relaxed, ratio),
                    count=plan_candidates,
                    trial=trial,
                    measure=self.measure if self.measured else None,
                    limit=outcome.limit,
                    how=how,
                )
            plan, ratio, trained = picked.plan, picked.ratio, picked.trained
            report.trials = picked.trials
        if ratio is not None:
            report.final_ms = ratio * plan.original_ms
        result = self._finetune(plan, result, trained, finetune, trial, outcome.goal_ratio)
        self._record(plan)
        return result

    def _finetune(
        self,
        plan: Plan,
        result: fx.GraphModule,
        trained: fx.GraphModule | None,
        finetune: Callable[[fx.GraphModule], Any] | None,
        trial: Callable[[fx.GraphModule], Any] | None,
        goal_ratio: float,
    ) -> fx.GraphModule:
        """The final network: the trial-trained or fine-tuned plan, merged (and measured)."""
        if trained is not None and (finetune is None or finetune is trial):
            # the kept plan's trial fine-tune is the fine-tune (or the only training asked for)
            result = self.builder.merge(trained)
            self.builder.check_merge(trained, result, "merge of the trained model")
        elif finetune is not None:
            _, result = self.builder.finetuned(plan, finetune)
        elif plan.damage > 0:
            logger.warning(
                "budget %.3g changes the model's function (planned damage %.3g: activations "
                "removed or layers pruned) and no fine-tuning was asked for, so the result is "
                "not trained to recover; pass finetune= (e.g. fxcompress.Distill(model, data)) "
                "to optimize",
                goal_ratio,
                plan.damage,
            )
        if (trained is not None or finetune is not None) and self.measured:
            o, f = self.measure(self.captured.gm, result, self.captured.inputs)
            self.report.final_ms = f / o * plan.original_ms
        return result

    def _record(self, plan: Plan) -> None:
        """The kept plan in the report: its prediction, decisions and Pareto front."""
        report = self.report
        if self.builder.max_rel_error is not None:
            report.max_rel_error = self.builder.max_rel_error
        report.predicted_ms = plan.predicted_ms
        report.damage = plan.damage
        report.decisions = decisions(self.captured.gm, plan)
        report.original_ms = plan.original_ms
        report.front = [[float(ms), float(dmg)] for ms, dmg in plan.front]

    def _missed(
        self, outcome: Outcome, finetune: Callable[[fx.GraphModule], Any] | None, max_replans: int
    ) -> NoReturn:
        """Raise :class:`InfeasibleBudget` with the fastest model built, finished and
        fine-tuned as a success would be."""
        fastest = outcome.fastest
        plan, result, ratio = fastest.plan, fastest.result, fastest.ratio
        if finetune is not None:
            _, result = self.builder.finetuned(plan, finetune)
        report = self.report
        if self.builder.max_rel_error is not None:
            report.max_rel_error = self.builder.max_rel_error
        report.predicted_ms, report.damage = plan.predicted_ms, plan.damage
        report.original_ms = plan.original_ms
        report.final_ms = None if ratio is None else ratio * plan.original_ms
        report.stage_seconds = self.watch.seconds
        result.meta[meta.REPORT] = report
        raise InfeasibleBudget(
            f"budget {outcome.goal_ratio:.3g} is missed on measurement: none of the "
            f"{len(outcome.tried)} plans measured on {self.table.device} (max_replans="
            f"{max_replans}) runs within 5 % of it, the fastest at {ratio:.3g} of the original "
            f"latency; allow more re-plans, ask for a budget of at least {ratio:.3g}, or take "
            "that model from this exception's .result",
            minimum=ratio,
            result=result,
        )


def _finish(
    captured: Captured,
    result: fx.GraphModule,
    table: LatencyTable,
    measure: Measure,
    report: Report,
    watch: Stopwatch,
) -> fx.GraphModule:
    """The report's last entries, and the report on ``result``."""
    report.events += [e for e in result.meta.get(meta.EVENTS, []) if e not in report.events]
    report.params_after = count_params(result)
    report.macs_after = count_macs(result)
    if table.mode == "measure" and (report.original_ms is None or report.final_ms is None):
        # timed alternately, so the ratio survives a busy machine
        report.original_ms, report.final_ms = measure(captured.gm, result, captured.inputs)
    report.stage_seconds = watch.seconds
    result.meta[meta.REPORT] = report
    logger.info("optimize done: %s", report.to_markdown().splitlines()[4:6])
    return result
