"""The public entry points: ``optimize``, ``plan``, ``relax`` and the ``Budget``/``Plan`` types.

The pipeline reads as a flat list of stages::

    capture -> canonicalize -> analyze -> latency -> score -> plan -> relax -> finetune -> merge

Budgets below 1 need all stages; ``budget=1.0`` only runs the function-preserving ones.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from fxcompress import meta
from fxcompress.budget import Budget, as_budget
from fxcompress.data import flat_tensors, inputs_for
from fxcompress.depth import planner, selection
from fxcompress.depth.analysis import Analysis, Residual, analyze
from fxcompress.depth.importance import (
    Calibration,
    Candidate,
    evaluate,
    fingerprint,
    reference_outputs,
    score_candidates,
)
from fxcompress.depth.merge import merge
from fxcompress.depth.partition import latency_cost
from fxcompress.depth.planning import (
    DROP,
    baseline_latency,
    build_problem,
    enumerate_options,
    item_latency,
    option_latency,
)
from fxcompress.depth.relax import apply_choices
from fxcompress.errors import InfeasibleBudget, InvalidArgument, RewriteError
from fxcompress.graph.canonicalize import canonicalize
from fxcompress.graph.capture import capture, normalize_inputs, propagate_shapes
from fxcompress.graph.util import clone, clone_tensors
from fxcompress.latency.table import LatencyTable, OpSpec
from fxcompress.latency.timing import paired_timing
from fxcompress.meta import SEGMENT
from fxcompress.report import Report, count_macs, count_params

__all__ = ["Budget", "Plan", "make_plan", "optimize", "relax"]

logger = logging.getLogger("fxcompress")

#: the default depth-compression search space (LayerMerge's)
METHODS = ("merge", "prune")
#: depth-compression methods that combine: ``"drop"`` adds dropping whole residual branches
DEPTH_METHODS = (*METHODS, DROP)
#: every method name ``optimize`` accepts; ``"lowrank"`` runs on its own
ALL_METHODS = (*DEPTH_METHODS, "lowrank")


@dataclass(frozen=True)
class Plan:
    """A chosen set of segments (JSON-able; replayable with :func:`relax` on the original model).

    Attributes
    ----------
    segments : tuple of (chain, start, stop, key, pruned)
    input_shapes : tuple of (shape, dtype name) of the example inputs the plan was made for
    """

    segments: tuple[tuple[str, int, int, str, tuple[str, ...]], ...]
    input_shapes: tuple[tuple[tuple[int, ...], str], ...]
    budget_ms: float
    predicted_ms: float
    original_ms: float
    damage: float
    leaf_modules: tuple[str, ...] = ()
    front: tuple[tuple[float, float], ...] = field(default=())
    #: predicted (kept, planned) milliseconds of each segment, aligned with ``segments``
    segment_ms: tuple[tuple[float, float], ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": 1,
            "segments": [[c, s, e, k, list(p)] for c, s, e, k, p in self.segments],
            "input_shapes": [[list(s), d] for s, d in self.input_shapes],
            "budget_ms": self.budget_ms,
            "predicted_ms": self.predicted_ms,
            "original_ms": self.original_ms,
            "damage": self.damage,
            "leaf_modules": list(self.leaf_modules),
            "front": [list(p) for p in self.front],
            "segment_ms": [list(p) for p in self.segment_ms],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        return cls(
            segments=tuple((c, int(s), int(e), k, tuple(p)) for c, s, e, k, p in d["segments"]),
            input_shapes=tuple((tuple(s), dt) for s, dt in d["input_shapes"]),
            budget_ms=float(d["budget_ms"]),
            predicted_ms=float(d["predicted_ms"]),
            original_ms=float(d["original_ms"]),
            damage=float(d["damage"]),
            leaf_modules=tuple(d.get("leaf_modules", ())),
            front=tuple(tuple(p) for p in d.get("front", ())),
            segment_ms=tuple(tuple(map(float, p)) for p in d.get("segment_ms", ())),
        )

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(json.loads(text))


# --------------------------------------------------------------------------- helpers


def _check_methods(methods: Sequence[str], budget: Budget | None = None) -> tuple[str, ...]:
    if isinstance(methods, str):
        methods = (methods,)
    methods = tuple(methods)
    bad = [m for m in methods if m not in ALL_METHODS]
    if bad or not methods:
        raise InvalidArgument(
            f"methods must be a non-empty subset of {DEPTH_METHODS}, or ('lowrank',), got "
            f"methods={methods!r}"
        )
    if "lowrank" in methods and len(set(methods)) > 1:
        raise InvalidArgument(
            f"methods={methods!r}: 'lowrank' runs on its own; to combine it with depth "
            "compression, optimize with ('merge', 'prune') first and then with ('lowrank',)"
        )
    if budget is not None and not budget.is_latency and methods != ("lowrank",):
        raise InvalidArgument(
            f"budget {budget!r} bounds parameters or MACs, which only methods=('lowrank',) "
            "plans for; depth compression takes a latency budget (a float, or Budget(fraction=, "
            "latency_ms=, speedup=))"
        )
    return methods


def _latency_table(
    latency: Any, device: str, cache_dir: Any, progress: bool | None
) -> LatencyTable:
    if isinstance(latency, LatencyTable):
        return latency
    if latency not in ("measure", "flops"):
        raise InvalidArgument(
            f"latency must be 'measure', 'flops' or a LatencyTable, got "
            f"latency={latency!r} (type={type(latency).__name__})"
        )
    return LatencyTable(mode=latency, device=device, cache_dir=cache_dir, progress=progress)


def _dtype_name(gm: fx.GraphModule) -> str:
    for p in gm.parameters():
        return str(p.dtype).replace("torch.", "")
    return "float32"


def _max_rel_error(a: Any, b: Any) -> float:

    worst = 0.0
    for x, y in zip(flat_tensors(a), flat_tensors(b)):
        scale = float(y.detach().abs().max()) if y.numel() else 0.0
        diff = float((x.detach().double() - y.detach().double()).abs().max()) if y.numel() else 0.0
        worst = max(worst, diff / max(scale, 1e-12))
    return worst


def _tolerance(inputs: tuple[Any, ...]) -> float:
    dtypes = {t.dtype for t in inputs if isinstance(t, torch.Tensor)}
    if dtypes & {torch.float16, torch.bfloat16}:
        return 2e-2
    if dtypes == {torch.float64}:
        return 1e-9
    return 1e-4


def _check(reference: nn.Module, result: nn.Module, inputs: tuple[Any, ...], what: str) -> float:
    """The largest relative error of ``result`` against ``reference`` on ``inputs``.

    Each runs on its own copy of the inputs: a model that writes its inputs in place must
    neither change the caller's tensors nor what the other one sees.
    """
    with torch.no_grad():
        err = _max_rel_error(result(*clone_tensors(inputs)), reference(*clone_tensors(inputs)))
    if not err <= _tolerance(inputs):
        raise RewriteError(
            f"{what} changed the model's outputs (max relative error {err:.3g}); "
            "this is a bug in fxcompress, please report it"
        )
    return err


def _check_batched(gm: fx.GraphModule) -> None:
    """Refuse planning on convs that see unbatched maps, naming the conv and the shape.

    The latency table prices a conv on an ``(N, C, *spatial)`` input; an unbatched
    ``(C, *spatial)`` input (which PyTorch accepts) has no such shape.
    """
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(str(node.target))
        if not isinstance(mod, nn.modules.conv._ConvNd) or not node.args:
            continue
        arg = node.args[0]
        meta = arg.meta.get("tensor_meta") if isinstance(arg, fx.Node) else None
        shape = getattr(meta, "shape", None)
        if shape is not None and len(shape) == len(mod.kernel_size) + 1:
            raise InvalidArgument(
                f"budgets below 1 need batched inputs, but conv {node.target!r} gets an "
                f"unbatched input of shape {tuple(shape)}; add a batch axis "
                "(e.g. x.unsqueeze(0)), or use budget=1.0 for the exact rewrites alone"
            )


# --------------------------------------------------------------------------- stages


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
    cache_dir: str | None = None,
    progress: bool | None = None,
    calibration_batches: int = 4,
    executor: Executor | None = None,
    importance_checkpoint: str | None = None,
    candidate_finetune: Callable[[fx.GraphModule], None] | None = None,
    leaf_modules: Sequence[str] = (),
    resolution: int = 2000,
    _timings: dict[str, float] | None = None,
    _keep: list[Any] | None = None,
) -> Plan:
    """Choose the segments to merge so the predicted latency fits ``budget``.

    Takes the planning arguments of :func:`optimize` (which calls it; not ``finetune``,
    ``check``, ``max_replans``, ``plan_candidates`` or ``trial_finetune``), plus ``resolution``:
    the number of time bins of the DP. Returns a :class:`Plan`.

    Raises
    ------
    InfeasibleBudget
        If even merging everything mergeable cannot reach the budget; ``.minimum`` is the lowest
        reachable fraction of the original latency.
    """
    b = as_budget(budget)
    methods = _check_methods(methods, b)
    if "lowrank" in methods:
        raise InvalidArgument(
            "make_plan plans depth compression; for methods=('lowrank',) call optimize or "
            "fxcompress.lowrank.decompose"
        )
    inputs = inputs_for(example_inputs, data)
    timings = _timings if _timings is not None else {}
    t0 = time.perf_counter()
    gm = canonicalize(capture(model, inputs, leaf_modules=leaf_modules))
    timings["capture"] = time.perf_counter() - t0
    _check_batched(gm)

    t0 = time.perf_counter()
    analysis = analyze(gm)
    options = enumerate_options(analysis, prune="prune" in methods, drop=DROP in methods)
    timings["analyze"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    dev = device or _device_of(model)
    table = _latency_table(latency, dev, cache_dir, progress)
    dtype = _dtype_name(gm)
    baseline = baseline_latency(analysis, table, dtype)
    if table.mode == "measure":
        # the budget is a fraction of the model as given; the parts outside chains are priced on
        # its exactly-merged form (BN folded), which is what every planned result builds on
        original, exact = _paired_latency(table, gm, merge(gm), inputs)
        # Ops timed in isolation do not add up to the network's time (caches, threading), so the
        # table is calibrated to the whole network: the analytic model splits the exactly-merged
        # network's measured time into chains and the rest, and chain latencies are scaled so
        # that keeping everything predicts exactly the measured time.
        analytic = LatencyTable(mode="flops")
        rest_a = _rest_estimate(gm, analysis, analytic, dtype)
        base_a = baseline_latency(analysis, analytic, dtype)
        fixed = exact * rest_a / max(rest_a + base_a, 1e-12)
        scale = (exact - fixed) / baseline if baseline > 0 else 1.0
        logger.info("latency table calibrated to the whole network: scale %.3f", scale)
        measured_table = table

        def table(op: OpSpec) -> float:  # type: ignore[no-redef]
            return scale * measured_table(op)
    else:
        original = baseline + _rest_estimate(gm, analysis, table, dtype)
        fixed = max(0.0, original - baseline)

    # an option no faster than keeping its items as they are can never be chosen (damage >= 0)
    options = [
        o
        for o in options
        if not o.needs_score
        or option_latency(o, analysis, table, dtype) < _kept_latency(o, analysis, table, dtype)
    ]
    timings["latency"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    calib = Calibration.from_data(data, inputs, max_batches=calibration_batches)
    _check_calibration_shapes(calib, inputs)
    candidates = [
        Candidate(o.chain, o.start, o.stop, o.key, o.pruned) for o in options if o.needs_score
    ]
    checkpoint = importance_checkpoint
    if checkpoint is None and cache_dir is not None and _cacheable(loss_fn, candidate_finetune):
        key = fingerprint(gm, calib, loss_fn, candidate_finetune)
        checkpoint = str(Path(cache_dir) / f"importance-{key}.json")
    scores = score_candidates(
        gm,
        analysis,
        candidates,
        calib,
        loss_fn=loss_fn,
        candidate_finetune=candidate_finetune,
        executor=executor,
        checkpoint=checkpoint,
        progress=progress,
    )
    timings["importance"] = time.perf_counter() - t0

    # opaque parts keep their latency; the planner sees them as a fixed cost
    problem = build_problem(analysis, options, scores, table, dtype=dtype, fixed_latency=fixed)
    prepared = _Prepared(
        problem, tuple(options), original, inputs, tuple(map(str, leaf_modules)), resolution
    )
    if _keep is not None:
        _keep.append(prepared)
    return _solve(prepared, b.fraction_of(original) * original, timings)


@dataclass(frozen=True)
class _Prepared:
    problem: planner.Problem
    options: tuple[Any, ...]
    original: float
    inputs: tuple[Any, ...]
    leaf_modules: tuple[str, ...]
    resolution: int


def _solve(prep: _Prepared, target: float, timings: dict[str, float]) -> Plan:
    t0 = time.perf_counter()
    original = prep.original
    try:
        solution = planner.solve(prep.problem, target, resolution=prep.resolution)
    except InfeasibleBudget as exc:
        low = exc.minimum / original
        raise InfeasibleBudget(
            f"budget {target / original:.3g} ({target:.3f} ms) is below the lowest reachable "
            f"latency {exc.minimum:.3f} ms ({low:.3g} of the original {original:.3f} ms)",
            minimum=low,
        ) from exc
    front = planner.pareto_front(prep.problem, resolution=min(prep.resolution, 400))
    timings["plan"] = timings.get("plan", 0.0) + time.perf_counter() - t0
    return _plan_of(prep, solution, target, tuple(front))


def _plan_of(
    prep: _Prepared,
    solution: planner.Solution,
    target: float,
    front: tuple[tuple[float, float], ...],
) -> Plan:
    """The :class:`Plan` of a planner solution for the budget ``target`` (ms)."""
    original = prep.original
    pruned_of = {o.id: o.pruned for o in prep.options}
    segs = [
        (
            d.chain,
            d.start,
            d.stop,
            d.key,
            tuple(pruned_of.get(f"{d.chain}:{d.start}-{d.stop}:{d.key}", ())),
        )
        for d in solution.decisions
    ]
    return Plan(
        segments=tuple(segs),
        input_shapes=tuple(
            (tuple(t.shape), str(t.dtype).replace("torch.", ""))
            for t in prep.inputs
            if isinstance(t, torch.Tensor)
        ),
        budget_ms=target,
        predicted_ms=solution.latency,
        original_ms=original,
        damage=solution.damage,
        leaf_modules=prep.leaf_modules,
        front=front,
        segment_ms=tuple(_segment_ms(prep.problem, d) for d in solution.decisions),
    )


def _segment_ms(problem: planner.Problem, decision: planner.Decision) -> tuple[float, float]:
    """Predicted ms of a decision's span kept as it is, and as planned (its own part only)."""
    chains = {c.name: c for c in problem.chains}

    def choice(chain: str, start: int, stop: int, key: str) -> planner.Choice:
        seg = next(s for s in chains[chain].segments if (s.start, s.stop) == (start, stop))
        return next(c for c in seg.choices if c.key == key)

    def kept(chain: str, start: int, stop: int) -> float:
        total = 0.0
        for i in range(start, stop):
            c = choice(chain, i, i + 1, "keep")
            total += c.latency + sum(kept(sub, 0, chains[sub].length) for sub in c.sub)
        return total

    own = choice(decision.chain, decision.start, decision.stop, decision.key).latency
    if decision.key == "keep":
        return (own, own)
    return (kept(decision.chain, decision.start, decision.stop), own)


