"""``decompose``: capture, tabulate errors and costs, allocate globally, rewrite, check, retrain.

The stages are those of the depth pipeline, on the low-rank pass::

    capture -> find sites -> error tables (cached) -> costs -> allocate -> rewrite -> check
            -> finetune (optional) -> report
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn

from fxcompress import meta
from fxcompress.errors import InfeasibleBudget, InvalidArgument, RewriteError
from fxcompress.graph.capture import capture, normalize_inputs, propagate_shapes
from fxcompress.graph.ops import layer_of
from fxcompress.graph.util import clone_tensors, compare_outputs
from fxcompress.latency.table import LatencyTable, OpSpec
from fxcompress.lowrank.allocation import LayerOptions, Option, allocate
from fxcompress.lowrank.factorize import max_rank, paying_rank, residual_energy, spectral_errors
from fxcompress.lowrank.report import LayerDecision, LowRankReport
from fxcompress.lowrank.rewrite import Site, apply, factorised_reference, find_sites
from fxcompress.progress import bar
from fxcompress.report import count_macs, count_params

__all__ = ["METHODS", "ErrorCache", "decompose", "rank_grid"]

logger = logging.getLogger(__name__)

METHODS = ("alds", "uniform", "energy")
METRICS = ("params", "macs", "latency")


class ErrorCache:
    """Exact spectral errors and SVD energies per weight, reusable across :func:`decompose` calls.

    Entries are keyed by the weight's bytes, shape and dtype, so a cache can be shared by calls
    on the same model at several budgets and methods (each table is computed once).

    Examples
    --------
    >>> cache = ErrorCache()
    >>> w = torch.diag(torch.tensor([2.0, 1.0]))
    >>> cache.errors(w, 1, [1]), len(cache)
    ((0.5,), 1)
    """

    def __init__(self) -> None:
        self._errors: dict[tuple[str, int], dict[int, float]] = {}
        self._energy: dict[str, tuple[float, ...]] = {}

    def __len__(self) -> int:
        return len(self._errors) + len(self._energy)

    @staticmethod
    def _key(weight: torch.Tensor) -> str:
        raw = weight.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes()
        return f"{tuple(weight.shape)}:{weight.dtype}:{hashlib.sha1(raw).hexdigest()}"

    def errors(self, weight: torch.Tensor, k: int, ranks: Sequence[int]) -> tuple[float, ...]:
        """:func:`~.factorize.spectral_errors`, computing only the ranks not seen before."""
        table = self._errors.setdefault((self._key(weight), k), {})
        todo = sorted({int(j) for j in ranks} - table.keys())
        if todo:
            table.update(zip(todo, spectral_errors(weight, k, todo)))
        return tuple(table[int(j)] for j in ranks)

    def energy(self, weight: torch.Tensor) -> tuple[float, ...]:
        """:func:`~.factorize.residual_energy`, cached."""
        key = self._key(weight)
        if key not in self._energy:
            self._energy[key] = residual_energy(weight)
        return self._energy[key]


def rank_grid(top: int, n: int) -> tuple[int, ...]:
    """Candidate ranks ``1 .. top``: all of them if ``top <= n``, else about ``n`` of them.

    The subset mixes an even and a geometric spacing (fine steps at low rank, where the error
    changes fastest) and always contains 1 and ``top``.

    Examples
    --------
    >>> rank_grid(5, 8)
    (1, 2, 3, 4, 5)
    >>> g = rank_grid(500, 16)
    >>> g[0], g[-1], len(g) <= 16
    (1, 500, True)
    """
    if top <= n:
        return tuple(range(1, top + 1))
    half = n // 2
    lin = [1 + round(i * (top - 1) / max(n - half - 1, 1)) for i in range(n - half)]
    geo = [round(top ** (i / (half - 1))) for i in range(half)] if half > 1 else []
    return tuple(sorted({1, top, *lin, *geo}))


def _divisors(n: int, cap: int) -> list[int]:
    return [d for d in range(1, min(n, cap) + 1) if n % d == 0]


def _resolve_budget(budget: Any) -> tuple[str, float | None, float | None]:
    """``(metric, fraction, latency_ms)`` from a float, a mapping or a ``fxcompress.Budget``."""
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        items: dict[str, Any] = {"params": budget}
    elif isinstance(budget, Mapping):
        items = dict(budget)
    elif all(hasattr(budget, a) for a in ("fraction", "latency_ms", "speedup")):
        items = {
            name: getattr(budget, name, None)
            for name in ("params", "macs", "fraction", "latency_ms", "speedup")
        }
        items = {k: v for k, v in items.items() if v is not None}
        if "fraction" in items:
            items["latency"] = items.pop("fraction")
        if "speedup" in items:
            items["latency"] = 1.0 / float(items.pop("speedup"))
    else:
        raise InvalidArgument(
            f"budget must be a fraction of the parameters in (0, 1], a mapping like "
            f"{{'macs': 0.5}}, or a fxcompress.Budget, got budget={budget!r:.80} "
            f"(type={type(budget).__name__})"
        )
    allowed = (*METRICS, "latency_ms")
    if len(items) != 1 or next(iter(items)) not in allowed:
        raise InvalidArgument(f"budget must give exactly one of {allowed}, got {items or 'none'}")
    ((name, value),) = items.items()
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (math.isfinite(value) and value > 0)
        or (name != "latency_ms" and value > 1)
    ):
        what = "a positive number of milliseconds" if name == "latency_ms" else "in (0, 1]"
        raise InvalidArgument(f"budget {name} must be {what}, got {name}={value!r}")
    if name == "latency_ms":
        return "latency", None, float(value)
    return name, float(value), None


# --------------------------------------------------------------------------- costs


def _dense_spec(site: Site) -> OpSpec:
    f = site.weight_shape[0]
    if site.kind == "linear":
        return OpSpec("linear", site.input_shape, site.dtype, out_channels=f, bias=site.bias)
    return OpSpec(
        "conv", site.input_shape, site.dtype, out_channels=f, kernel_size=site.weight_shape[2:],
        stride=site.stride, padding=site.padding, dilation=site.dilation, bias=site.bias,
    )  # fmt: skip


def _pair_specs(site: Site, k: int, j: int) -> tuple[OpSpec, OpSpec]:
    f, c = site.weight_shape[:2]
    if site.kind == "linear":
        lead = site.input_shape[:-1]
        if k == 1:
            enc = OpSpec("linear", site.input_shape, site.dtype, out_channels=j, bias=False)
        else:  # priced as the grouped 1x1 conv it equals
            enc = OpSpec(
                "conv", (math.prod(lead), c, 1), site.dtype, out_channels=k * j, kernel_size=1,
                groups=k, bias=False,
            )  # fmt: skip
        dec = OpSpec("linear", (*lead, k * j), site.dtype, out_channels=f, bias=site.bias)
        return enc, dec
    enc = OpSpec(
        "conv", site.input_shape, site.dtype, out_channels=k * j,
        kernel_size=site.weight_shape[2:], stride=site.stride, padding=site.padding,
        dilation=site.dilation, groups=k, bias=False,
    )  # fmt: skip
    mid = (site.output_shape[0], k * j, *site.output_shape[2:])
    dec = OpSpec("conv", mid, site.dtype, out_channels=f, kernel_size=1, bias=site.bias)
    return enc, dec


def _weights(site: Site, k: int, j: int) -> int:
    """Weights of the pair (``k == 0``: of the dense layer), without the bias."""
    f, c, *kernel = site.weight_shape
    m = c * math.prod(kernel)
    return f * m if k == 0 else j * (m + k * f)


def _params(site: Site, k: int, j: int) -> int:
    return _weights(site, k, j) + (site.weight_shape[0] if site.bias else 0)


def _macs(site: Site, k: int, j: int) -> int:
    return site.positions * _weights(site, k, j)


class _Pricer:
    def __init__(self, metric: str, table: LatencyTable | None) -> None:
        self.metric = metric
        self.table = table

    def __call__(self, site: Site, k: int, j: int) -> float:
        if self.metric == "params":
            return float(_params(site, k, j))
        if self.metric == "macs":
            return float(_macs(site, k, j))
        assert self.table is not None
        if k == 0:
            return self.table(_dense_spec(site))
        return sum(self.table.many(_pair_specs(site, k, j)))


# --------------------------------------------------------------------------- options


def _options(
    site: Site,
    weight: torch.Tensor,
    method: str,
    *,
    cache: ErrorCache,
    price: _Pricer,
    max_groups: int,
    ranks: int,
) -> LayerOptions:
    c = site.weight_shape[1]
    ks = [1] if method != "alds" else _divisors(c, max_groups)
    options: list[Option] = []
    for k in ks:
        top = paying_rank(site.weight_shape, k)
        if top < 1:
            continue
        grid = rank_grid(top, ranks)
        if method == "alds":
            keys = [-e for e in cache.errors(weight, k, grid)]
        elif method == "uniform":
            keys = [j / max_rank(site.weight_shape, k) for j in grid]
        else:
            energy = cache.energy(weight)
            keys = [-energy[j] for j in grid]
        options += [Option(k, j, key, price(site, k, j)) for j, key in zip(grid, keys)]
    return LayerOptions(site.node, price(site, 0, 0), tuple(options))


# --------------------------------------------------------------------------- entry point


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
    metric, fraction, latency_ms = _resolve_budget(budget)
    inputs = normalize_inputs(example_inputs)
    table = _latency_table(latency, device, model) if metric == "latency" else None
    cache = cache if cache is not None else ErrorCache()
    gm = capture(model, inputs, leaf_modules=leaf_modules, check=check)
    sites, skipped = find_sites(gm)
    excluded = tuple(s for s in sites if _excluded(s.name, exclude))
    sites = tuple(s for s in sites if s not in excluded)
    skipped = skipped + tuple((s.name, "excluded by the caller") for s in excluded)
    weights = {n.name: layer_of(gm, n) for n in gm.graph.nodes if n.name in {s.node for s in sites}}
    price = _Pricer(metric, table)

    menus: list[LayerOptions] = []
    with bar(total=len(sites), desc="low-rank tables", enabled=progress) as pbar:
        for site in sites:
            w = weights[site.node].weight  # type: ignore[union-attr]
            kw = {"cache": cache, "price": price, "max_groups": max_groups, "ranks": ranks}
            menus.append(_options(site, w, method, **kw))
            pbar.update()

    functional_macs = sum(_macs(s, 0, 0) for s in sites if s.functional)
    params_before = count_params(gm)
    macs_before = count_macs(gm) + functional_macs
    dense_total = sum(m.dense for m in menus)
    if metric == "params":
        total = float(params_before)
    elif metric == "macs":
        total = float(macs_before)
    elif table is not None and table.mode == "measure":
        total = max(_measure(table, gm, inputs), dense_total)
    else:
        total = dense_total
    if latency_ms is not None:
        fraction = latency_ms / total
    assert fraction is not None
    try:
        alloc = allocate(menus, fraction * total, fixed=total - dense_total)
    except InfeasibleBudget as exc:
        least = exc.minimum / total
        raise InfeasibleBudget(
            f"a {metric} budget of {fraction:g} is below the smallest reachable with "
            f"method={method!r}, {least:.4f} of the original (other layers and skipped parts "
            f"count too; raise max_groups or ranks to go lower)",
            minimum=least,
        ) from None
    decisions = {s.node: (o.k, o.j) for s, o in zip(sites, alloc.choices) if o is not None}
    logger.info("low-rank %s: %d of %d layers decomposed", method, len(decisions), len(sites))

    result = apply(gm, decisions)
    propagate_shapes(result, inputs)
    if check:
        _check_against_reference(gm, result, decisions, inputs)

    layers = []
    for site, option in zip(sites, alloc.choices):
        w = weights[site.node].weight  # type: ignore[union-attr]
        k, j = (option.k, option.j) if option is not None else (0, 0)
        error = cache.errors(w, k, [j])[0] if option is not None else 0.0
        note = "" if option is not None else _dense_note(menus[sites.index(site)])
        ms = (price(site, 0, 0), price(site, k, j)) if metric == "latency" else (None, None)
        layers.append(
            LayerDecision(
                name=site.name, node=site.node, kind=site.kind, weight_shape=site.weight_shape,
                k=k, j=j, error=error, params_before=_params(site, 0, 0),
                params_after=_params(site, k, j), macs_before=_macs(site, 0, 0),
                macs_after=_macs(site, k, j), ms_before=ms[0], ms_after=ms[1], note=note,
            )
        )  # fmt: skip
    saved_params = sum(d.params_before - d.params_after for d in layers)
    saved_macs = sum(d.macs_before - d.macs_after for d in layers)

    if finetune is not None:
        finetune(result)
        result.eval()
    report = LowRankReport(
        method=method,
        metric=metric,
        fraction=float(fraction),
        before=total,
        after=alloc.cost,
        level=(-alloc.level if method != "uniform" else alloc.level)
        if math.isfinite(alloc.level)
        else 0.0,
        max_error=max((d.error for d in layers), default=0.0),
        params_before=params_before,
        params_after=params_before - saved_params,
        macs_before=macs_before,
        macs_after=macs_before - saved_macs,
        layers=tuple(layers),
        skipped=skipped,
        finetuned=finetune is not None,
    )
    result.meta[meta.LOWRANK] = report
    return result


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
