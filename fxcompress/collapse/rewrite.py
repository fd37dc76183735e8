"""LayerCollapse graph surgery: insert blends, restore kept ones, collapse linearised runs.

Every function here edits a GraphModule in place; the callers in :mod:`.pipeline` work on a
copy and end with :func:`~fxcompress.graph.util.finalize`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from fxcompress.collapse.maths import (
    Blend,
    best_partition,
    compose_run,
    deviation_constant,
    layer_cost,
    merged_cost,
    tail_norms,
)
from fxcompress.collapse.report import SiteDecision
from fxcompress.collapse.sites import Match, Site, first_name, kind_of, positions, saving
from fxcompress.graph.recognise import ACTIVATIONS, batchnorm_of, bn_statistics, layer_of
from fxcompress.graph.util import install, run_anchor
from fxcompress.maths import fold_bn, fold_bn_before

__all__ = [
    "Chain",
    "chains",
    "collapse_chain",
    "drop_unread_tensors",
    "insert_blend",
    "restore",
    "slope_of",
]


@dataclass(frozen=True)
class Chain:
    """A maximal run of linearised sites sharing layers."""

    layers: tuple[fx.Node, ...]  # L0 .. Lm
    sites: tuple[Match, ...]  # site k between layers[k] and layers[k + 1]


def _dtype(gm: fx.GraphModule, node: fx.Node) -> torch.dtype:
    layer = layer_of(gm, node)
    return layer.weight.dtype if layer is not None else torch.get_default_dtype()


def insert_blend(gm: fx.GraphModule, m: Match, activation: str, kwargs: dict[str, Any]) -> Site:
    """Replace site ``m``'s activation by a :class:`Blend` (exactly the same function)."""
    slope = 0.0
    if activation == "leaky_relu":  # leaky_relu(z, s) == relu(z) + s * (z - relu(z))
        activation, slope = "relu", float(kwargs.pop("negative_slope", 0.01))
    blend = Blend(activation, kwargs, slope, dtype=_dtype(gm, m.first))
    target = install(gm, first_name(m) + "_act", blend)
    with gm.graph.inserting_before(m.act):
        new = gm.graph.call_module(target, (m.act.args[0],))
    new.meta = dict(m.act.meta)
    m.act.replace_all_uses_with(new)
    gm.graph.erase_node(m.act)
    layer = layer_of(gm, m.first)
    assert layer is not None
    return Site(
        target, activation, m.first.name, m.second.name, kind_of(layer),
        int(layer.weight.shape[0]), saving(gm, m),
    )  # fmt: skip


def slope_of(gm: fx.GraphModule, node: fx.Node) -> float:
    """The current slope of the blend that ``node`` calls."""
    return float(gm.get_submodule(str(node.target)).slope.detach())


def restore(gm: fx.GraphModule, node: fx.Node) -> None:
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


def chains(matches: list[Match]) -> list[Chain]:
    """Group linearised sites into maximal runs sharing layers (``second`` of one = ``first``)."""
    by_first = {m.first: m for m in matches}
    seconds = {m.second for m in matches}
    found = []
    for m in matches:
        if m.first in seconds:
            continue  # not the start of a chain
        layers, sites = [m.first], []
        cur: Match | None = m
        while cur is not None:
            sites.append(cur)
            layers.append(cur.second)
            cur = by_first.get(cur.second)
        found.append(Chain(tuple(layers), tuple(sites)))
    return found


def _bn_kwargs(gm: fx.GraphModule, node: fx.Node) -> dict[str, Any]:
    bn = batchnorm_of(gm, node)
    assert bn is not None
    return bn_statistics(bn)


def _folded_layers(gm: fx.GraphModule, chain: Chain) -> list[Any]:
    """The chain's layers with the BatchNorms around its sites folded in."""
    layers = []
    for i, node in enumerate(chain.layers):
        layer = layer_of(gm, node)
        assert layer is not None
        if i > 0 and chain.sites[i - 1].bn_after is not None:
            layer = fold_bn_before(layer, **_bn_kwargs(gm, chain.sites[i - 1].bn_after))
        if i < len(chain.sites) and chain.sites[i].bn_before is not None:
            layer = fold_bn(layer, **_bn_kwargs(gm, chain.sites[i].bn_before))
        layers.append(layer)
    return layers


def collapse_chain(gm: fx.GraphModule, chain: Chain) -> list[SiteDecision]:
    """Rewrite one chain of linearised sites; return a decision per site."""
    layers = _folded_layers(gm, chain)
    at = [positions(n, int(lay.weight.shape[0])) for n, lay in zip(chain.layers, layers)]
    costs = [layer_cost(lay, p) for lay, p in zip(layers, at)]
    merged = {
        (i, j): merged_cost(layers[i : j + 1], at[j])
        for i in range(len(layers))
        for j in range(i + 1, len(layers))
    }
    runs = best_partition(costs, merged)
    slopes_ = [slope_of(gm, s.act) for s in chain.sites]
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
        for k in range(i, min(j + 1, len(chain.sites))):
            s, merged_here = chain.sites[k], k < j
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


def drop_unread_tensors(gm: fx.GraphModule) -> None:
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