def _check_calibration_shapes(calib: Calibration, inputs: tuple[Any, ...]) -> None:
    """Calibration batches must match the traced inputs in everything but the batch size."""
    for i, batch in enumerate(calib.inputs):
        if len(batch) != len(inputs):
            raise InvalidArgument(
                f"data batch {i} has {len(batch)} inputs, but the model was traced with "
                f"{len(inputs)}"
            )
        for j, (got, want) in enumerate(zip(batch, inputs)):
            if not (isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor)):
                continue
            if got.dim() != want.dim() or got.shape[1:] != want.shape[1:]:
                raise InvalidArgument(
                    f"data batch {i}, input {j} has shape {tuple(got.shape)}, but the model was "
                    f"traced with {tuple(want.shape)}: batches may differ only in their first "
                    "(batch) dimension"
                )


def _cacheable(loss_fn: Any, candidate_finetune: Any) -> bool:
    """Whether damage scores can be cached under a fingerprint without an explicit path."""
    return candidate_finetune is None and (loss_fn is None or isinstance(loss_fn, nn.Module))


def _kept_latency(opt: Any, analysis: Analysis, table: LatencyTable, dtype: str) -> float:
    items = analysis.chain(opt.chain).items[opt.start : opt.stop]
    return sum(item_latency(it, table, dtype) for it in items)


