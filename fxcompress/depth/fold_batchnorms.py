"""BatchNorm folds: into the layer before it (``layer -> BN``) or, failing that, into the layer
after it (``BN -> layer``, event ``fold_bn_before``); see :mod:`fxcompress.depth.merge` for when
each is exact.
"""

from __future__ import annotations

import logging

from torch import fx

from fxcompress.depth.emission import Event, emit, name_hint
from fxcompress.graph.recognise import (
    BatchNormCall,
    batchnorm_call,
    layer_of,
    reads_rank_only,
    single_user,
)
from fxcompress.graph.util import shape_of
from fxcompress.maths import LinearParams, fold_bn, fold_bn_before

__all__ = [
    "batchnorm_rank_fits",
    "fold_bn_after_layer",
    "fold_bn_into_next",
    "fold_every_batchnorm",
]

logger = logging.getLogger("fxcompress.merge")


def fold_every_batchnorm(gm: fx.GraphModule) -> list[Event]:
    """Fold every BatchNorm into the layer before it, then the rest into the layer after it."""
    _move_rank_reads(gm)
    events = []
    for node in list(gm.graph.nodes):
        if node.graph is gm.graph:
            event = fold_bn_after_layer(gm, node)
            if event is not None:
                events.append(event)
    for node in list(gm.graph.nodes):
        if node.graph is gm.graph:
            event = fold_bn_into_next(gm, node)
            if event is not None:
                events.append(event)
    return events


def _move_rank_reads(gm: fx.GraphModule) -> None:
    """Make reads of a layer's or BatchNorm's rank (``y.ndim``) read its input's instead.

    A conv, linear layer or BatchNorm keeps the rank of its input, so this is exact; it leaves
    the layer read only by its real consumers (timm's layers assert ``x.ndim == 4`` on the
    output of each conv, which would otherwise block every fold). Visited from the outputs
    backwards, so a read moves through a whole run of layers.
    """
    for node in reversed(list(gm.graph.nodes)):
        if not node.args or not isinstance(node.args[0], fx.Node):
            continue
        readers = [user for user in node.users if reads_rank_only(user, node)]
        if not readers or (layer_of(gm, node) is None and batchnorm_call(gm, node) is None):
            continue
        for user in readers:
            user.replace_input_with(node, node.args[0])


def batchnorm_rank_fits(bn: BatchNormCall, node: fx.Node, rank: int) -> bool:
    """Whether the BatchNorm ``node`` normalises an input of ``rank`` dimensions.

    The recorded shape decides; without one, the module type (``nn.BatchNorm2d`` needs 4-D).
    """
    shape = shape_of(node)
    return (len(shape) if shape is not None else bn.rank) == rank


def fold_bn_after_layer(gm: fx.GraphModule, node: fx.Node) -> Event | None:
    """Fold the BatchNorm ``node`` into the conv / linear layer that produces its input."""
    bn = batchnorm_call(gm, node)
    if bn is None or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    producer = node.args[0]
    if single_user(producer) is not node:
        return None  # the layer's output is read elsewhere too; those readers need it unfolded
    layer = layer_of(gm, producer)
    if layer is None:
        return None  # BN after something that is not a conv/linear layer
    if layer.weight.shape[0] != bn.num_features:
        return None
    # BatchNorm normalises axis 1. That is a conv's channel axis only on a batched output
    # (N, C, *spatial); on an unbatched one (C, *spatial) axis 1 is spatial (BatchNorm1d on a
    # (C, L) map treats C as the batch). A linear layer's features are axis 1 only in 2-D.
    rank = 2 if isinstance(layer, LinearParams) else layer.ndim + 2
    if not batchnorm_rank_fits(bn, node, rank):
        logger.debug("not folding %s: its axis 1 is not the layer's channel axis", node.name)
        return None
    folded = fold_bn(layer, **bn.stats)
    name = emit(gm, producer, node, folded, preferred=name_hint(producer))
    return {"kind": "fold_bn", "layer": name_hint(producer), "bn": bn.name, "into": name}


def fold_bn_into_next(gm: fx.GraphModule, node: fx.Node) -> Event | None:
    """Fold the BatchNorm ``node`` into the layer that alone reads it.

    Exact only when that layer does not zero-pad (padding zeros come after the normalisation).
    """
    bn = batchnorm_call(gm, node)
    if bn is None or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    consumer = single_user(node)
    if consumer is None or not consumer.args or consumer.args[0] is not node:
        return None
    if node in consumer.args[1:] or node in consumer.kwargs.values():
        return None
    layer = layer_of(gm, consumer)
    shape = shape_of(node)
    if layer is None or shape is None:
        return None
    if isinstance(layer, LinearParams):
        if len(shape) != 2 or layer.in_features != bn.num_features:
            return None  # BatchNorm normalises axis 1, a linear layer mixes the last one
    elif (
        len(shape) != layer.ndim + 2
        or layer.in_channels != bn.num_features
        or any(p > 0 for p in layer.padding)
    ):
        return None  # unbatched (axis 1 is spatial), other channels, or zero padding
    folded = fold_bn_before(layer, **bn.stats)
    name = emit(gm, node, consumer, folded, preferred=name_hint(consumer))
    return {"kind": "fold_bn_before", "layer": name_hint(consumer), "bn": bn.name, "into": name}
