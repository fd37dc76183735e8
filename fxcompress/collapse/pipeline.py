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

Modules: :mod:`.maths` (tensor maths), :mod:`.sites` (site matching), :mod:`.rewrite` (graph
surgery), :mod:`.training` (the penalty), :mod:`.pipeline` (``prepare``, ``apply``),
:mod:`.report`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, fx, nn

from fxcompress import meta
from fxcompress.collapse.maths import GATED, Blend
from fxcompress.collapse.report import CollapseReport, SiteDecision
from fxcompress.collapse.rewrite import (
    chains,
    collapse_chain,
    drop_unread_tensors,
    insert_blend,
    restore,
    slope_of,
)
from fxcompress.collapse.sites import Match, first_name, match, saving
from fxcompress.errors import InvalidArgument, RewriteError
from fxcompress.graph.canonicalize import canonicalize
from fxcompress.graph.capture import capture, normalize_inputs
from fxcompress.graph.recognise import ACTIVATIONS, activation_of
from fxcompress.graph.util import (
    clone,
    clone_tensors,
    compare_outputs,
    default_rtol,
    finalize,
)
from fxcompress.method import deliver
from fxcompress.report import count_params

__all__ = ["apply", "prepare"]

logger = logging.getLogger(__name__)

_EXAMPLES = meta.COLLAPSE_EXAMPLES
_SITES = meta.COLLAPSE_SITES


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
    >>> from fxcompress.collapse import slopes
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
    candidates: list[tuple[Match, str, dict[str, Any]]] = []
    for node in gm.graph.nodes:
        spec = activation_of(gm, node)
        if spec is None:
            continue
        if spec.name not in allowed:
            logger.debug("site %s skipped: %s is not a blendable activation", node.name, spec.name)
            continue
        m = match(gm, node)
        if isinstance(m, str):
            logger.debug("activation %s is not a collapse site: %s", node.name, m)
            continue
        candidates.append((m, spec.name, dict(spec.kwargs)))
    chosen = _choose(gm, candidates, sites)
    found = [insert_blend(gm, m, name, kwargs) for m, name, kwargs in chosen]
    gm = finalize(gm)
    top = max([s.saving for s in found] + [1])
    for s in found:
        gm.get_submodule(s.name).penalty_weight = max(s.saving, 0) / top
    gm.meta[_SITES] = tuple(found)
    gm.meta[_EXAMPLES] = clone_tensors(inputs)
    logger.info("LayerCollapse: %d sites prepared: %s", len(found), [s.name for s in found])
    return gm.train(model.training)


def _choose(
    gm: fx.GraphModule,
    candidates: list[tuple[Match, str, dict[str, Any]]],
    sites: Sequence[str] | str | None,
) -> list[tuple[Match, str, dict[str, Any]]]:
    if sites is None:
        chosen = [c for c in candidates if saving(gm, c[0]) > 0]
        for m, _, _ in candidates:
            if saving(gm, m) <= 0:
                logger.info("site %s skipped: collapsing it would not save parameters", m.act.name)
        return chosen
    if sites == "all":
        return candidates
    if isinstance(sites, str):
        raise InvalidArgument(f"sites must be None, 'all' or a sequence of names, got {sites!r}")
    names: dict[str, tuple[Match, str, dict[str, Any]]] = {}
    for c in candidates:
        base = first_name(c[0])
        for key in (c[0].act.name, c[0].first.name, base, base + "_act"):
            names.setdefault(key, c)
    missing = [s for s in sites if s not in names]
    if missing:
        raise InvalidArgument(
            f"sites {missing} are not collapse sites; sites found (by the layer before them): "
            f"{[first_name(c[0]) for c in candidates]}"
        )
    picked = {id(names[s][0].act): names[s] for s in sites}
    return [c for c in candidates if id(c[0].act) in picked]


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
    params_before = count_params(prepared)
    matches: list[Match] = []
    notes: list[str] = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(gm.get_submodule(str(node.target)), Blend):
            continue
        m = match(gm, node)
        if isinstance(m, str):
            notes.append(f"{node.target}: left as a blend ({m})")
            logger.warning("LayerCollapse site %s cannot be collapsed: %s", node.target, m)
            continue
        matches.append(m)
    linear = [m for m in matches if abs(1.0 - slope_of(gm, m.act)) <= tol]
    decisions: dict[str, SiteDecision] = {}
    for m in matches:
        if m not in linear:
            name = str(m.act.target)
            decisions[name] = SiteDecision(name, slope_of(gm, m.act), "kept")
            restore(gm, m.act)
    for chain in chains(linear):
        for d in collapse_chain(gm, chain):
            decisions[d.name] = d
    gm = finalize(gm)
    drop_unread_tensors(gm)
    ordered = tuple(decisions[k] for k in sorted(decisions, key=_order(prepared)))
    if check:
        _check(prepared, gm, {d.name for d in ordered if d.action != "kept"})
    error = _output_error(prepared, gm, data) if data is not None else None
    gm.meta.pop(_EXAMPLES, None)
    after = count_params(gm)
    report = CollapseReport(ordered, params_before, after, float(tol), error, tuple(notes))
    return deliver(gm, meta.COLLAPSE, report)


def _order(gm: fx.GraphModule) -> Any:
    index = {str(n.target): i for i, n in enumerate(gm.graph.nodes) if n.op == "call_module"}
    return lambda name: index.get(name, len(index))


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