def _rest_estimate(
    gm: fx.GraphModule, analysis: Analysis, table: LatencyTable, dtype: str
) -> float:
    """Analytic cost of the nodes outside chains: one elementwise pass over each output."""
    from fxcompress.depth.analysis import _units_of
    from fxcompress.graph.util import shape_of

    covered: set[str] = set()
    for c in analysis.chains:
        for it in c.items:
            for u in _units_of(it):
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


def _device_of(model: nn.Module) -> str:
    for p in model.parameters():
        return str(p.device)
    return "cpu"


def relax(model: nn.Module, plan: Plan, example_inputs: Any = None) -> fx.GraphModule:
    """The trainable form of ``plan`` applied to ``model``.

    Activations inside the planned segments are removed, pruned convs dropped and padding moved
    to each segment's first conv; BatchNorm stays. ``merge(relax(model, plan))`` computes exactly
    what ``relax(model, plan)`` computes (in eval mode).

    Parameters
    ----------
    model : torch.nn.Module
        The original model (unchanged).
    plan : Plan
        From :func:`make_plan` (or ``Plan.from_json``).
    example_inputs : optional
        Inputs to trace with; by default zeros of the shapes recorded in ``plan``.
    """
    if not isinstance(plan, Plan):
        raise InvalidArgument(f"plan must be a fxcompress.Plan, got {type(plan).__name__}")
    inputs = (
        normalize_inputs(example_inputs)
        if example_inputs is not None
        else tuple(torch.zeros(s, dtype=getattr(torch, d)) for s, d in plan.input_shapes)
    )
    gm = canonicalize(capture(model, inputs, leaf_modules=plan.leaf_modules))
    analysis = analyze(gm)
    relaxed = apply_choices(gm, analysis, plan.segments)
    propagate_shapes(relaxed, inputs)
    relaxed.meta[meta.PLAN] = plan.to_dict()
    return relaxed


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
    cache_dir: str | None = None,
    progress: bool | None = None,
    calibration_batches: int = 4,
    executor: Executor | None = None,
    importance_checkpoint: str | None = None,
    candidate_finetune: Callable[[fx.GraphModule], None] | None = None,
    leaf_modules: Sequence[str] = (),
    max_replans: int = 5,
    plan_candidates: int = 1,
    trial_finetune: Callable[[fx.GraphModule], None] | None = None,
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
    cache_dir : str, optional
        Directory of the persistent latency cache.
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
        (with a warning) and overwritten. By default, with ``cache_dir`` given and ``loss_fn``
        either None or an ``nn.Module``, scores are kept in ``cache_dir`` under their
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
        :mod:`fxcompress.depth.selection`. Plans of nearly equal planned damage can end far apart
        after fine-tuning, and this is the way to tell them apart. A best plan with no
        measured damage is kept without trials.
    trial_finetune : callable, optional
        ``trial_finetune(relaxed)`` for ``plan_candidates > 1``, typically a shorter version of
        ``finetune`` (e.g. ``Distill(..., epochs=1)``). By default ``finetune`` itself, whose
        result for the kept plan is then used directly. Same contract as ``finetune``.

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
    if not isinstance(model, nn.Module):
        raise InvalidArgument(
            f"model must be a torch.nn.Module, got model={model!r:.80} "
            f"(type={type(model).__name__})"
        )
    methods = _check_methods(methods, b)
    trial = _check_trial(plan_candidates, trial_finetune, finetune, methods)
    inputs = inputs_for(example_inputs, data)
    table = _latency_table(latency, device or _device_of(model), cache_dir, progress)
    if methods == ("lowrank",):
        return _optimize_lowrank(
            model,
            b,
            inputs,
            table=table,
            finetune=finetune,
            check=check,
            progress=progress,
            leaf_modules=leaf_modules,
        )
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    gm = canonicalize(capture(model, inputs, leaf_modules=leaf_modules, check=check))
    # the reference of the final check is the caller's model itself (an eval-mode copy run
    # eagerly), not a trace of it: a trace can already differ (e.g. a dropped hook)
    eager = copy.deepcopy(model).eval() if check else None
    report = Report(
        budget=_report_budget(b),
        target=_asked(b),
        latency_mode=table.mode,
        params_before=count_params(gm),
        macs_before=count_macs(gm),
    )
    report.events = list(gm.meta.get(meta.EVENTS, []))
    timings["capture"] = time.perf_counter() - t0

    exact, merged = _exact_only(b, gm, table, inputs, report)
    if exact:
        t0 = time.perf_counter()
        result = merged if merged is not None else merge(gm)
        timings["merge"] = time.perf_counter() - t0
        if eager is not None:
            report.max_rel_error = _check(eager, result, inputs, "capture and merge")
        report.kept = _kept(gm)
    else:
        if eager is not None:
            _check(eager, gm, inputs, "capture and canonicalization")
        result, _relaxed, plan = _optimize_below_one(
            model,
            b,
            inputs,
            data=data,
            loss_fn=loss_fn,
            finetune=finetune,
            table=table,
            methods=methods,
            check=check,
            progress=progress,
            calibration_batches=calibration_batches,
            executor=executor,
            importance_checkpoint=importance_checkpoint,
            cache_dir=cache_dir,
            candidate_finetune=candidate_finetune,
            leaf_modules=leaf_modules,
            max_replans=max_replans,
            plan_candidates=plan_candidates,
            trial=trial,
            report=report,
            timings=timings,
        )
        report.predicted_ms = plan.predicted_ms
        report.damage = plan.damage
        ms = plan.segment_ms or ((float("nan"), float("nan")),) * len(plan.segments)
        report.decisions = Report.decisions_of(gm, plan.segments, ms)  # names the layers
        report.original_ms = plan.original_ms
        report.front = [[float(ms), float(dmg)] for ms, dmg in plan.front]
        report.kept = _kept(gm)
    report.events += [e for e in result.meta.get(meta.EVENTS, []) if e not in report.events]
    report.params_after = count_params(result)
    report.macs_after = count_macs(result)
    if table.mode == "measure" and (report.original_ms is None or report.final_ms is None):
        # timed alternately, so the ratio survives a busy machine
        report.original_ms, report.final_ms = _paired_latency(table, gm, result, inputs)
    report.stage_seconds = timings
    result.meta[meta.REPORT] = report
    logger.info("optimize done: %s", report.to_markdown().splitlines()[4:6])
    return result


