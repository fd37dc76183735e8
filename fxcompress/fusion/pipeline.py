"""Layer Fusion: fuse the weights of similar repeated blocks (O'Neill et al., 2020).

Repeated residual blocks of the same role are found in the graph (:func:`find_blocks`: same
module types, parameter shapes, tensor shapes and wiring; nothing architecture-specific), their
hidden units are aligned by a permutation (function-preserving), the most similar ones are fused,
and the unique parameter count falls to the budget.

Two modes:

``"share"``
    Ties layers: the layer in slot ``k`` of several same-role blocks becomes one module (the
    average of the aligned originals) called from every block. Unique parameters shrink; the
    graph, its depth and its latency do not change. Pairs are fused most-similar first, per
    slot, until the budget is met (single-linkage clustering of the slots).
``"drop"``
    Replaces runs of adjacent same-role blocks (shape-preserving residual blocks) by one block
    with the averaged aligned weights, applied once: depth, latency and parameters shrink.

Neither is exact: fused networks need retraining (``retrain=``, applied after each of ``steps``
increments, as in the paper's iterative fuse-then-retrain schedule). In ``share`` mode the tied
modules are single ``nn.Parameter`` objects, so an optimiser sees each once and retraining
keeps them tied.

The budget is the fraction of the model's unique parameters to keep
(``sum(p.numel() for p in model.parameters())``, which counts a shared parameter once).

Modules: :mod:`.blocks` (repeated blocks and their roles), :mod:`.align` (weight matching),
:mod:`.similarity`, :mod:`.schedule` (candidate pairs and the greedy choice), :mod:`.rewrite`
(share / drop surgery), :mod:`.pipeline` (``fuse``), :mod:`.report`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

from torch import fx, nn

from fxcompress import meta
from fxcompress.budget import Budget, as_budget
from fxcompress.data import inputs_for
from fxcompress.errors import InfeasibleBudget, InvalidArgument, RewriteError
from fxcompress.fusion.align import align_block
from fxcompress.fusion.blocks import find_blocks
from fxcompress.fusion.report import Fusion, FusionReport
from fxcompress.fusion.rewrite import drop, share
from fxcompress.fusion.schedule import candidates, choose, max_saving, scores
from fxcompress.graph.capture import capture, propagate_shapes
from fxcompress.graph.util import finalize
from fxcompress.method import deliver
from fxcompress.progress import bar
from fxcompress.report import count_params

__all__ = ["fuse"]

logger = logging.getLogger(__name__)

Mode = Literal["share", "drop"]
_MODES = ("share", "drop")
_SIMILARITIES = ("weight", "cka")


def fuse(
    model: nn.Module,
    budget: float | Mapping[str, float] | Budget,
    *,
    mode: Mode = "share",
    data: Iterable[Any] | None = None,
    example_inputs: Any = None,
    similarity: str | None = None,
    align: bool = True,
    steps: int = 1,
    retrain: Callable[[fx.GraphModule], None] | None = None,
    calibration_batches: int = 4,
    progress: bool | None = None,
) -> fx.GraphModule:
    """Fuse similar repeated blocks until at most ``budget`` of the unique parameters remain.

    Parameters
    ----------
    model : torch.nn.Module
        The model (not modified).
    budget : float, mapping or fxcompress.Budget
        Fraction in (0, 1] of the model's unique parameters to keep: a bare number,
        ``{"params": x}`` or ``Budget(params=x)`` (:func:`fxcompress.budget.as_budget`).
    mode : {"share", "drop"}
        ``"share"`` ties same-role layers (latency unchanged); ``"drop"`` replaces adjacent
        same-role blocks by one (depth and latency shrink).
    data : iterable, optional
        Calibration batches (``inputs`` or ``(inputs, targets)``) for activation similarity.
    example_inputs : Tensor or tuple, optional
        Inputs to trace with (default: the first batch of ``data``).
    similarity : {"weight", "cka"}, optional
        ``"weight"``: cosine of the aligned weights; ``"cka"``: linear CKA of the layers'
        outputs (share) or of the blocks' residual updates ``out - in`` (drop) on ``data``.
        Default: ``"cka"`` when ``data`` is given, else ``"weight"``.
    align : bool
        Permute each block's hidden units to match the first block of its role before
        averaging (function-preserving weight matching; see ``docs/fusion.md``).
    steps : int
        Fuse in this many equal increments of the budget, calling ``retrain`` after each.
    retrain : callable, optional
        ``retrain(graph_module) -> None`` trains the fused model in place (put it in train mode
        yourself); it is called after every step.
    calibration_batches : int
        Batches of ``data`` used for CKA.
    progress : bool, optional
        Show a progress bar over the steps (default: when stderr is a terminal).

    Returns
    -------
    torch.fx.GraphModule
        The fused model in eval mode; ``result.meta["fxcompress.fusion"]`` is a
        :class:`FusionReport` whose ``params_after`` equals
        ``sum(p.numel() for p in result.parameters())``.

    Raises
    ------
    InvalidArgument
        For a bad ``budget``, ``mode``, ``similarity``, ``steps`` or missing inputs.
    InfeasibleBudget
        If fusing every eligible block cannot reach the budget (``minimum`` is the smallest
        reachable fraction).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> class Res(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
    ...     def forward(self, x):
    ...         return x + self.fc2(torch.relu(self.fc1(x)))
    >>> model = nn.Sequential(*(Res() for _ in range(4)))
    >>> fused = fuse(model, 0.5, mode="share", example_inputs=torch.randn(2, 8))
    >>> report = fused.meta["fxcompress.fusion"]
    >>> report.params_after == sum(p.numel() for p in fused.parameters()) <= 0.5 * 4 * 280
    True
    >>> dropped = fuse(model, 0.5, mode="drop", example_inputs=torch.randn(2, 8))
    >>> dropped.meta["fxcompress.fusion"].blocks_after
    2
    """
    budget = _params_fraction(budget)
    if mode not in _MODES:
        raise InvalidArgument(f"mode must be one of {_MODES}, got mode={mode!r}")
    if similarity is None:
        similarity = "cka" if data is not None else "weight"
    if similarity not in _SIMILARITIES:
        raise InvalidArgument(
            f"similarity must be one of {_SIMILARITIES}, got similarity={similarity!r}"
        )
    if similarity == "cka" and data is None:
        raise InvalidArgument("similarity='cka' needs calibration data: pass data=...")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InvalidArgument(f"steps must be a positive int, got steps={steps!r}")
    if retrain is not None and not callable(retrain):
        raise InvalidArgument(f"retrain must be callable, got retrain={retrain!r}")

    inputs = inputs_for(example_inputs, data)
    gm = capture(model, inputs)
    before = count_params(gm)
    blocks_before = len(find_blocks(gm).blocks)
    floor = before - max_saving(gm, mode)
    if budget * before * (1 + 1e-9) < floor:
        raise InfeasibleBudget(
            f"budget {budget:g} of {before:,} unique parameters is out of reach in {mode!r} "
            f"mode: fusing every eligible block keeps {floor:,} ({floor / before:.3f})",
            minimum=floor / before,
        )
    fusions: list[Fusion] = []
    skipped: dict[str, str] = {}
    aligned = 0
    with bar(total=steps, desc=f"fusion ({mode})", enabled=progress) as pbar:
        for step in range(1, steps + 1):
            target = before * (1.0 - (1.0 - budget) * step / steps) * (1 + 1e-9)
            gm, done, moved, skip = _fuse_step(
                gm, target, mode, similarity, align, data, calibration_batches
            )
            fusions += done
            aligned += moved
            skipped.update(skip)
            propagate_shapes(gm, inputs)
            if retrain is not None:
                retrain(gm)
                gm.eval()
            pbar.update()
    dropped = sum(len(f.members) - 1 for f in fusions if f.mode == "drop")
    report = FusionReport(
        mode=mode,
        budget=budget,
        similarity=similarity,
        steps=steps,
        params_before=before,
        params_after=count_params(gm),
        blocks_before=blocks_before,
        blocks_after=blocks_before - dropped,
        fusions=tuple(fusions),
        aligned_units=aligned,
        skipped=tuple(sorted(skipped.items())),
    )
    return deliver(gm, meta.FUSION, report)


def _params_fraction(budget: Any) -> float:
    """The budget as a fraction of the unique parameters (:func:`~fxcompress.budget.as_budget`)."""
    b = as_budget(budget, bare="params", what="a fraction of the unique parameters to keep")
    if b.params is None:
        raise InvalidArgument(
            f"budget must be a fraction in (0, 1] of the unique parameters to keep (a number, "
            f"{{'params': x}} or Budget(params=x)); fusion cannot meet {b!r}"
        )
    return float(b.params)


def _fuse_step(
    gm: fx.GraphModule,
    target: float,
    mode: str,
    similarity: str,
    align: bool,
    data: Iterable[Any] | None,
    calibration_batches: int,
) -> tuple[fx.GraphModule, list[Fusion], int, dict[str, str]]:
    skipped: dict[str, str] = {}
    moved = 0
    if align:
        for blocks in find_blocks(gm).groups().values():
            for b in blocks[1:]:
                if b.private:
                    moved += align_block(gm, blocks[0], b)
    pairs = candidates(gm, mode, skipped)
    rated = scores(gm, pairs, mode, similarity, data, calibration_batches)
    chosen, parent, expected = choose(pairs, rated, count_params(gm), target)
    if not chosen:
        return gm, [], moved, skipped
    fusions = (share if mode == "share" else drop)(gm, chosen, parent)
    finalize(gm)
    if count_params(gm) != expected:
        raise RewriteError(
            f"fusion left {count_params(gm):,} unique parameters, expected {expected:,}"
        )
    logger.info("fusion step: %d fusions, %d unique parameters", len(fusions), expected)
    return gm, fusions, moved, skipped
