"""``decompose``: capture, tabulate errors and costs, allocate globally, rewrite, check, retrain.

The stages are those of the depth pipeline, on the low-rank pass::

    capture -> find sites -> error tables and prices (:mod:`.pricing`) -> allocate -> rewrite
            -> check -> finetune (optional) -> report

It follows the method contract (:mod:`fxcompress.method`): the budget goes through
``as_budget(budget, bare="params")``, the result is a new GraphModule in eval mode with its
:class:`~.report.LowRankReport` under ``meta["fxcompress.lowrank"]``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn

from fxcompress import meta
from fxcompress.budget import as_budget
from fxcompress.errors import InfeasibleBudget, InvalidArgument, RewriteError
from fxcompress.graph.capture import capture, normalize_inputs, propagate_shapes
from fxcompress.graph.recognise import layer_of
from fxcompress.graph.util import clone_tensors, compare_outputs
from fxcompress.latency import LatencyTable
from fxcompress.lowrank.allocation import Allocation, LayerOptions, allocate
from fxcompress.lowrank.pricing import ErrorCache, Pricer, macs, options, params, rank_grid
from fxcompress.lowrank.report import LayerDecision, LowRankReport
from fxcompress.lowrank.rewrite import Site, apply, factorised_reference, find_sites
from fxcompress.method import deliver
from fxcompress.progress import bar
from fxcompress.report import count_macs, count_params

__all__ = ["METHODS", "ErrorCache", "decompose", "rank_grid"]

logger = logging.getLogger(__name__)

METHODS = ("alds", "uniform", "energy")
METRICS = ("params", "macs", "latency")


def _budget_of(budget: Any) -> tuple[str, float | None, float | None]:
    """``(metric, fraction, latency_ms)`` of a budget, read by :func:`~fxcompress.as_budget`
    (a bare number is a fraction of the parameters; ``{"latency": x}`` a latency fraction)."""
    b = as_budget(budget, bare="params")
    if b.params is not None:
        return "params", float(b.params), None
    if b.macs is not None:
        return "macs", float(b.macs), None
    if b.latency_ms is not None:
        return "latency", None, float(b.latency_ms)
    return "latency", b.fraction_of(math.nan), None


def _check_args(method: str, max_groups: int, ranks: int) -> None:
    if method not in METHODS:
        raise InvalidArgument(f"method must be one of {METHODS}, got method={method!r}")
    for name, value, low in (("max_groups", max_groups, 1), ("ranks", ranks, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InvalidArgument(f"{name} must be an int >= {low}, got {name}={value!r}")


def _latency_table(latency: Any, device: str | None, model: nn.Module) -> LatencyTable:
    if isinstance(latency, LatencyTable):
        return latency
    if latency not in ("measure", "flops"):
        raise InvalidArgument(
            f"latency must be 'measure', 'flops' or a LatencyTable, got latency={latency!r}"
        )
    if device is None:
        device = next((str(p.device) for p in model.parameters()), "cpu")
    return LatencyTable(mode=latency, device=device)


def decompose(
    model: nn.Module,
    budget: Any,
    example_inputs: Any,
    *,
    method: str = "alds",
    latency: str | LatencyTable = "flops",
    device: str | None = None,
    max_groups: int = 8,
    ranks: int = 32,
    cache: ErrorCache | None = None,
    finetune: Callable[[fx.GraphModule], None] | None = None,
    check: bool = True,
    progress: bool | None = None,
    leaf_modules: Sequence[Any] = (),
    exclude: Sequence[str] = (),
) -> fx.GraphModule:
    """Replace conv and linear layers by low-rank grouped pairs, ranks allocated globally.

    Every candidate layer (conv with ``groups == 1`` or linear, not shared) either stays dense
    or becomes a grouped conv with ``k`` groups of consecutive input channels and ``k * j``
    outputs (original kernel, stride, padding, dilation, no bias) followed by a 1x1 conv to the
    original outputs (original bias). With ``method="alds"`` the ``(k, j)`` of every layer
    minimise the largest relative spectral error over the layers subject to the budget, exactly
    (bisection over the tabulated errors; each layer takes its cheapest option meeting the
    level). A layer whose decomposition does not pay stays dense.

    Parameters
    ----------
    model : torch.nn.Module
        The trained model; never modified.
    budget : float, mapping or fxcompress.Budget
        A float in (0, 1] is the fraction of the model's parameters to keep. A mapping with one
        of ``"params"``, ``"macs"``, ``"latency"`` (fractions of the whole model) or
        ``"latency_ms"`` states another target; a ``fxcompress.Budget`` is a latency target
        (or a parameter/MAC target if it has ``params``/``macs`` set).
    example_inputs : Tensor or tuple of Tensor
        Inputs to trace with (they fix the shapes used for MACs and latency).
    method : {"alds", "uniform", "energy"}
        ``"alds"``: min-max spectral error over ``(k, j)``. Baselines (``k = 1``):
        ``"uniform"`` keeps the same fraction of the rank in every layer, ``"energy"`` discards
        the same share of squared singular values in every layer; both as high as the budget
        allows.
    latency : {"flops", "measure"} or LatencyTable
        Prices layers for a latency budget. ``"measure"`` times every candidate pair and the
        whole model on ``device``; with ``"flops"`` the rest of the network is not modelled
        and a latency fraction applies to the candidate layers' analytic latency.
    device : str, optional
        Device for ``"measure"`` (default: the model's).
    max_groups : int
        Largest ``k`` tried (divisors of the input channels up to it).
    ranks : int
        Candidate ranks per ``(layer, k)`` (all ranks when fewer pay, else a grid of about
        this many).
    cache : ErrorCache, optional
        Reuse error tables across calls (several budgets or methods on one model).
    finetune : callable, optional
        ``finetune(decomposed)`` trains the result in place; it is put back in eval mode after.
    check : bool
        Compare the result with the factorised reference (the original graph holding the
        reconstructed low-rank weights) and raise :class:`~fxcompress.errors.RewriteError` if
        they differ; also checks the capture.
    progress : bool, optional
        Progress bar over the layers (default: only on a terminal).
    leaf_modules : sequence of str or type
        Passed to :func:`fxcompress.capture`.
    exclude : sequence of str
        Layers (qualified module names, or a prefix ending in ``.``) to leave dense, e.g. a
        classifier that should keep full rank; they are reported as skipped.

    Returns
    -------
    torch.fx.GraphModule
        In eval mode; ``gm.meta["fxcompress.lowrank"]`` is a :class:`LowRankReport`.

    Raises
    ------
    InvalidArgument
        Bad budget, method, latency or sizes.
    InfeasibleBudget
        Even the smallest decompositions exceed the budget (``minimum`` is the smallest
        reachable fraction).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Flatten(),
    ...                       nn.Linear(32 * 8 * 8, 10)).eval()
    >>> x = torch.randn(2, 16, 8, 8)
    >>> small = decompose(model, 0.5, x)
    >>> report = small.meta["fxcompress.lowrank"]
    >>> report.params_after <= 0.5 * report.params_before
    True
    >>> [(d.name, d.k > 0) for d in report.layers]
    [('0', True), ('3', True)]
    >>> small(x).shape
    torch.Size([2, 10])
    """
    _check_args(method, max_groups, ranks)
    if not isinstance(model, nn.Module):
        raise InvalidArgument(f"model must be a torch.nn.Module, got {type(model).__name__}")
    metric, fraction, latency_ms = _budget_of(budget)
    inputs = normalize_inputs(example_inputs)
    table = _latency_table(latency, device, model) if metric == "latency" else None
    cache = cache if cache is not None else ErrorCache()
    gm = capture(model, inputs, leaf_modules=leaf_modules, check=check)
    sites, skipped = _candidates(gm, exclude)
    nodes = {n.name: n for n in gm.graph.nodes}
    weights = {s.node: layer_of(gm, nodes[s.node]).weight for s in sites}  # type: ignore[union-attr]
    price = Pricer(metric, table)
    with bar(total=len(sites), desc="low-rank tables", enabled=progress) as pbar:
        menus = []
        for site in sites:
            kw = {"cache": cache, "price": price, "max_groups": max_groups, "ranks": ranks}
            menus.append(options(site, weights[site.node], method, **kw))
            pbar.update()

    params_before = count_params(gm)
    macs_before = count_macs(gm) + sum(macs(s, 0, 0) for s in sites if s.functional)
    dense_total = sum(m.dense for m in menus)
    if metric == "params":
        total = float(params_before)
    elif metric == "macs":
        total = float(macs_before)
    elif table is not None and table.mode == "measure":
        total = max(_measure(table, gm, inputs), dense_total)
    else:
        total = dense_total
    fraction = latency_ms / total if latency_ms is not None else fraction
    assert fraction is not None
    alloc = _allocate(menus, fraction, total, dense_total, metric, method)
    decisions = {s.node: (o.k, o.j) for s, o in zip(sites, alloc.choices) if o is not None}
    logger.info("low-rank %s: %d of %d layers decomposed", method, len(decisions), len(sites))

    result = apply(gm, decisions)
    propagate_shapes(result, inputs)
    if check:
        _check_against_reference(gm, result, decisions, inputs)
    layers = _decisions(sites, menus, alloc, weights, cache, price if table else None)
    if finetune is not None:
        finetune(result)
        result.eval()
    report = LowRankReport(
        method=method,
        metric=metric,
        fraction=float(fraction),
        before=total,
        after=alloc.cost,
        level=_level(alloc, method),
        max_error=max((d.error for d in layers), default=0.0),
        params_before=params_before,
        params_after=params_before - sum(d.params_before - d.params_after for d in layers),
        macs_before=macs_before,
        macs_after=macs_before - sum(d.macs_before - d.macs_after for d in layers),
        layers=tuple(layers),
        skipped=skipped,
        finetuned=finetune is not None,
    )
    return deliver(result, meta.LOWRANK, report)


def _candidates(
    gm: fx.GraphModule, exclude: Sequence[str]
) -> tuple[tuple[Site, ...], tuple[tuple[str, str], ...]]:
    """The sites to decompose and the ``(name, reason)`` of the layers left as they are."""
    sites, skipped = find_sites(gm)
    excluded = tuple(s for s in sites if _excluded(s.name, exclude))
    sites = tuple(s for s in sites if s not in excluded)
    return sites, skipped + tuple((s.name, "excluded by the caller") for s in excluded)


def _allocate(
    menus: list[LayerOptions],
    fraction: float,
    total: float,
    dense_total: float,
    metric: str,
    method: str,
) -> Allocation:
    """:func:`.allocate` at ``fraction * total``; an unreachable budget names the minimum."""
    try:
        return allocate(menus, fraction * total, fixed=total - dense_total)
    except InfeasibleBudget as exc:
        least = exc.minimum / total
        raise InfeasibleBudget(
            f"a {metric} budget of {fraction:g} is below the smallest reachable with "
            f"method={method!r}, {least:.4f} of the original (other layers and skipped parts "
            f"count too; raise max_groups or ranks to go lower)",
            minimum=least,
        ) from None


def _level(alloc: Allocation, method: str) -> float:
    if not math.isfinite(alloc.level):
        return 0.0
    return -alloc.level if method != "uniform" else alloc.level


def _decisions(
    sites: Sequence[Site],
    menus: Sequence[LayerOptions],
    alloc: Allocation,
    weights: Mapping[str, torch.Tensor],
    cache: ErrorCache,
    latency: Pricer | None,
) -> list[LayerDecision]:
    """One :class:`LayerDecision` per site (``latency``: the pricer of a latency budget)."""
    layers = []
    for site, option, menu in zip(sites, alloc.choices, menus):
        k, j = (option.k, option.j) if option is not None else (0, 0)
        error = cache.errors(weights[site.node], k, [j])[0] if option is not None else 0.0
        note = "" if option is not None else _dense_note(menu)
        ms = (latency(site, 0, 0), latency(site, k, j)) if latency else (None, None)
        layers.append(
            LayerDecision(
                name=site.name, node=site.node, kind=site.kind, weight_shape=site.weight_shape,
                k=k, j=j, error=error, params_before=params(site, 0, 0),
                params_after=params(site, k, j), macs_before=macs(site, 0, 0),
                macs_after=macs(site, k, j), ms_before=ms[0], ms_after=ms[1], note=note,
            )
        )  # fmt: skip
    return layers


def _excluded(name: str, exclude: Sequence[str]) -> bool:
    if isinstance(exclude, str):
        exclude = (exclude,)
    return any(name == e or (e.endswith(".") and name.startswith(e)) for e in exclude)


def _dense_note(menu: LayerOptions) -> str:
    return "no decomposition pays" if not menu.options else "dense is cheapest at this level"


def _measure(table: LatencyTable, gm: fx.GraphModule, inputs: tuple[Any, ...]) -> float:
    device = table.device
    moved = gm if _on(gm, device) else _copy_to(gm, device)
    args = tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in inputs)
    return table.measure_module(moved, args)


def _on(module: nn.Module, device: torch.device) -> bool:
    return all(p.device.type == device.type for p in module.parameters())


def _copy_to(gm: fx.GraphModule, device: torch.device) -> fx.GraphModule:
    from fxcompress.graph.util import clone

    return clone(gm).to(device)


def _check_against_reference(
    gm: fx.GraphModule,
    result: fx.GraphModule,
    decisions: Mapping[str, tuple[int, int]],
    inputs: tuple[Any, ...],
) -> None:
    reference = factorised_reference(gm, decisions)
    with torch.no_grad():
        _, problem = compare_outputs(
            result(*clone_tensors(inputs)), reference(*clone_tensors(inputs))
        )
    if problem is not None:
        raise RewriteError(
            f"the decomposed model differs from its factorised reference ({problem}); "
            "this is a bug in fxcompress, please report it"
        )