def _report_budget(b: Budget, original_ms: float | None = None) -> float:
    """The budget as a fraction of the original latency, for the report (NaN if not known:
    a ``latency_ms`` budget before the original is timed, a parameter or MAC budget)."""
    if not b.is_latency or (b.latency_ms is not None and not original_ms):
        return float("nan")
    return b.fraction_of(original_ms or 1.0)


def _asked(b: Budget) -> dict[str, float]:
    """The budget as it was asked (``{"speedup": 2.0}``), for the report."""
    return {
        name: float(value)
        for name in ("fraction", "latency_ms", "speedup", "params", "macs")
        if (value := getattr(b, name)) is not None
    }


def _exact_only(
    b: Budget, gm: fx.GraphModule, table: LatencyTable, inputs: tuple[Any, ...], report: Report
) -> tuple[bool, fx.GraphModule | None]:
    """Whether ``b`` asks for no speed-up, so only function-preserving rewrites run.

    That is ``budget=1.0``, ``Budget(speedup=1)`` and a ``Budget(latency_ms=...)`` at or above
    the original latency. The latter is timed here (with the exact merge, returned for reuse).
    """
    if b.fraction == 1.0 or b.speedup == 1.0:
        return True, None
    if b.latency_ms is None:
        return False, None
    merged = merge(gm)
    if table.mode == "measure":
        original, exact_ms = _paired_latency(table, gm, merged, inputs)
        report.original_ms, report.final_ms = original, exact_ms
    else:
        analysis = analyze(gm)
        dtype = _dtype_name(gm)
        original = baseline_latency(analysis, table, dtype) + _rest_estimate(
            gm, analysis, table, dtype
        )
    report.budget = _report_budget(b, original)
    if b.latency_ms >= original:
        logger.info(
            "budget %.3f ms is not below the original latency %.3f ms: exact rewrites only",
            b.latency_ms,
            original,
        )
        return True, merged
    report.original_ms = report.final_ms = None  # the plan's own timing takes over
    return False, None


