"""LayerCollapse sites: ``first -> [BatchNorm] -> act -> [Dropout | BatchNorm]* -> second``.

:func:`match` recognises the site around one activation node (or says why it is not one), and
:func:`saving` prices collapsing it alone. Pure reads of the graph; the surgery is in
:mod:`.rewrite`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import fx, nn

from fxcompress import meta
from fxcompress.collapse.maths import is_pointwise, layer_cost, merged_cost
from fxcompress.graph.recognise import batchnorm_of, layer_of, single_user
from fxcompress.graph.util import shape_of
from fxcompress.maths import LinearParams

__all__ = ["Match", "Site", "first_name", "kind_of", "match", "positions", "saving"]

_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


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
class Match:
    """A site found in a graph: its nodes (the graph's own, valid until it is rewritten)."""

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


def kind_of(layer: Any) -> str:
    """``"linear"`` for a :class:`~fxcompress.maths.LinearParams`, else ``"conv"``."""
    return "linear" if isinstance(layer, LinearParams) else "conv"


def match(gm: fx.GraphModule, act: fx.Node) -> Match | str:
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
    kind = kind_of(layer1)
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
    if kind_of(layer2) != kind:
        return "the layers around it are of different kinds (linear vs convolution)"
    if not is_pointwise(layer2):
        return "the layer after it is not pointwise (a 1x1 unpadded convolution or a linear)"
    shared = set(gm.meta.get(meta.SHARED, ()))
    for node in (first, second):
        if node.op == "call_module" and str(node.target) in shared:
            return f"{node.target} is called at several places"
    return Match(act, first, second, bn_before, bn_after)


def positions(node: fx.Node, out_features: int) -> int:
    """Positions (tokens, pixels) a layer with ``out_features`` outputs runs at in ``node``."""
    shape = shape_of(node)
    return max(1, math.prod(shape) // out_features) if shape else 1


def saving(gm: fx.GraphModule, m: Match) -> int:
    """Parameters saved by collapsing site ``m`` alone (negative: it would grow)."""
    a, b = layer_of(gm, m.first), layer_of(gm, m.second)
    assert a is not None
    assert b is not None
    pos = positions(m.second, b.weight.shape[0])
    apart = layer_cost(a, pos) + layer_cost(b, pos)
    return apart.params - merged_cost([a, b], pos).params


def first_name(m: Match) -> str:
    """The name a site goes by: its first layer's module (or node) name."""
    return str(m.first.target) if m.first.op == "call_module" else m.first.name
