"""Planning: the captured model turned into the DP's problem once, then solved at any budget.

``prepare`` runs the stages before the DP — analyze → enumerate options → price them (the latency
table, calibrated to the whole network when measured) → score the options' damage — and returns a
frozen :class:`Prepared`; :func:`solve` runs the DP on it for a budget and returns a :class:`Plan`.
:func:`make_plan` is the two in one call.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import fx, nn

from fxcompress.budget import Budget, as_budget
from fxcompress.cache import resolve_cache_dir, trim_cache
from fxcompress.data import inputs_for
from fxcompress.depth import planner
from fxcompress.depth.importance import Calibration, fingerprint, score_candidates
from fxcompress.depth.options import build_problem, enumerate_options, option_latency
from fxcompress.depth.segment import DROP, KEEP, Segment
from fxcompress.errors import InfeasibleBudget, InvalidArgument
from fxcompress.latency.table import LatencyTable
from fxcompress.pipeline.captured import Captured, capture_once
from fxcompress.pipeline.checks import (
    METHODS,
    check_batched,
    check_calibration_shapes,
    check_methods,
)
from fxcompress.pipeline.measure import Measure, PairedLatency, Stopwatch
from fxcompress.pipeline.plan import Plan
from fxcompress.pipeline.pricing import device_of, kept_latency, latency_table, price

logger = logging.getLogger("fxcompress")

__all__ = ["Planning", "Prepared", "make_plan", "prepare", "prepare_problem", "solve", "solve_ms"]


@dataclass(frozen=True)
class Planning:
    """How to plan: the planning arguments of :func:`make_plan`, as one object."""

    methods: tuple[str, ...] = METHODS
    data: Iterable[Any] | None = None
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None
    cache_dir: str | os.PathLike[str] | Literal[False] | None = None
    progress: bool | None = None
    calibration_batches: int = 4
    executor: Executor | None = None
    importance_checkpoint: str | None = None
    candidate_finetune: Callable[[fx.GraphModule], None] | None = None
    resolution: int = 2000


@dataclass(frozen=True)
class Prepared:
    """A planning problem ready for the DP: prepared once, solved at any budget by :func:`solve`.

    Attributes
    ----------
    problem : fxcompress.depth.planner.Problem
        What the DP solves (pure data).
    options : tuple
        The segment options priced and scored (their ``pruned`` units name the plan's).
    original : float
        The original model's latency (ms): measured, or the analytic estimate.
    inputs : tuple
        The example inputs (their shapes go into each plan).
    leaf_modules : tuple of str
    resolution : int
        Time bins of the DP.
    seconds : dict
        Seconds spent in each stage of the preparation.
    """

    problem: planner.Problem
    options: tuple[Any, ...]
    original: float
    inputs: tuple[Any, ...]
    leaf_modules: tuple[str, ...]
    resolution: int
    seconds: dict[str, float] = field(default_factory=dict, compare=False)


def _cacheable(loss_fn: Any, candidate_finetune: Any) -> bool:
    """Whether damage scores can be cached under a fingerprint without an explicit path."""
    return candidate_finetune is None and (loss_fn is None or isinstance(loss_fn, nn.Module))


def importance_file(key: str) -> str:
    """The name of the cached importance scores of fingerprint ``key``: ``importance-<hash>.json``.

    The hash covers the fingerprint, torch's and fxcompress's versions, so that scores computed
    by another version are never used.
    """
    import fxcompress

    digest = hashlib.blake2b(digest_size=16)
    for part in (key, torch.__version__, fxcompress.__version__):
        digest.update(part.encode() + b"\0")
    return f"importance-{digest.hexdigest()}.json"


def _scores(captured: Captured, options: list[Any], how: Planning) -> dict[str, float]:
    """The damage of every option that needs a score (:mod:`fxcompress.depth.importance`)."""
    gm, inputs = captured.gm, captured.inputs
    calib = Calibration.from_data(how.data, inputs, max_batches=how.calibration_batches)
    check_calibration_shapes(calib, inputs)
    candidates = [o.segment for o in options if o.needs_score]
    checkpoint, directory = how.importance_checkpoint, None
    if checkpoint is None and candidates and _cacheable(how.loss_fn, how.candidate_finetune):
        directory = resolve_cache_dir(how.cache_dir)
    if directory is not None:
        key = fingerprint(gm, calib, how.loss_fn, how.candidate_finetune)
        checkpoint = str(directory / importance_file(key))

    def score(checkpoint: str | None) -> dict[str, float]:
        return score_candidates(
            gm,
            captured.analysis,
            candidates,
            calib,
            loss_fn=how.loss_fn,
            candidate_finetune=how.candidate_finetune,
            executor=how.executor,
            checkpoint=checkpoint,
            progress=how.progress,
        )

    if directory is None:
        return score(checkpoint)
    try:
        scores = score(checkpoint)
    except OSError as exc:  # the cache became unwritable (full disk, say): never a failed run
        logger.warning(
            "could not write importance cache %s (%s); scoring in memory", checkpoint, exc
        )
        return score(None)
    trim_cache(directory)
    return scores


def prepare(
    captured: Captured, how: Planning, table: LatencyTable, measure: Measure | None = None
) -> Prepared:
    """The DP's problem for ``captured``: analyze → options → latency → importance.

    ``measure`` times the whole network to calibrate a measured ``table`` (default: paired
    timing on the table's device).
    """
    watch = Stopwatch()
    check_batched(captured.gm)
    with watch("analyze"):
        analysis = captured.analysis
        options = enumerate_options(
            analysis, prune="prune" in how.methods, drop=DROP in how.methods
        )
    with watch("latency"):
        pricing = price(captured, table, measure or PairedLatency(table))
        # an option no faster than keeping its items as they are can never be chosen
        options = [
            o
            for o in options
            if not o.needs_score
            or option_latency(o, analysis, pricing.table, pricing.dtype)
            < kept_latency(o.segment, analysis, pricing.table, pricing.dtype)
        ]
    with watch("importance"):
        scores = _scores(captured, options, how)
    # opaque parts keep their latency; the planner sees them as a fixed cost
    problem = build_problem(
        analysis, options, scores, pricing.table, dtype=pricing.dtype, fixed_latency=pricing.fixed
    )
    leaf = tuple(map(str, captured.leaf_modules))
    return Prepared(
        problem,
        tuple(options),
        pricing.original,
        captured.inputs,
        leaf,
        how.resolution,
        watch.seconds,
    )


def _segment_ms(problem: planner.Problem, decision: Segment) -> tuple[float, float]:
    """Predicted ms of a decision's span kept as it is, and as planned (its own part only)."""
    chains = {c.name: c for c in problem.chains}

    def choice(chain: str, start: int, stop: int, key: str) -> planner.Choice:
        seg = next(s for s in chains[chain].segments if (s.start, s.stop) == (start, stop))
        return next(c for c in seg.choices if c.key == key)

    def kept(chain: str, start: int, stop: int) -> float:
        total = 0.0
        for i in range(start, stop):
            c = choice(chain, i, i + 1, KEEP)
            total += c.latency + sum(kept(sub, 0, chains[sub].length) for sub in c.sub)
        return total

    own = choice(decision.chain, decision.start, decision.stop, decision.key).latency
    if decision.key == KEEP:
        return (own, own)
    return (kept(decision.chain, decision.start, decision.stop), own)


def plan_of(
    prep: Prepared,
    solution: planner.Solution,
    target: float,
    front: tuple[tuple[float, float], ...],
) -> Plan:
    """The :class:`Plan` of a planner solution for the budget ``target`` (ms)."""
    pruned_of = {o.id: o.segment.pruned for o in prep.options}
    segments = tuple(d._replace(pruned=tuple(pruned_of.get(d.id, ()))) for d in solution.decisions)
    return Plan(
        segments=segments,
        input_shapes=tuple(
            (tuple(t.shape), str(t.dtype).replace("torch.", ""))
            for t in prep.inputs
            if isinstance(t, torch.Tensor)
        ),
        budget_ms=target,
        predicted_ms=solution.latency,
        original_ms=prep.original,
        damage=solution.damage,
        leaf_modules=prep.leaf_modules,
        front=front,
        segment_ms=tuple(_segment_ms(prep.problem, d) for d in solution.decisions),
    )


def solve_ms(prepared: Prepared, target: float) -> Plan:
    """The least-damage :class:`Plan` predicted within ``target`` milliseconds.

    Raises
    ------
    InfeasibleBudget
        Below the lowest reachable latency; ``.minimum`` is a fraction of the original.
    """
    original = prepared.original
    try:
        solution = planner.solve(prepared.problem, target, resolution=prepared.resolution)
    except InfeasibleBudget as exc:
        low = exc.minimum / original
        raise InfeasibleBudget(
            f"budget {target / original:.3g} ({target:.3f} ms) is below the lowest reachable "
            f"latency {exc.minimum:.3f} ms ({low:.3g} of the original {original:.3f} ms)",
            minimum=low,
        ) from exc
    front = planner.pareto_front(prepared.problem, resolution=min(prepared.resolution, 400))
    return plan_of(prepared, solution, target, tuple(front))


def solve(prepared: Prepared, budget: float | Budget) -> Plan:
    """The least-damage :class:`Plan` of ``prepared`` predicted within ``budget``.

    Parameters
    ----------
    prepared : Prepared
        From :func:`prepare_problem`.
    budget : float or Budget
        A latency budget (a fraction of the original latency, or a ``Budget``).

    Raises
    ------
    InfeasibleBudget
        Below the lowest reachable latency; ``.minimum`` is a fraction of the original.
    """
    b = as_budget(budget)
    return solve_ms(prepared, b.fraction_of(prepared.original) * prepared.original)


def prepare_problem(
    model: nn.Module,
    budget: float | Budget,
    example_inputs: Any = None,
    *,
    data: Iterable[Any] | None = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    latency: str | LatencyTable = "measure",
    device: str | None = None,
    methods: Sequence[str] = METHODS,
    cache_dir: str | os.PathLike[str] | Literal[False] | None = None,
    progress: bool | None = None,
    calibration_batches: int = 4,
    executor: Executor | None = None,
    importance_checkpoint: str | None = None,
    candidate_finetune: Callable[[fx.GraphModule], None] | None = None,
    leaf_modules: Sequence[str] = (),
    resolution: int = 2000,
    measure: Measure | None = None,
) -> Prepared:
    """:func:`make_plan` up to the DP: a :class:`Prepared` problem to :func:`solve` at any budget.

    Takes :func:`make_plan`'s arguments; ``budget`` is only checked (that depth compression
    plans for it).
    """
    b = as_budget(budget)
    methods = check_methods(methods, b)
    if "lowrank" in methods:
        raise InvalidArgument(
            "make_plan plans depth compression; for methods=('lowrank',) call optimize or "
            "fxcompress.lowrank.decompose"
        )
    inputs = inputs_for(example_inputs, data)
    captured = capture_once(model, inputs, leaf_modules=leaf_modules)
    cache_dir = resolve_cache_dir(cache_dir) or False  # once: one warning if it is unusable
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
        resolution=resolution,
    )
    table = latency_table(latency, device or device_of(model), cache_dir, progress)
    return prepare(captured, how, table, measure)


def make_plan(
    model: nn.Module,
    budget: float | Budget,
    example_inputs: Any = None,
    *,
    data: Iterable[Any] | None = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    latency: str | LatencyTable = "measure",
    device: str | None = None,
    methods: Sequence[str] = METHODS,
    cache_dir: str | os.PathLike[str] | Literal[False] | None = None,
    progress: bool | None = None,
    calibration_batches: int = 4,
    executor: Executor | None = None,
    importance_checkpoint: str | None = None,
    candidate_finetune: Callable[[fx.GraphModule], None] | None = None,
    leaf_modules: Sequence[str] = (),
    resolution: int = 2000,
    measure: Measure | None = None,
) -> Plan:
    """Choose the segments to merge so the predicted latency fits ``budget``.

    Takes the planning arguments of :func:`~fxcompress.optimize` (which calls it; not
    ``finetune``, ``check``, ``max_replans``, ``plan_candidates`` or ``trial_finetune``), plus
    ``resolution``: the number of time bins of the DP. Returns a :class:`Plan`. The same as
    ``solve(prepare_problem(model, budget, ...), budget)``.

    Raises
    ------
    InfeasibleBudget
        If even merging everything mergeable cannot reach the budget; ``.minimum`` is the lowest
        reachable fraction of the original latency.
    """
    prepared = prepare_problem(
        model,
        budget,
        example_inputs,
        data=data,
        loss_fn=loss_fn,
        latency=latency,
        device=device,
        methods=methods,
        cache_dir=cache_dir,
        progress=progress,
        calibration_batches=calibration_batches,
        executor=executor,
        importance_checkpoint=importance_checkpoint,
        candidate_finetune=candidate_finetune,
        leaf_modules=leaf_modules,
        resolution=resolution,
        measure=measure,
    )
    return solve(prepared, budget)