def _kept(gm: fx.GraphModule) -> list[list[str]]:
    """The parts left as they are, with why; a hooked module says which hooks keep it."""
    hooked = gm.meta.get(meta.HOOKED, {})
    targets = {n.name: str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    kept = []
    for node, reason in analyze(gm).kept:
        target = targets.get(node)
        if target in hooked:
            reason = f"module '{target}' has {', '.join(hooked[target])}"
        kept.append([node, reason])
    return kept


def _check_trial(
    plan_candidates: Any,
    trial_finetune: Any,
    finetune: Any,
    methods: tuple[str, ...],
) -> Callable[[fx.GraphModule], None] | None:
    """The trial fine-tune to choose among ``plan_candidates`` plans with (None: no choice)."""
    if isinstance(plan_candidates, bool) or not isinstance(plan_candidates, int):
        raise InvalidArgument(
            f"plan_candidates must be a positive int, got {plan_candidates!r} "
            f"(type={type(plan_candidates).__name__}); 1 keeps the planner's best plan"
        )
    if plan_candidates < 1:
        raise InvalidArgument(
            f"plan_candidates must be >= 1, got {plan_candidates}; 1 keeps the planner's best plan"
        )
    for name, fn in (("trial_finetune", trial_finetune), ("finetune", finetune)):
        if fn is not None and not callable(fn):
            raise InvalidArgument(
                f"{name} must be a callable taking the relaxed GraphModule, got {fn!r:.80}"
            )
    if plan_candidates == 1:
        return None
    if methods == ("lowrank",):
        raise InvalidArgument(
            f"plan_candidates={plan_candidates} chooses among depth-compression plans; "
            "methods=('lowrank',) has none to choose from: leave plan_candidates=1"
        )
    trial = trial_finetune if trial_finetune is not None else finetune
    if trial is None:
        raise InvalidArgument(
            f"plan_candidates={plan_candidates} needs trial_finetune= (or finetune=): the plans "
            "are told apart by training each briefly; untrained, the planner's damage already "
            "ranks them"
        )
    return trial


def _optimize_lowrank(
    model: nn.Module,
    b: Budget,
    inputs: tuple[Any, ...],
    *,
    table: LatencyTable,
    finetune: Callable[[fx.GraphModule], None] | None,
    check: bool,
    progress: bool | None,
    leaf_modules: Sequence[str],
) -> fx.GraphModule:
    from fxcompress import lowrank  # imported late: it builds on this module's neighbours

    t0 = time.perf_counter()
    target: Any = {"latency": b.fraction} if b.fraction is not None else b
    result = lowrank.decompose(
        model,
        target,
        inputs,
        latency=table,
        finetune=None if finetune is None else _weights_back(finetune),
        check=check,
        progress=progress,
        leaf_modules=leaf_modules,
    )
    decomposition = result.meta[meta.LOWRANK]
    original = canonicalize(capture(model, inputs, leaf_modules=leaf_modules))
    report = Report(
        budget=_report_budget(b),
        target=_asked(b),
        latency_mode=table.mode,
        params_before=count_params(original),
        params_after=count_params(result),
        macs_before=decomposition.to_dict().get("macs_before", count_macs(original)),
        macs_after=decomposition.to_dict().get("macs_after", count_macs(result)),
    )
    report.events = [{"kind": "lowrank", **decomposition.to_dict()}]
    report.stage_seconds = {"lowrank": time.perf_counter() - t0}
    if table.mode == "measure":
        report.original_ms, report.final_ms = _paired_latency(table, original, result, inputs)
        report.budget = _report_budget(b, report.original_ms)
    if finetune is None and report.macs_after != report.macs_before:
        logger.warning(
            "the low-rank factors approximate the layers they replace and no fine-tuning was "
            "asked for, so the result is not trained to recover; pass finetune= to optimize"
        )
    result.meta[meta.REPORT] = report
    return result


def _weights_back(finetune: Callable[[fx.GraphModule], Any]) -> Callable[[fx.GraphModule], None]:
    """``finetune`` for a pass that merges the model it hands over: a returned model's weights
    are copied back into it (they must have the same names and shapes)."""

    def run(gm: fx.GraphModule) -> None:
        out = finetune(gm)
        if out is None or out is gm:
            return
        if not isinstance(out, nn.Module):
            raise InvalidArgument(
                f"finetune returned {_short(out)} (type={type(out).__name__}); it must train "
                "the model it is given in place and return None, or return the trained model"
            )
        try:
            gm.load_state_dict(out.state_dict())
        except RuntimeError as exc:
            raise InvalidArgument(
                f"finetune returned a {type(out).__name__} whose parameters are not those of "
                f"the model it was given ({str(exc).splitlines()[0]}); with methods=('lowrank',) "
                "train the given model in place, or return a trained copy of it"
            ) from None

    return run


def _paired_latency(
    table: LatencyTable, a: nn.Module, b: nn.Module, inputs: tuple[Any, ...], pairs: int = 15
) -> tuple[float, float]:
    """Latencies of ``a`` and ``b`` timed alternately (see :mod:`fxcompress.latency.timing`)."""
    device = table.device
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    t = paired_timing(a, b, inputs, pairs=pairs, threads=table.threads, sync=sync)
    if t.spread > 0.1:
        logger.info("noisy latency measurement: per-pair ratios spread %.0f %%", 100 * t.spread)
    return t.a_ms, t.b_ms


def _merged(relaxed: fx.GraphModule, table: LatencyTable) -> fx.GraphModule:
    """``merge(relaxed)`` with each linear run split as the latency table prices it."""
    return merge(relaxed, cost=latency_cost(table))


def _finetuned(
    model: nn.Module,
    plan: Plan,
    inputs: tuple[Any, ...],
    finetune: Callable[[fx.GraphModule], None],
    check: bool,
    report: Report,
    timings: dict[str, float],
    table: LatencyTable,
) -> tuple[fx.GraphModule, fx.GraphModule]:
    """``plan`` relaxed afresh, fine-tuned by the caller's callback, and merged."""
    t0 = time.perf_counter()
    relaxed = _run_finetune(finetune, relax(model, plan, inputs), inputs, plan, "finetune")
    result = _merged(relaxed, table)
    timings["finetune"] = time.perf_counter() - t0
    if check:
        report.max_rel_error = _check(relaxed, result, inputs, "merge of the fine-tuned model")
    return relaxed, result


def _run_finetune(
    fn: Callable[[fx.GraphModule], Any],
    relaxed: fx.GraphModule,
    inputs: tuple[Any, ...],
    plan: Plan,
    name: str,
) -> fx.GraphModule:
    """Run the caller's fine-tune ``fn`` on ``relaxed``; the eval-mode graph to merge after it.

    The contract (see :func:`optimize`): ``fn`` gets ``relaxed`` in eval mode and trains it in
    place (returning None), or returns the trained model, which is then merged instead. A
    returned ``nn.Module`` that is not ``relaxed`` is copied (a module other than a GraphModule
    is captured), its shapes are recorded on ``inputs``, and the planned segments are marked on
    the nodes it shares by name with ``relaxed``, so that :func:`merge` merges them as planned.
    """
    out = fn(relaxed)
    if out is None or out is relaxed:
        return relaxed.eval()
    if not isinstance(out, nn.Module):
        raise InvalidArgument(
            f"{name} returned {_short(out)} (type={type(out).__name__}); it must train the "
            "relaxed model it is given in place and return None, or return the trained model "
            "(an nn.Module, e.g. a trained copy of the relaxed GraphModule) to merge instead"
        )
    if isinstance(out, fx.GraphModule):
        trained = clone(out).eval()
        propagate_shapes(trained, inputs)
    else:
        trained = canonicalize(capture(out, inputs, leaf_modules=plan.leaf_modules))
    tags = {n.name: n.meta[SEGMENT] for n in relaxed.graph.nodes if SEGMENT in n.meta}
    for node in trained.graph.nodes:
        if node.name in tags and SEGMENT not in node.meta:
            node.meta[SEGMENT] = tags[node.name]
    trained.meta.setdefault(meta.PLAN, plan.to_dict())
    logger.info("%s returned a %s: merging it", name, type(out).__name__)
    return trained


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _next_target(history: list[tuple[float, float]], aim: float) -> float:
    """The budget (ms) to plan for next so the measured ratio lands on ``aim``.

    ``history`` holds (planned budget ms, measured ratio) of every attempt. Between two attempts
    that bracket ``aim`` the budget is interpolated linearly. Otherwise, the two attempts closest
    to ``aim`` extrapolate along their line when the ratio grows with the budget (the measured
    latency has a part no plan removes, so proportional steps fall short), at most four times
    as far as the proportional step; with one attempt, or a line that does not rise, the
    closest attempt is scaled in proportion to its miss.
    """
    below = [h for h in history if h[1] <= aim]
    above = [h for h in history if h[1] > aim]
    if below and above:
        (t0, r0), (t1, r1) = max(below, key=lambda h: h[1]), min(above, key=lambda h: h[1])
        if r1 > r0:
            return t0 + (t1 - t0) * (aim - r0) / (r1 - r0)
    near = sorted(history, key=lambda h: abs(h[1] - aim))
    target, ratio = near[0]
    proportional = target * aim / ratio
    other = next((h for h in near[1:] if h[0] != target), None)
    if other is not None and (other[1] - ratio) / (other[0] - target) > 0:
        slope = (other[1] - ratio) / (other[0] - target)
        step = (aim - ratio) / slope
        reach = 4 * abs(proportional - target)
        return target + max(-reach, min(reach, step))
    return proportional


def _optimize_below_one(
    model: nn.Module,
    b: Budget,
    inputs: tuple[Any, ...],
    *,
    table: LatencyTable,
    finetune: Callable[[fx.GraphModule], None] | None,
    check: bool,
    max_replans: int,
    plan_candidates: int,
    trial: Callable[[fx.GraphModule], None] | None,
    report: Report,
    timings: dict[str, float],
    **kw: Any,
) -> tuple[fx.GraphModule, fx.GraphModule, Plan]:
    kw_plan = dict(kw.items())
    keep: list[_Prepared] = []
    plan = make_plan(model, b, inputs, latency=table, _timings=timings, _keep=keep, **kw_plan)
    goal = plan.budget_ms
    # a model with no priced work (e.g. only reshapes under latency="flops") meets any budget
    goal_ratio = goal / plan.original_ms if plan.original_ms > 0 else 1.0
    report.budget = _report_budget(b, plan.original_ms)
    # the accepted band of measured ratios; a re-plan aims inside it, nearer its top (least damage)
    low_ratio, high_ratio, aim = 0.85 * goal_ratio, 1.05 * goal_ratio, 0.96 * goal_ratio
    original_gm = canonicalize(capture(model, inputs, leaf_modules=kw.get("leaf_modules", ())))
    tried: list[tuple[Plan, fx.GraphModule, fx.GraphModule, float | None]] = []
    # (planned budget ms, measured ratio): every measurement, plus every budget whose plan turned
    # out to be one already measured (the DP is deterministic, so its ratio is known for free)
    history: list[tuple[float, float]] = []
    measured_ratio: dict[tuple[Any, ...], float] = {}

    def solve(target: float) -> Plan:
        try:
            return _solve(keep[0], target, timings)
        except InfeasibleBudget as exc:
            # rounding at the lowest reachable latency: plan the fastest
            return _solve(keep[0], exc.minimum * plan.original_ms, timings)

    def bracket() -> tuple[float, float] | None:
        """The nearest two budgets, one measured below the band and one above it."""
        below = [t for t, r in history if r < low_ratio]
        above = [t for t, r in history if r > high_ratio]
        pairs = [(a, c) for a in below for c in above]
        return min(pairs, key=lambda p: abs(p[0] - p[1])) if pairs else None

    for attempt in range(max_replans + 1):
        t0 = time.perf_counter()
        relaxed = relax(model, plan, inputs)
        timings["relax"] = timings.get("relax", 0.0) + time.perf_counter() - t0
        t0 = time.perf_counter()
        result = _merged(relaxed, table)
        timings["merge"] = timings.get("merge", 0.0) + time.perf_counter() - t0
        if check:
            report.max_rel_error = _check(relaxed, result, inputs, "merge of the relaxed model")
        if table.mode != "measure":
            tried.append((plan, relaxed, result, None))
            break
        # the original and the result are timed alternately in this run, so the ratio is
        # robust to the machine's load drifting between the two measurements
        t0 = time.perf_counter()
        original_ms, measured = _paired_latency(table, original_gm, result, inputs)
        timings["measure"] = timings.get("measure", 0.0) + time.perf_counter() - t0
        ratio = measured / original_ms
        tried.append((plan, relaxed, result, ratio))
        history.append((plan.budget_ms, ratio))
        measured_ratio[plan.segments] = ratio
        if low_ratio <= ratio <= high_ratio or attempt == max_replans:
            break
        looser = ratio < low_ratio
        # Find a budget whose plan was not measured yet (at most 16 probes of the DP, which cost
        # no measurement):
        # - once two budgets bracket the band (one measured too fast, one too slow), bisect
        #   between them: measured latency can jump across the band from one plan to the next,
        #   where a secant overshoots;
        # - otherwise, first the secant estimate, then, while the DP answers with a plan already
        #   measured, geometric steps further the same way, until the budget is clamped at the
        #   lowest reachable latency or the original one and still gives a measured plan.
        # A repeated plan's budget joins the history with that plan's ratio, which can close a
        # bracket or narrow one.
        lowest = planner.min_latency(keep[0].problem)
        new_plan: Plan | None = None
        target, how, step, repeats = 0.0, "secant", 0.05, 0
        for _probe in range(16):
            pair = bracket()
            if pair is not None:
                if abs(pair[0] - pair[1]) <= 1e-6 * plan.original_ms:
                    break  # no other plan lies between the two
                target, how = (pair[0] + pair[1]) / 2, "bisect"
            elif not repeats:
                target = _next_target(history, aim)
            else:
                target, how = target * (1 + step) if looser else target / (1 + step), "step"
                step *= 2
            target = min(max(target, lowest), plan.original_ms)
            candidate = solve(target)
            if candidate.segments not in measured_ratio:
                new_plan = candidate
                break
            repeats += 1
            history.append((target, measured_ratio[candidate.segments]))
            bound = plan.original_ms if looser else lowest
            if pair is None and bracket() is None and target == bound:
                break  # clamped at the bound and still a measured plan: nothing new that way
        if new_plan is None:
            logger.info("measured ratio %.3f vs goal %.3f; no other plan to try", ratio, goal_ratio)
            break
        report.replans.append(
            {
                "measured_ratio": ratio,
                "goal_ratio": goal_ratio,
                "new_budget_ms": new_plan.budget_ms,
                "new_predicted_ms": new_plan.predicted_ms,
                "direction": "looser" if looser else "tighter",
                # how the budget was chosen ("secant", "bisect" or "step"), and how many probed
                # budgets before it gave a plan already measured
                "how": how,
                "repeats": repeats,
            }
        )
        logger.info("measured ratio %.3f vs goal %.3f; re-planning (%s)", ratio, goal_ratio, how)
        plan = new_plan
    # The least damaging attempt whose measurement met the goal (ratio <= 1.05 x goal), else the
    # fastest. The band's lower edge only steers the search: an attempt measured below it that
    # also does less damage than one inside it is better on both counts, so it wins.
    met = [t for t in tried if t[3] is None or t[3] <= high_ratio]
    if met:
        plan, relaxed, result, ratio = min(met, key=lambda t: (t[0].damage, t[0].predicted_ms))
    else:
        plan, relaxed, result, ratio = min(tried, key=lambda t: t[3] or 0.0)
        if finetune is not None:
            # the exception carries the fastest model: hand it over as finished as a success
            relaxed, result = _finetuned(
                model, plan, inputs, finetune, check, report, timings, table
            )
        report.predicted_ms, report.damage = plan.predicted_ms, plan.damage
        report.original_ms = plan.original_ms
        report.final_ms = None if ratio is None else ratio * plan.original_ms
        report.stage_seconds = timings
        result.meta[meta.REPORT] = report
        raise InfeasibleBudget(
            f"budget {goal_ratio:.3g} is missed on measurement: none of the {len(tried)} plans "
            f"measured on {table.device} (max_replans={max_replans}) runs within 5 % of it, the "
            f"fastest at {ratio:.3g} of the original latency; allow more re-plans, ask for a "
            f"budget of at least {ratio:.3g}, or take that model from this exception's .result",
            minimum=ratio,
            result=result,
        )
    trained = None
    if trial is not None and plan.damage == 0:
        # the best plan does no measured damage: no other plan can do better, and training
        # noise must not trade it for one that changes the function
        logger.info("best plan has no damage: kept without trial fine-tunes")
    elif trial is not None:
        plan, ratio, trained = _choose_by_trial(
            model,
            (plan, relaxed, ratio),
            inputs,
            keep[0],
            count=plan_candidates,
            trial=trial,
            table=table,
            original_gm=original_gm,
            limit=high_ratio,
            report=report,
            timings=timings,
            data=kw.get("data"),
            loss_fn=kw.get("loss_fn"),
            calibration_batches=kw.get("calibration_batches", 4),
            progress=kw.get("progress"),
        )
    if ratio is not None:
        report.final_ms = ratio * plan.original_ms
    if trained is not None and (finetune is None or finetune is trial):
        # the kept plan's trial fine-tune is the fine-tune (or the only training asked for)
        relaxed, result = trained, _merged(trained, table)
        if check:
            report.max_rel_error = _check(relaxed, result, inputs, "merge of the trained model")
    elif finetune is not None:
        relaxed, result = _finetuned(
            model, plan, inputs, finetune, check, report, timings, table
        )
    elif plan.damage > 0:
        logger.warning(
            "budget %.3g changes the model's function (planned damage %.3g: activations "
            "removed or layers pruned) and no fine-tuning was asked for, so the result is not "
            "trained to recover; pass finetune= (e.g. fxcompress.Distill(model, data)) to "
            "optimize",
            goal_ratio,
            plan.damage,
        )
    if (trained is not None or finetune is not None) and table.mode == "measure":
        o, f = _paired_latency(table, original_gm, result, inputs)
        report.final_ms = f / o * plan.original_ms
    return result, relaxed, plan


def _choose_by_trial(
    model: nn.Module,
    chosen: tuple[Plan, fx.GraphModule, float | None],
    inputs: tuple[Any, ...],
    prep: _Prepared,
    *,
    count: int,
    trial: Callable[[fx.GraphModule], None],
    table: LatencyTable,
    original_gm: fx.GraphModule,
    limit: float,
    report: Report,
    timings: dict[str, float],
    data: Iterable[Any] | None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None,
    calibration_batches: int,
    progress: bool | None,
) -> tuple[Plan, float | None, fx.GraphModule]:
    """The plan kept among ``chosen`` (plan, relaxed network, measured ratio) and its
    runners-up by a trial fine-tune of each.

    Returns the kept plan, its measured ratio and its trial-trained relaxed network.
    """
    t0 = time.perf_counter()
    plan, relaxed, ratio = chosen
    # The runners-up by planned damage, until count plans can be trained: a runner-up that
    # relaxes to a network already seen is skipped, one measured slower than the limit is kept
    # on record but not trained. At most 4 * count runners-up are looked at and 2 * (count - 1)
    # measured (a measurement is a paired timing of the whole network).
    solutions = itertools.islice(
        planner.ranked(prep.problem, plan.budget_ms, resolution=prep.resolution), 1, 4 * count
    )
    nothing = Calibration([], [])
    seen = {fingerprint(relaxed, nothing)}
    plans: list[Plan] = [plan]
    ratios: list[float | None] = [ratio]
    trainable = 1
    for solution in solutions:
        if trainable == count or len(plans) > 2 * (count - 1):
            break
        other = _plan_of(prep, solution, plan.budget_ms, plan.front)
        other_relaxed = relax(model, other, inputs)
        digest = fingerprint(other_relaxed, nothing)
        if digest in seen:
            continue  # other decisions, the same trainable network (e.g. a one-item "merge")
        seen.add(digest)
        measured_ratio = None
        if table.mode == "measure":
            merged = _merged(other_relaxed, table)
            original_ms, measured = _paired_latency(table, original_gm, merged, inputs)
            measured_ratio = measured / original_ms
        plans.append(other)
        ratios.append(measured_ratio)
        trainable += measured_ratio is None or measured_ratio <= limit
    calib = Calibration.from_data(data, inputs, max_batches=calibration_batches)
    loss = loss_fn if calib.targets[0] is not None else None
    reference = reference_outputs(original_gm, calib)
    def run_trial(net: fx.GraphModule) -> fx.GraphModule:
        plan = Plan.from_dict(net.meta[meta.PLAN])  # set by relax
        return _run_finetune(trial, net, inputs, plan, "trial_finetune")

    picked = selection.choose(
        plans,
        ratios,
        limit=limit,
        describe=lambda p: (p.damage, p.predicted_ms),
        relax=lambda p: relax(model, p, inputs),
        trial=run_trial,
        score=lambda net: evaluate(net, calib, reference, loss),
        progress=progress,
    )
    report.trials = [t.to_dict() for t in picked.trials]
    logger.info(
        "kept plan %d of %d after trial fine-tunes (scores %s)",
        picked.index,
        len(plans),
        [t.score for t in picked.trials],
    )
    timings["select"] = time.perf_counter() - t0
    return picked.plan, ratios[picked.index], picked.trained
