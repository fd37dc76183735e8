"""LayerCollapse: learn to linearise activations between layers, then merge the layers exactly.

Three steps (after Zibakhsh Shabgahi et al., "LayerCollapse: Adaptive compression of neural
networks", generalised from PReLU to any activation of :data:`GATED`):

1. :func:`prepare` captures the model and replaces every chosen activation between two layers
   by a :class:`Blend` ``act(z) + a (z - act(z))`` with a learnable slope ``a`` starting at 0
   (exactly the original function; a LeakyReLU starts at its negative slope). The default
   sites are the activations between two ``nn.Linear`` layers, or between a convolution and a
   1x1 convolution, whose collapse would make the model smaller.
2. Train with ``loss + regularizer(prepared)``: the penalty pulls the slopes towards 1.
3. :func:`apply` makes every site with ``|1 - a| <= tol`` the identity and composes each run of
   now-linear layers into one layer (float64 maths, exact), choosing the runs that give the
   fewest parameters: a run is merged only if that is smaller *and* needs no more
   multiply-accumulates; otherwise its layers stay factored (without the activation). Each
   linearised site reports a bound on the error it introduces.

A site is ``first -> [BatchNorm] -> act -> [Dropout | BatchNorm]* -> second`` where ``first`` is
a linear layer or a convolution, ``second`` is a linear layer or a 1x1 unpadded convolution of
the same kind, every intermediate tensor has a single user and neither layer is called
elsewhere. Eval-mode BatchNorms are folded into the neighbouring layer when merging.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from fxcompress import meta
from fxcompress.collapse.maths import (
    GATED,
    Blend,
    best_partition,
    compose_run,
    deviation_constant,
    is_pointwise,
    layer_cost,
    merged_cost,
    tail_norms,
)
from fxcompress.errors import InvalidArgument, RewriteError
from fxcompress.graph.canonicalize import canonicalize
from fxcompress.graph.capture import capture, normalize_inputs
from fxcompress.graph.ops import (
    ACTIVATIONS,
    activation_of,
    batchnorm_of,
    bn_statistics,
    layer_of,
    single_user,
)
from fxcompress.graph.util import (
    clone,
    clone_tensors,
    compare_outputs,
    default_rtol,
    finalize,
    install,
    run_anchor,
    shape_of,
)
from fxcompress.maths import LinearParams, fold_bn, fold_bn_before

__all__ = [
    "GATED",
    "Blend",
    "CollapseReport",
    "Site",
    "SiteDecision",
    "apply",
    "prepare",
    "regularizer",
    "slope_parameters",
    "slopes",
]

logger = logging.getLogger(__name__)

_EXAMPLES = meta.COLLAPSE_EXAMPLES
_SITES = meta.COLLAPSE_SITES
_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


# --------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Site:
    """A collapsible activation: ``first -> activation -> second`` (names in the prepared graph).

    Attributes
    ----------
    name : str
        Qualified name of its :class:`Blend` module in the prepared model: the first layer's
        name + ``"_act"`` (e.g. ``"blocks.0.mlp.fc1_act"``).
    activation : str
        Canonical name of the original activation.
    first, second : str
        Nodes of the layers before and after it.
    kind : str
        ``"linear"`` or ``"conv"``.
    hidden : int
        Width of the hidden tensor (features or channels).
    saving : int
        Parameters saved by collapsing this site alone (negative: it would grow).
    """

    name: str
    activation: str
    first: str
    second: str
    kind: str
    hidden: int
    saving: int


@dataclass(frozen=True)
class SiteDecision:
    """What :func:`apply` did with one site.

    Attributes
    ----------
    name : str
        The site (its :class:`Blend` module's name).
    slope : float
        Its learned slope ``a``.
    action : str
        ``"merged"`` (identity, and its layers composed into one), ``"identity"`` (identity, layers
        kept factored because merging would not be smaller), or ``"kept"`` (``|1 - a| > tol``).
    layers : tuple of str
        For a merged site, the layer nodes composed into one (the whole run).
    bound : float
        ``|1 - a| * c * ||T||_2``: the output of the collapsed run changes by at most
        ``bound * ||z||`` per position (token/pixel), ``z`` being the site's input, summed
        over the linearised sites of the run. 0 for kept sites.
    """

    name: str
    slope: float
    action: str
    layers: tuple[str, ...] = ()
    bound: float = 0.0


@dataclass(frozen=True)
class CollapseReport:
    """Result of :func:`apply`: per-site decisions and sizes (stored in ``meta``)."""

    sites: tuple[SiteDecision, ...]
    params_before: int
    params_after: int
    tol: float
    output_error: float | None = None
    notes: tuple[str, ...] = field(default=())

    def to_markdown(self) -> str:
        """A markdown table of the decisions."""
        lines = [
            f"LayerCollapse (tol={self.tol:g}): parameters {self.params_before:,} -> "
            f"{self.params_after:,}",
            "",
            "| site | slope | action | bound | layers |",
            "|---|---:|---|---:|---|",
        ]
        for s in self.sites:
            lines.append(
                f"| {s.name} | {s.slope:.4f} | {s.action} | {s.bound:.3g} | "
                f"{', '.join(s.layers)} |"
            )
        if self.output_error is not None:
            lines += ["", f"max relative output change on the data: {self.output_error:.3g}"]
        return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ site matching


@dataclass(frozen=True)
class _Match:
    act: fx.Node
    first: fx.Node
    second: fx.Node
    bn_before: fx.Node | None
    bn_after: fx.Node | None


def _is_dropout(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), _DROPOUT_MODULES)
    return node.op == "call_function" and node.target in (F.dropout, F.dropout1d, F.dropout2d)


def _is_bn(gm: fx.GraphModule, node: fx.Node, layer: Any) -> bool:
    """An eval BatchNorm over ``layer``'s feature axis.

    BatchNorm normalises axis 1: a conv's channels only on a batched map ``(N, C, *spatial)``
    (on an unbatched ``(C, *spatial)`` map axis 1 is spatial), a linear layer's features only
    on 2-D tensors.
    """
    if batchnorm_of(gm, node) is None:
        return False
    shape = shape_of(node)
    rank = 2 if isinstance(layer, LinearParams) else layer.ndim + 2
    return shape is not None and len(shape) == rank


def _kind(layer: Any) -> str:
    return "linear" if isinstance(layer, LinearParams) else "conv"


def _match(gm: fx.GraphModule, act: fx.Node) -> _Match | str:
    """The site around activation ``act``, or the reason it is not one."""
    if not act.args or not isinstance(act.args[0], fx.Node):
        return "activation has no tensor input"
    pre = act.args[0]
    first = pre
    bn_before = None
    if pre.op == "call_module" and batchnorm_of(gm, pre) is not None:
        bn_before, first = pre, pre.args[0]
    layer1 = layer_of(gm, first) if isinstance(first, fx.Node) else None
    if layer1 is None:
        return "its input is not a linear or convolution layer"
    kind = _kind(layer1)
    if bn_before is not None and not _is_bn(gm, bn_before, layer1):
        return "the BatchNorm before it does not normalise the layer's feature axis"
    for node in (first, bn_before):
        if node is not None and len(node.users) != 1:
            return f"{node.name} is also used elsewhere"
    cur, bn_after = act, None
    while True:
        user = single_user(cur)
        if user is None:
            return f"{cur.name} has {len(cur.users)} users (a residual tap or a second reader)"
        if _is_dropout(gm, user):
            cur = user
        elif bn_after is None and user.op == "call_module" and _is_bn(gm, user, layer1):
            cur = bn_after = user
        else:
            break
    second = user
    layer2 = layer_of(gm, second)
    if layer2 is None or second.args[0] is not cur:
        return f"it is not followed by a layer ({second.name} is not one)"
    if _kind(layer2) != kind:
        return "the layers around it are of different kinds (linear vs convolution)"
    if not is_pointwise(layer2):
        return "the layer after it is not pointwise (a 1x1 unpadded convolution or a linear)"
    shared = set(gm.meta.get(meta.SHARED, ()))
    for node in (first, second):
        if node.op == "call_module" and str(node.target) in shared:
            return f"{node.target} is called at several places"
    return _Match(act, first, second, bn_before, bn_after)


def _positions(node: fx.Node, out_features: int) -> int:
    shape = shape_of(node)
    return max(1, math.prod(shape) // out_features) if shape else 1


def _saving(gm: fx.GraphModule, m: _Match) -> int:
    a, b = layer_of(gm, m.first), layer_of(gm, m.second)
    assert a is not None
    assert b is not None
    pos = _positions(m.second, b.weight.shape[0])
    apart = layer_cost(a, pos) + layer_cost(b, pos)
    return apart.params - merged_cost([a, b], pos).params


# ------------------------------------------------------------------------------------ prepare


def prepare(
    model: nn.Module,
    example_inputs: Any,
    *,
    sites: Sequence[str] | str | None = None,
    activations: Iterable[str] = GATED,
    leaf_modules: Sequence[Any] = (),
    check: bool = True,
) -> fx.GraphModule:
    """A trainable copy of ``model`` whose chosen activations are learnable blends (slope 0).

    Parameters
    ----------
    model : nn.Module
        Not modified.
    example_inputs : Tensor or tuple of Tensor
        Used to trace the model (see :func:`fxcompress.capture`).
    sites : sequence of str, "all" or None
        ``None`` (default): every site whose collapse alone would save parameters. ``"all"``:
        every site found. A sequence: the sites named, each by the module (or node) of the layer
        before it (e.g. ``"blocks.0.mlp.fc1"``), by that name + ``"_act"`` (the name of its
        :class:`Blend`), or by its activation node.
    activations : iterable of str
        Canonical activation names that may be blended (default :data:`GATED`).
    leaf_modules, check
        Passed to :func:`fxcompress.capture`.

    Returns
    -------
    torch.fx.GraphModule
        Computes exactly what ``model`` computes; same ``training`` flag as ``model``.
        ``meta["fxcompress.collapse.sites"]`` lists the :class:`Site` s.

    Raises
    ------
    InvalidArgument
        If ``sites`` names something that is not a site, or ``activations`` an unknown name.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> mlp = nn.Sequential(nn.Linear(8, 64), nn.GELU(), nn.Linear(64, 8))
    >>> prepared = prepare(mlp, torch.randn(2, 8))
    >>> [s.name for s in prepared.meta["fxcompress.collapse.sites"]], slopes(prepared)
    (['0_act'], {'0_act': 0.0})
    """
    allowed = set(activations)
    unknown = sorted(allowed - set(ACTIVATIONS))
    if unknown:
        raise InvalidArgument(
            f"activations contains unknown names {unknown}; known: {sorted(ACTIVATIONS)}"
        )
    inputs = normalize_inputs(example_inputs)
    gm = canonicalize(
        capture(model, inputs, leaf_modules=leaf_modules, check=check), drop_dropout=False
    )
    candidates: list[tuple[_Match, str, dict[str, Any]]] = []
    for node in gm.graph.nodes:
        spec = activation_of(gm, node)
        if spec is None:
            continue
        if spec.name not in allowed:
            logger.debug("site %s skipped: %s is not a blendable activation", node.name, spec.name)
            continue
        m = _match(gm, node)
        if isinstance(m, str):
            logger.debug("activation %s is not a collapse site: %s", node.name, m)
            continue
        candidates.append((m, spec.name, dict(spec.kwargs)))
    chosen = _choose(gm, candidates, sites)
    found: list[Site] = []
    for m, name, kwargs in chosen:
        slope = 0.0
        if name == "leaky_relu":  # leaky_relu(z, s) == relu(z) + s * (z - relu(z))
            name, slope = "relu", float(kwargs.pop("negative_slope", 0.01))
        dtype = _dtype(gm, m.first)
        blend = Blend(name, kwargs, slope, dtype=dtype)
        target = install(gm, _first_name(m) + "_act", blend)
        with gm.graph.inserting_before(m.act):
            new = gm.graph.call_module(target, (m.act.args[0],))
        new.meta = dict(m.act.meta)
        m.act.replace_all_uses_with(new)
        gm.graph.erase_node(m.act)
        layer = layer_of(gm, m.first)
        assert layer is not None
        found.append(
            Site(target, name, m.first.name, m.second.name, _kind(layer),
                 int(layer.weight.shape[0]), _saving(gm, m))
        )
    gm = finalize(gm)
    top = max([s.saving for s in found] + [1])
    for s in found:
        gm.get_submodule(s.name).penalty_weight = max(s.saving, 0) / top
    gm.meta[_SITES] = tuple(found)
    gm.meta[_EXAMPLES] = clone_tensors(inputs)
    logger.info("LayerCollapse: %d sites prepared: %s", len(found), [s.name for s in found])
    return gm.train(model.training)


def _first_name(m: _Match) -> str:
    return str(m.first.target) if m.first.op == "call_module" else m.first.name


def _dtype(gm: fx.GraphModule, node: fx.Node) -> torch.dtype:
    layer = layer_of(gm, node)
    return layer.weight.dtype if layer is not None else torch.get_default_dtype()


def _choose(
    gm: fx.GraphModule,
    candidates: list[tuple[_Match, str, dict[str, Any]]],
    sites: Sequence[str] | str | None,
) -> list[tuple[_Match, str, dict[str, Any]]]:
    if sites is None:
        chosen = [c for c in candidates if _saving(gm, c[0]) > 0]
        for m, _, _ in candidates:
            if _saving(gm, m) <= 0:
                logger.info("site %s skipped: collapsing it would not save parameters", m.act.name)
        return chosen
    if sites == "all":
        return candidates
    if isinstance(sites, str):
        raise InvalidArgument(f"sites must be None, 'all' or a sequence of names, got {sites!r}")
    names: dict[str, tuple[_Match, str, dict[str, Any]]] = {}
    for c in candidates:
        base = _first_name(c[0])
        for key in (c[0].act.name, c[0].first.name, base, base + "_act"):
            names.setdefault(key, c)
    missing = [s for s in sites if s not in names]
    if missing:
        raise InvalidArgument(
            f"sites {missing} are not collapse sites; sites found (by the layer before them): "
            f"{[_first_name(c[0]) for c in candidates]}"
        )
    picked = {id(names[s][0].act): names[s] for s in sites}
    return [c for c in candidates if id(c[0].act) in picked]


# ------------------------------------------------------------------------------- regulariser


def _blends(gm: nn.Module) -> list[tuple[str, Blend]]:
    return [(n, m) for n, m in gm.named_modules() if isinstance(m, Blend)]


def regularizer(prepared: nn.Module, strength: float = 1.0, *, weighting: str = "params") -> Tensor:
    """The collapse penalty ``strength * sum_i w_i (1 - a_i)^2`` over the blends' slopes.

    Add it to the training loss. With ``weighting="params"`` (default) ``w_i`` is the number of
    parameters collapsing site ``i`` saves, divided by the largest such saving (so the most
    rewarding site has weight 1 and sites that would not shrink have weight 0); with
    ``"uniform"`` every ``w_i`` is 1. ``strength`` is in units of the training loss: at slope
    ``a`` a site of weight 1 costs ``strength * (1 - a)^2``, so a slope stops where the task
    loss's gradient ``dL/da`` balances ``2 * strength * (1 - a)``: larger values push harder
    and cost more accuracy. In ``benchmarks/bench_collapse.py`` (cross-entropy losses, slopes
    in their own Adam group at lr 0.03) ``strength=1`` brought all four MLP slopes of a small
    transformer LM within 0.05 of 1 in 400 steps, while the two ReLUs of a CNN's MLP head,
    which make the whole head linear together, needed ``strength=4``.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> p = prepare(nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 4)), torch.ones(1, 4))
    >>> float(regularizer(p, 0.5).detach())
    0.5
    """
    if weighting not in ("params", "uniform"):
        raise InvalidArgument(f"weighting must be 'params' or 'uniform', got {weighting!r}")
    if not strength >= 0:
        raise InvalidArgument(f"strength must be >= 0, got {strength!r}")
    blends = _blends(prepared)
    if not blends:
        raise InvalidArgument(
            "the module has no Blend sites; pass the result of fxcompress.collapse.prepare"
        )
    terms = [
        (b.penalty_weight if weighting == "params" else 1.0) * (1 - b.slope) ** 2
        for _, b in blends
    ]
    return strength * torch.stack([torch.as_tensor(t) for t in terms]).sum()


def slope_parameters(prepared: nn.Module) -> list[nn.Parameter]:
    """The slope parameters of every :class:`Blend` (e.g. for their own optimiser group)."""
    return [b.slope for _, b in _blends(prepared)]


def slopes(prepared: nn.Module) -> dict[str, float]:
    """The current slope of every :class:`Blend`, by module name."""
    return {n: float(b.slope.detach()) for n, b in _blends(prepared)}


# ------------------------------------------------------------------------------------ apply


@dataclass(frozen=True)
class _Chain:
    layers: tuple[fx.Node, ...]  # L0 .. Lm
    sites: tuple[_Match, ...]  # site k between layers[k] and layers[k + 1]


def apply(
    prepared: fx.GraphModule,
    tol: float = 0.05,
    *,
    data: Iterable[Any] | None = None,
    check: bool = True,
) -> fx.GraphModule:
    """Collapse the sites whose slope is within ``tol`` of 1; return an eval-mode GraphModule.

    Each site with ``|1 - a| <= tol`` becomes the identity; each run of layers joined by such
    sites is composed into as few layers as make it smallest (a merge must have fewer
    parameters and no more MACs than the layers it replaces). Eval BatchNorms inside a run are
    folded, dropout dropped. Other sites keep their blend (a ReLU blend becomes
    ``leaky_relu``, a blend at slope exactly 0 the original activation), so they stay exact.

    Parameters
    ----------
    prepared : torch.fx.GraphModule
        From :func:`prepare` (after training); not modified.
    tol : float
        Slopes with ``|1 - a| <= tol`` are made the identity (>= 0). At ``a == 1`` the
        collapse is exact.
    data : iterable, optional
        Batches (``inputs`` or ``(inputs, targets)``); if given, the largest relative change of
        the output (result vs ``prepared`` in eval mode) over them goes in the report.
    check : bool
        Verify that the result equals ``prepared`` with the linearised slopes set to exactly 1
        (on the example inputs of :func:`prepare`); a mismatch raises :class:`RewriteError`.

    Returns
    -------
    torch.fx.GraphModule
        ``meta["fxcompress.collapse"]`` holds a :class:`CollapseReport`.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> mlp = nn.Sequential(nn.Linear(8, 64), nn.GELU(), nn.Linear(64, 8))
    >>> p = prepare(mlp, torch.randn(2, 8))
    >>> with torch.no_grad():
    ...     p.get_submodule("0_act").slope.fill_(0.98)
    Parameter containing:
    tensor(0.9800, requires_grad=True)
    >>> small = apply(p, tol=0.05)
    >>> report = small.meta["fxcompress.collapse"]
    >>> report.params_before, report.params_after, report.sites[0].action
    (1097, 72, 'merged')
    """
    if not isinstance(prepared, fx.GraphModule):
        raise InvalidArgument(
            f"prepared must be the GraphModule returned by prepare, got {type(prepared).__name__}"
        )
    if not (isinstance(tol, (int, float)) and tol >= 0):
        raise InvalidArgument(f"tol must be a number >= 0, got tol={tol!r}")
    gm = clone(prepared).eval()
    params_before = _count(prepared)
    matches: list[_Match] = []
    notes: list[str] = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(gm.get_submodule(str(node.target)), Blend):
            continue
        m = _match(gm, node)
        if isinstance(m, str):
            notes.append(f"{node.target}: left as a blend ({m})")
            logger.warning("LayerCollapse site %s cannot be collapsed: %s", node.target, m)
            continue
        matches.append(m)
    linear = [m for m in matches if abs(1.0 - _slope(gm, m.act)) <= tol]
    decisions: dict[str, SiteDecision] = {}
    for m in matches:
        if m not in linear:
            name = str(m.act.target)
            decisions[name] = SiteDecision(name, _slope(gm, m.act), "kept")
            _restore(gm, m.act)
    for chain in _chains(linear):
        for d in _collapse_chain(gm, chain):
            decisions[d.name] = d
    gm = finalize(gm)
    _drop_unread_tensors(gm)
    ordered = tuple(decisions[k] for k in sorted(decisions, key=_order(prepared)))
    if check:
        _check(prepared, gm, {d.name for d in ordered if d.action != "kept"})
    error = _output_error(prepared, gm, data) if data is not None else None
    gm.meta.pop(_EXAMPLES, None)
    gm.meta[meta.COLLAPSE] = CollapseReport(
        ordered, params_before, _count(gm), float(tol), error, tuple(notes)
    )
    return gm


def _drop_unread_tensors(gm: fx.GraphModule) -> None:
    """Delete parameters and buffers that no node reads any more (weights of merged F.linear).

    A tensor is read if a ``get_attr`` node names it (or a prefix of it), or if a module that
    owns it (or one of that module's ancestors) is called.
    """
    read = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    tensors = [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers()]
    for name, _ in tensors:
        parts = name.split(".")
        prefixes = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
        if prefixes & (read | called):
            continue
        owner = gm.get_submodule(".".join(parts[:-1])) if len(parts) > 1 else gm
        delattr(owner, parts[-1])


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _order(gm: fx.GraphModule) -> Any:
    index = {str(n.target): i for i, n in enumerate(gm.graph.nodes) if n.op == "call_module"}
    return lambda name: index.get(name, len(index))


def _slope(gm: fx.GraphModule, node: fx.Node) -> float:
    return float(gm.get_submodule(str(node.target)).slope.detach())


def _restore(gm: fx.GraphModule, node: fx.Node) -> None:
    """Replace a kept blend by an equivalent plain op where one exists."""
    blend = gm.get_submodule(str(node.target))
    a = float(blend.slope.detach())
    if a == 0.0:
        fn, kwargs = ACTIVATIONS[blend.activation], dict(blend.kwargs)
    elif blend.activation == "relu":
        fn, kwargs = F.leaky_relu, {"negative_slope": a}
    else:
        blend.slope.requires_grad_(False)
        return
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(fn, (node.args[0],), kwargs)
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def _chains(matches: list[_Match]) -> list[_Chain]:
    """Group linearised sites into maximal runs sharing layers (``second`` of one = ``first``)."""
    by_first = {m.first: m for m in matches}
    seconds = {m.second for m in matches}
    chains = []
    for m in matches:
        if m.first in seconds:
            continue  # not the start of a chain
        layers, sites = [m.first], []
        cur: _Match | None = m
        while cur is not None:
            sites.append(cur)
            layers.append(cur.second)
            cur = by_first.get(cur.second)
        chains.append(_Chain(tuple(layers), tuple(sites)))
    return chains


def _bn_kwargs(gm: fx.GraphModule, node: fx.Node) -> dict[str, Any]:
    bn = batchnorm_of(gm, node)
    assert bn is not None
    return bn_statistics(bn)


def _collapse_chain(gm: fx.GraphModule, chain: _Chain) -> list[SiteDecision]:
    """Rewrite one chain of linearised sites; return a decision per site."""
    layers = []
    for i, node in enumerate(chain.layers):
        layer = layer_of(gm, node)
        assert layer is not None
        if i > 0 and chain.sites[i - 1].bn_after is not None:
            layer = fold_bn_before(layer, **_bn_kwargs(gm, chain.sites[i - 1].bn_after))
        if i < len(chain.sites) and chain.sites[i].bn_before is not None:
            layer = fold_bn(layer, **_bn_kwargs(gm, chain.sites[i].bn_before))
        layers.append(layer)
    positions = [_positions(n, int(lay.weight.shape[0])) for n, lay in zip(chain.layers, layers)]
    costs = [layer_cost(lay, p) for lay, p in zip(layers, positions)]
    merged = {
        (i, j): merged_cost(layers[i : j + 1], positions[j])
        for i in range(len(layers))
        for j in range(i + 1, len(layers))
    }
    runs = best_partition(costs, merged)
    slopes_ = [_slope(gm, s.act) for s in chain.sites]
    exact = all(a == 1.0 for a in slopes_)
    norms = [0.0] * len(chain.sites) if exact else tail_norms(layers)
    consts = [
        deviation_constant(gm.get_submodule(str(s.act.target)).activation,
                           gm.get_submodule(str(s.act.target)).kwargs)
        for s in chain.sites
    ]

    last = chain.layers[-1]
    source = chain.layers[0].args[0]
    decisions = []
    for i, j in runs:
        folded = any(
            (k > 0 and chain.sites[k - 1].bn_after is not None)
            or (k < len(chain.sites) and chain.sites[k].bn_before is not None)
            for k in range(i, j + 1)
        )
        node = chain.layers[i]
        if i == j and not folded:
            new = node  # kept as it is, only its input changes
            new.replace_input_with(node.args[0], source)
        else:
            module = compose_run(layers[i : j + 1]).to_module()
            base = str(node.target) if node.op == "call_module" else node.name
            target = install(gm, base + ("_collapsed" if j > i else "_folded"), module)
            # where the run's first layer was: it reads the input at the same moment
            with gm.graph.inserting_before(run_anchor(chain.layers[i : j + 1])):
                new = gm.graph.call_module(target, (source,))
            new.meta = dict(chain.layers[j].meta)
        source = new
        for k in range(i, j + 1):
            if k < len(chain.sites):
                s = chain.sites[k]
                merged_here = k < j
                decisions.append(
                    SiteDecision(
                        str(s.act.target),
                        slopes_[k],
                        "merged" if merged_here else "identity",
                        tuple(n.name for n in chain.layers[i : j + 1]) if merged_here else (),
                        abs(1.0 - slopes_[k]) * consts[k] * norms[k],
                    )
                )
    if source is not last:
        last.replace_all_uses_with(source)
    return decisions


def _linearised_reference(prepared: fx.GraphModule, names: set[str]) -> fx.GraphModule:
    ref = clone(prepared).eval()
    with torch.no_grad():
        for name in names:
            ref.get_submodule(name).slope.fill_(1.0)
    return ref


def _check(prepared: fx.GraphModule, result: fx.GraphModule, names: set[str]) -> None:
    inputs = prepared.meta.get(_EXAMPLES)
    if inputs is None:
        logger.info("no example inputs stored on the prepared module; equivalence not checked")
        return
    ref = _linearised_reference(prepared, names)
    device = next((p.device for p in prepared.parameters()), None)
    if device is not None:  # the model may have moved since prepare (e.g. trained on a GPU)
        inputs = tuple(t.to(device) if isinstance(t, Tensor) else t for t in inputs)
    with torch.no_grad():
        expected = ref(*clone_tensors(inputs))
        got = result(*clone_tensors(inputs))
    # composing layers reorders float sums: allow more rounding than a single rewrite
    dtype = expected.dtype if isinstance(expected, Tensor) else torch.float32
    rtol = 10 * default_rtol(dtype)
    _, problem = compare_outputs(got, expected, rtol=rtol)
    if problem is not None:
        raise RewriteError(f"collapsed model differs from the linearised prepared model: {problem}")


def _first_input(batch: Any) -> tuple[Any, ...]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], Tensor):
        return (batch[0],)
    return normalize_inputs(batch, name="data batch")


def _output_error(prepared: fx.GraphModule, result: fx.GraphModule, data: Iterable[Any]) -> float:
    ref = clone(prepared).eval()
    worst = 0.0
    with torch.no_grad():
        for batch in data:
            inputs = _first_input(batch)
            err, _ = compare_outputs(
                result(*clone_tensors(inputs)), ref(*clone_tensors(inputs)), rtol=math.inf
            )
            worst = max(worst, err)
    return worst
