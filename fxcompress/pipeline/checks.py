"""Validation of :func:`fxcompress.optimize`'s arguments; the numerical check of each exact step.

Every refusal raises :class:`~fxcompress.errors.InvalidArgument` naming the value and the fix; a
rewrite that changed what it should preserve raises :class:`~fxcompress.errors.RewriteError`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx, nn

from fxcompress.budget import Budget
from fxcompress.data import flat_tensors
from fxcompress.depth.importance import Calibration
from fxcompress.depth.segment import DROP
from fxcompress.errors import InvalidArgument, RewriteError
from fxcompress.graph.util import clone_tensors

__all__ = [
    "ALL_METHODS",
    "DEPTH_METHODS",
    "METHODS",
    "check_batched",
    "check_calibration_shapes",
    "check_methods",
    "check_model",
    "check_outputs",
    "check_trial",
    "short",
]

#: the default depth-compression search space (LayerMerge's)
METHODS = ("merge", "prune")
#: depth-compression methods that combine: ``"drop"`` adds dropping whole residual branches
DEPTH_METHODS = (*METHODS, DROP)
#: every method name ``optimize`` accepts; ``"lowrank"`` runs on its own
ALL_METHODS = (*DEPTH_METHODS, "lowrank")


def check_model(model: Any) -> None:
    """Refuse anything but an ``nn.Module``."""
    if not isinstance(model, nn.Module):
        raise InvalidArgument(
            f"model must be a torch.nn.Module, got model={model!r:.80} "
            f"(type={type(model).__name__})"
        )


def check_methods(methods: Sequence[str], budget: Budget | None = None) -> tuple[str, ...]:
    """``methods`` as a tuple, refused unless it is a subset of :data:`DEPTH_METHODS` or
    ``("lowrank",)`` that ``budget`` (if given) fits."""
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


def check_trial(
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


def check_batched(gm: fx.GraphModule) -> None:
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


def check_calibration_shapes(calib: Calibration, inputs: tuple[Any, ...]) -> None:
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


def check_outputs(
    reference: nn.Module, result: nn.Module, inputs: tuple[Any, ...], what: str
) -> float:
    """The largest relative error of ``result`` against ``reference`` on ``inputs``.

    Each runs on its own copy of the inputs: a model that writes its inputs in place must
    neither change the caller's tensors nor what the other one sees.

    Raises
    ------
    RewriteError
        If the error exceeds the tolerance of the inputs' dtype; ``what`` names the step.
    """
    with torch.no_grad():
        err = _max_rel_error(result(*clone_tensors(inputs)), reference(*clone_tensors(inputs)))
    if not err <= _tolerance(inputs):
        raise RewriteError(
            f"{what} changed the model's outputs (max relative error {err:.3g}); "
            "this is a bug in fxcompress, please report it"
        )
    return err


def short(value: Any) -> str:
    """``repr(value)`` cut to 60 characters, for messages."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
