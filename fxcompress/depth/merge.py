"""Exact merging passes: BatchNorm folding, conv∘conv / linear∘linear merging, skip folding.

Every rewrite here is function-preserving in eval mode (up to floating-point rounding; the maths
runs in float64). Patterns and the reasons they are skipped:

- ``layer -> BN``: folded when the layer's output feeds only the BN (else others would see the
  folded values), the BN uses running statistics, and the BN's axis 1 is the layer's channel
  axis: a batched output (an unbatched conv output ``(C, L)`` puts a spatial axis there, and
  BatchNorm1d then normalises that). A BN is an ``nn.BatchNorm{1,2,3}d`` call or
  ``F.batch_norm(..., training=False)`` on attributes (timm's ``BatchNormAct2d`` traces to it).
- ``BN -> layer`` (a BN that could not be folded into its producer): folded into the layer that
  alone reads it when that layer does not zero-pad (event ``fold_bn_before``).
- linear runs ``conv1 -> conv2 -> ...`` (or of linear layers), each layer's output read only by
  the next: split into the parts of least total cost, each merged into one layer, by a DP over
  the run (:mod:`fxcompress.depth.partition`; cost: multiply-accumulates at the traced shape, or the
  ``cost`` given to :func:`merge`). Keeping every layer is a candidate, so the result is never
  costlier (a depthwise chain turned dense would be), yet a whole run may merge where no pair
  would (an inverted residual without activations is one dense conv). A zero-padded layer
  begins a part (padding of an intermediate map is not a convolution of the input, see
  :func:`~fxcompress.maths.compose`); layers that carry the same
  ``meta["fxcompress.segment"]`` chosen by a planner are merged regardless.
- sums of branches of one tensor ``x`` -- ``conv(x)`` (with its folded BN), ``conv(Pad(x))``,
  ``Pad(x)``, ``BN(x)`` (a per-channel affine map: a depthwise 1x1 conv) and ``x`` itself --
  in any association of nested adds (``(a + b) + c`` is two add nodes): the summands of one
  tensor that save the most are folded into one conv (projection shortcut, identity skip,
  cropped identity, RepVGG / MobileOne re-parameterisation), never costlier unless a planner
  put them in one segment; other summands stay in the sum (event ``fold_skip``).

A module called from several places is never modified: each rewritten call site gets a new module;
nor is a module overwritten while anything still calls it or reads one of its attributes.
In-place ops are respected: a chain's merged layer reads its input where the first layer did, and
a sum is not folded when its input (or a summand left in the sum) is written in place between
the branches' reads. Reads of a layer's rank only (``y.ndim`` in timm's shape assertions) are
moved to its input, which has the same rank, so they do not block a fold.
"""

from __future__ import annotations

import itertools
import logging
import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from fxcompress import meta
from fxcompress.depth.partition import LayerCost, cheapest_partition, composed_geometry, layer_macs
from fxcompress.errors import InvalidArgument
from fxcompress.graph.aliasing import aliases, mutated_input
from fxcompress.graph.canonicalize import canonicalize
from fxcompress.graph.modules import Pad
from fxcompress.graph.recognise import (
    BatchNormCall,
    batchnorm_call,
    is_add,
    layer_of,
    pad_of,
    reads_rank_only,
    single_user,
)
from fxcompress.graph.util import (
    clone,
    eliminate_dead_code,
    finalize,
    install,
    is_unused,
    run_anchor,
    shape_of,
    topo_index,
)
from fxcompress.maths import (
    ConvParams,
    LinearParams,
    add_parallel,
    batchnorm_as_conv,
    compose,
    compose_linear,
    fold_bn,
    fold_bn_before,
    identity,
)
from fxcompress.meta import SEGMENT

__all__ = ["fold_batchnorm", "merge"]

logger = logging.getLogger("fxcompress.merge")

Event = dict[str, Any]


def fold_batchnorm(gm: fx.GraphModule) -> fx.GraphModule:
    """Return a copy of ``gm`` with every foldable eval-mode BatchNorm folded into its layer.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from fxcompress.graph.capture import capture
    >>> m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    >>> folded = fold_batchnorm(capture(m, torch.randn(1, 3, 6, 6)))
    >>> [type(mod).__name__ for mod in folded.children()]
    ['Conv2d']
    """
    gm = clone(gm)
    events = _fold_all_bn(gm)
    _record(gm, events)
    return finalize(gm)


def merge(
    gm: fx.GraphModule, *, only_if_cheaper: bool = True, cost: LayerCost | None = None
) -> fx.GraphModule:
    """Return a copy of ``gm`` with every exactly-mergeable run of layers merged into one layer.

    The graph is canonicalized first (see :func:`fxcompress.canonicalize`: eval-mode dropout and
    ``nn.Identity`` go, activations get one spelling), BatchNorms are folded, then conv chains,
    linear chains and foldable skip connections are merged until nothing changes.

    Parameters
    ----------
    gm : torch.fx.GraphModule
        A captured, eval-mode module (see :func:`fxcompress.capture`); not modified.
    only_if_cheaper : bool
        Apply a merge only if the merged layer costs no more than the layers it replaces. Each
        linear run of layers (each reading only the previous one's output) is split into the
        parts of least total cost (see :mod:`fxcompress.depth.partition`); with False, into the
        fewest parts. Layers that a planner marked as one segment are merged regardless.
    cost : callable, optional
        ``cost(layer, input_shape, output_shape) -> float`` prices a layer of a linear run (see
        :data:`fxcompress.depth.partition.LayerCost`); default: its multiply-accumulates at the
        traced shape (:func:`fxcompress.depth.partition.layer_macs`). ``latency_cost(table)``
        prices it by a :class:`~fxcompress.latency.LatencyTable`.

    Returns
    -------
    torch.fx.GraphModule
        ``meta["fxcompress.events"]`` lists each fold and merge.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from fxcompress.graph.capture import capture
    >>> m = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3)).eval()
    >>> x = torch.randn(1, 3, 9, 9)
    >>> merged = merge(capture(m, x))
    >>> [type(mod).__name__ for mod in merged.children()]
    ['Conv2d']
    >>> torch.allclose(merged(x), m(x), atol=1e-5)
    True
    """
    if cost is not None and not callable(cost):
        raise InvalidArgument(
            f"cost must be a callable cost(layer, input_shape, output_shape) -> float or None, "
            f"got {cost!r:.80} of type {type(cost).__name__}; e.g. "
            "fxcompress.depth.partition.latency_cost(table)"
        )
    # a canonical copy: no-op layers (eval dropout, nn.Identity) no longer sit between layers
    gm = canonicalize(gm).eval()  # folds use eval (running-statistics) semantics
    events: list[Event] = _fold_all_bn(gm)
    changed = True
    while changed:
        changed = False
        for node in list(gm.graph.nodes):
            if node.graph is not gm.graph or node not in gm.graph.nodes:
                continue  # erased earlier in this sweep
            event = (
                _fold_bn_after_layer(gm, node)  # a sum folded into a conv may precede a BN
                or _fold_bn_into_next(gm, node)
                or _try_chain(gm, node, only_if_cheaper, cost)
                or _try_sum(gm, node, only_if_cheaper, cost)
            )
            if event is not None:
                events.append(event)
                changed = True
                # drop what the rewrite left unread (e.g. a folded shortcut's Pad) right away,
                # so that single-user checks later in this sweep see the real readers
                eliminate_dead_code(gm)
    _record(gm, events)
    return finalize(gm)


def _record(gm: fx.GraphModule, events: list[Event]) -> None:
    gm.meta[meta.EVENTS] = [*gm.meta.get(meta.EVENTS, []), *events]


# --------------------------------------------------------------------------- BatchNorm folding


def _fold_all_bn(gm: fx.GraphModule) -> list[Event]:
    """Fold every BatchNorm into the layer before it, then the rest into the layer after it."""
    _move_rank_reads(gm)
    events = []
    for node in list(gm.graph.nodes):
        if node.graph is gm.graph:
            event = _fold_bn_after_layer(gm, node)
            if event is not None:
                events.append(event)
    for node in list(gm.graph.nodes):
        if node.graph is gm.graph:
            event = _fold_bn_into_next(gm, node)
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


def _bn_rank_fits(bn: BatchNormCall, node: fx.Node, rank: int) -> bool:
    """Whether the BatchNorm ``node`` normalises an input of ``rank`` dimensions.

    The recorded shape decides; without one, the module type (``nn.BatchNorm2d`` needs 4-D).
    """
    shape = shape_of(node)
    return (len(shape) if shape is not None else bn.rank) == rank


def _fold_bn_after_layer(gm: fx.GraphModule, node: fx.Node) -> Event | None:
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
    if not _bn_rank_fits(bn, node, rank):
        logger.debug("not folding %s: its axis 1 is not the layer's channel axis", node.name)
        return None
    folded = fold_bn(layer, **bn.stats)
    name = _emit(gm, producer, node, folded, preferred=_name_hint(producer))
    return {"kind": "fold_bn", "layer": _name_hint(producer), "bn": bn.name, "into": name}


def _fold_bn_into_next(gm: fx.GraphModule, node: fx.Node) -> Event | None:
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
    name = _emit(gm, node, consumer, folded, preferred=_name_hint(consumer))
    return {"kind": "fold_bn_before", "layer": _name_hint(consumer), "bn": bn.name, "into": name}


# --------------------------------------------------------------------------- chains


def _try_chain(
    gm: fx.GraphModule, node: fx.Node, only_if_cheaper: bool, cost: LayerCost | None = None
) -> Event | None:
    """Merge the part of ``node``'s linear run that begins at ``node``, if it has several layers.

    The run (see :func:`_linear_run`) is split by
    :func:`fxcompress.depth.partition.cheapest_partition`: least total ``cost`` (default:
    multiply-accumulates at the traced shape) with ``only_if_cheaper``, else fewest parts.
    Boundaries between layers of one planner segment are cut only when no merge across them is
    possible. Keeping every layer apart is always a candidate, so a merge never makes the run
    costlier, and a whole run can merge although each pair alone would not (an inverted
    residual without activations becomes one dense conv).

    The run is solved afresh at each of its layers: a part merged earlier in the sweep is a
    candidate of the shorter run too, so the rest of the partition stays optimal.
    """
    run = _linear_run(gm, node)
    if run is None:
        return None
    nodes, layers = run
    if len(nodes) < 2:
        return None  # a lone layer
    start = nodes.index(node)
    parts = dict(_run_partition(nodes, layers, only_if_cheaper, cost))
    stop = parts.get(start)
    if stop is None or stop - start < 2:
        return None  # node is inside a merged part, or kept as it is
    part = nodes[start:stop]
    names = [_name_hint(n) for n in part]
    merged = layers[start]
    for layer in layers[start + 1 : stop]:
        merged = _compose_layers(merged, layer)
    # one node where the part's first layer was: it reads the run's input at the same moment
    name = _emit(gm, part[0], part[-1], merged, preferred=names[0])
    if len(part) > 2:
        for inner in reversed(part[:-1]):  # each read only by the next, which is gone
            gm.graph.erase_node(inner)
    event: Event = {"kind": "merge", "layers": names, "into": name}
    if isinstance(merged, ConvParams):
        event["kernel_size"] = list(merged.kernel_size)
        event["groups"] = merged.groups
    return event


Layer = ConvParams | LinearParams

#: Spatial size per axis of the last layer's output when a run's shapes were not recorded.
ASSUMED_SIZE = 16


def _linear_run(gm: fx.GraphModule, node: fx.Node) -> tuple[list[fx.Node], list[Layer]] | None:
    """The maximal run of layers of ``node``'s kind through ``node``, each read only by the next.

    ``None`` if ``node`` is not a layer.
    """
    layer = layer_of(gm, node)
    if layer is None:
        return None
    nodes, layers = [node], [layer]
    while True:  # backwards
        prev = nodes[0].args[0] if nodes[0].args else None
        if not isinstance(prev, fx.Node) or single_user(prev) is not nodes[0]:
            break  # the map between them is read elsewhere too
        found = layer_of(gm, prev)
        if found is None or not _same_kind(found, layers[0]):
            break
        nodes.insert(0, prev)
        layers.insert(0, found)
    while True:  # forwards
        nxt = single_user(nodes[-1])
        if nxt is None or not nxt.args or nxt.args[0] is not nodes[-1]:
            break
        found = layer_of(gm, nxt)
        if found is None or not _same_kind(layers[-1], found):
            break
        nodes.append(nxt)
        layers.append(found)
    return nodes, layers


def _same_kind(first: Layer, second: Layer) -> bool:
    if isinstance(first, LinearParams) or isinstance(second, LinearParams):
        return isinstance(first, LinearParams) and isinstance(second, LinearParams)
    return first.ndim == second.ndim


def _compose_layers(first: Layer, second: Layer) -> Layer:
    if isinstance(first, LinearParams):
        assert isinstance(second, LinearParams)
        return compose_linear(first, second)
    assert isinstance(second, ConvParams)
    return compose(first, second)


def _run_partition(
    nodes: list[fx.Node], layers: list[Layer], only_if_cheaper: bool, cost: LayerCost | None
) -> tuple[tuple[int, int], ...]:
    """The cheapest split of a linear run into parts ``(start, stop)``, each merged into one."""
    price = layer_macs if cost is None else cost
    inputs, outputs = _run_shapes(nodes, layers)
    geometry = _part_geometry(nodes, layers)

    def part_cost(start: int, stop: int) -> float:
        layer = geometry.get((start, stop))
        if layer is None:
            return math.inf  # these layers do not compose into one
        value = price(layer, inputs[start], outputs[stop - 1])
        bad_type = isinstance(value, bool) or not isinstance(value, (int, float))
        if bad_type or math.isnan(value) or (stop - start == 1 and math.isinf(value)):
            kept = " (a layer kept as it is needs a finite cost)" if stop - start == 1 else ""
            raise InvalidArgument(
                f"cost returned {value!r} for {layer!r} on input {inputs[start]} (layers "
                f"{[_name_hint(n) for n in nodes[start:stop]]}){kept}; it must return a real "
                "number, math.inf for a merged layer never to build"
            )
        return float(value)

    joined = {k for k in range(1, len(nodes)) if _same_segment(nodes[k - 1], nodes[k])}
    return cheapest_partition(
        len(nodes), part_cost, joined=joined, fewest_parts=not only_if_cheaper
    )


def _part_geometry(nodes: list[fx.Node], layers: list[Layer]) -> dict[tuple[int, int], Layer]:
    """Every part ``(start, stop)`` of the run that composes into one layer, as its geometry.

    The layers hold ``meta`` tensors (see :func:`fxcompress.depth.partition.composed_geometry`): the
    ``O(n²)`` candidates cost next to nothing; only the chosen parts are composed for real.
    """
    meta = [layer.to(device="meta") for layer in layers]
    parts: dict[tuple[int, int], Layer] = {}
    for start, layer in enumerate(meta):
        parts[start, start + 1] = layer
        for stop in range(start + 2, len(meta) + 1):
            try:
                layer = composed_geometry(layer, meta[stop - 1])
            except ValueError as exc:
                # typically: zero padding of an intermediate map is not expressible in one conv;
                # a longer part contains the same intermediate map
                logger.debug(
                    "not merging %s into %s: %s", nodes[start].name, nodes[stop - 1].name, exc
                )
                break
            parts[start, stop] = layer
    return parts


def _run_shapes(
    nodes: list[fx.Node], layers: list[Layer]
) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """Input and output shape of each layer of a run: as traced, else assumed.

    Without recorded shapes (a module that was not captured), the last layer's output is assumed
    to be ``ASSUMED_SIZE`` along each spatial axis (one row for a linear layer) and the earlier
    shapes follow backwards, so that costs compare per output position of a mid-sized map.
    """
    inputs = [shape_of(nodes[0].args[0]), *(shape_of(n) for n in nodes[:-1])]
    outputs = [shape_of(n) for n in nodes]
    if all(s is not None for s in inputs) and all(s is not None for s in outputs):
        return inputs, outputs  # type: ignore[return-value]
    if isinstance(layers[0], LinearParams):
        return [(1, int(lay.weight.shape[1])) for lay in layers], [
            (1, int(lay.weight.shape[0])) for lay in layers
        ]
    size = [ASSUMED_SIZE] * layers[-1].ndim
    assumed_in, assumed_out = [], []
    for layer in reversed(layers):
        assert isinstance(layer, ConvParams)
        assumed_out.append((1, layer.out_channels, *size))
        size = [
            max(1, (o - 1) * s - 2 * p + d * (k - 1) + 1)
            for o, k, s, p, d in zip(
                size, layer.kernel_size, layer.stride, layer.padding, layer.dilation
            )
        ]
        assumed_in.append((1, layer.in_channels, *size))
    return assumed_in[::-1], assumed_out[::-1]


# --------------------------------------------------------------------------- sums of branches
#
# A sum of branches that each apply a linear map to one tensor x -- a conv, a conv after a Pad,
# a Pad (an identity with padding or crop), a BatchNorm (a depthwise 1x1 conv), or x itself --
# is one conv of x: the sum of the branches' kernels (kernels.add_parallel). fx spells
# ``a + b + c`` as nested adds, ``add(add(a, b), c)``; the outermost add of such a tree sees
# every summand at once, so a three-branch RepVGG block folds in one step and a partial fold
# (the summands of one tensor among others) re-associates the sum.

_AnyLayer = ConvParams | LinearParams | None

#: Summands of one tensor beyond which only the fold of all of them is priced (not subsets).
MAX_SUBSET_SEARCH = 8


@dataclass(frozen=True, eq=False)
class _View:
    """Summand ``term`` (an index) of a sum as the conv ``conv`` of ``source``.

    ``branch`` is the node computing the summand, erased by the fold (``None`` when the
    summand is ``source`` itself, an identity); ``reads`` are the nodes that read ``source``;
    ``is_layer`` says whether ``branch`` is a conv layer (not a Pad or a BatchNorm).
    """

    term: int
    source: fx.Node
    conv: ConvParams
    branch: fx.Node | None
    reads: tuple[fx.Node, ...]
    is_layer: bool = False


_ADD_TARGETS = (operator.add, operator.iadd, torch.add)


def _addends(node: fx.Node) -> tuple[fx.Node, ...] | None:
    """The tensors ``node`` adds: both of a plain add, or one when the other is a constant 0
    (``0 + t``: timm's MobileOne starts its sum with ``scale_out = 0``). ``None`` otherwise."""
    if is_add(node):
        return tuple(node.args)
    if node.op != "call_function" or node.target not in _ADD_TARGETS:
        return None
    if len(node.args) != 2 or node.kwargs:
        return None
    for tensor, other in (node.args, node.args[::-1]):
        zero = isinstance(other, int) and not isinstance(other, bool) and other == 0
        if zero and isinstance(tensor, fx.Node) and _dtype(tensor) == _dtype(node):
            return (tensor,)
    return None


def _sum_tree(root: fx.Node) -> tuple[list[tuple[fx.Node, fx.Node]], list[fx.Node]] | None:
    """The summands of the add tree under ``root`` as ``(node, the add reading it)``, and the
    inner adds (each read only by the add above it, all of one shape). ``None`` if ``root`` is
    no add, the adds broadcast or their shapes are unknown."""
    shape = shape_of(root)
    if shape is None or _addends(root) is None:
        return None
    terms: list[tuple[fx.Node, fx.Node]] = []
    inner: list[fx.Node] = []
    todo = [root]
    while todo:
        add = todo.pop()
        args = _addends(add) or ()
        for arg in args:
            once = sum(a is arg for a in args) == 1
            nested = _addends(arg) is not None and single_user(arg) is add and once
            if nested and shape_of(arg) == shape:
                inner.append(arg)
                todo.append(arg)
            elif shape_of(arg) != shape:
                return None  # a broadcasting add
            else:
                terms.append((arg, add))
    return terms, inner


def _is_inner_add(node: fx.Node) -> bool:
    """Whether ``node`` is an inner add of a larger sum tree (whose root folds it)."""
    user = single_user(node)
    addends = _addends(user) if user is not None else None
    if addends is None or sum(a is node for a in addends) != 1:
        return False
    return shape_of(user) == shape_of(node) and _sum_tree(user) is not None


def _channels(shape: tuple[int, ...] | None, ndim: int) -> int | None:
    """The channel count of a map of ``shape`` read by a conv with ``ndim`` spatial axes."""
    if shape is None:
        return None
    if len(shape) == ndim + 2:
        return shape[1]  # batched (N, C, *spatial)
    if len(shape) == ndim + 1:
        return shape[0]  # unbatched (C, *spatial)
    return None  # e.g. a 1-D tensor: no conv reads it


def _dtype(node: fx.Node) -> torch.dtype:
    meta = node.meta.get("tensor_meta")
    return getattr(meta, "dtype", torch.float32)


def _pad_as_conv(gm: fx.GraphModule, node: fx.Node, ndim: int) -> ConvParams | None:
    """A :class:`Pad` node viewed as an identity conv with that padding (crop if negative)."""
    amounts = pad_of(gm, node)
    if amounts is None or len(amounts) != ndim or not isinstance(node.args[0], fx.Node):
        return None
    channels = _channels(shape_of(node.args[0]), ndim)
    if channels is None:
        return None
    return identity(channels, ndim, dtype=_dtype(node), padding=tuple(amounts))


def _branch_view(
    gm: fx.GraphModule, index: int, node: fx.Node, parent: fx.Node, layer: _AnyLayer, ndim: int
) -> _View | None:
    """The summand ``node`` (computed by ``layer``, if a layer) as a conv of its input: conv,
    Pad -> conv, Pad or BatchNorm."""
    if single_user(node) is not parent or not node.args or not isinstance(node.args[0], fx.Node):
        return None  # read elsewhere too: it must stay
    source = node.args[0]
    if isinstance(layer, ConvParams):
        if layer.ndim != ndim:
            return None
        crop = _pad_as_conv(gm, source, ndim) if single_user(source) is node else None
        if crop is not None:
            # Pad(x) -> conv: a relocated projection shortcut; the pad is folded in too
            try:
                merged = compose(crop, layer)
            except ValueError:
                return None
            return _View(index, source.args[0], merged, node, (source, node), is_layer=True)
        return _View(index, source, layer, node, (node,), is_layer=True)
    bn = batchnorm_call(gm, node)
    if bn is not None:
        if not _bn_rank_fits(bn, node, ndim + 2):
            return None  # unbatched: BatchNorm's axis 1 is not the channel axis
        return _View(index, source, batchnorm_as_conv(ndim, **bn.stats), node, (node,))
    crop = _pad_as_conv(gm, node, ndim)
    if crop is not None:
        return _View(index, source, crop, node, (node,))
    return None


def _term_views(
    gm: fx.GraphModule, index: int, node: fx.Node, parent: fx.Node, layer: _AnyLayer, ndim: int
) -> list[_View]:
    """Summand ``node`` as a conv: of its input (its own branch) and of itself (identity)."""
    views = []
    branch = _branch_view(gm, index, node, parent, layer, ndim)
    if branch is not None:
        views.append(branch)
    channels = _channels(shape_of(node), ndim)
    if channels is not None:
        skip = identity(channels, ndim, dtype=_dtype(node))
        views.append(_View(index, node, skip, None, (parent,)))
    return views


def _sum_ndims(
    gm: fx.GraphModule, terms: list[tuple[fx.Node, fx.Node]], layers: list[_AnyLayer]
) -> list[int]:
    """Numbers of spatial axes under which the summands may be convs (from their layers)."""
    ndims = set()
    for (node, _), layer in zip(terms, layers):
        amounts = pad_of(gm, node)
        bn = batchnorm_call(gm, node)
        shape = shape_of(node)
        if isinstance(layer, ConvParams):
            ndims.add(layer.ndim)
        elif amounts is not None:
            ndims.add(len(amounts))
        elif bn is not None and shape is not None and 3 <= len(shape) <= 5:
            ndims.add(len(shape) - 2)
    return sorted(ndims)


def _try_sum(
    gm: fx.GraphModule, root: fx.Node, only_if_cheaper: bool, cost: LayerCost | None = None
) -> Event | None:
    """Fold the summands of one tensor in the sum tree under ``root`` into one conv.

    Among the summands that are convs of one tensor (its own branches, or the tensor itself),
    the set folded is the one saving the most (by ``cost``, default multiply-accumulates),
    never one that costs more unless a planner put it in ``root``'s segment.
    """
    if _addends(root) is None or _is_inner_add(root):
        return None
    tree = _sum_tree(root)
    if tree is None:
        return None
    terms, inner = tree
    layers = [layer_of(gm, node) for node, _ in terms]
    for ndim in _sum_ndims(gm, terms, layers):
        views = [
            view
            for i, ((node, parent), layer) in enumerate(zip(terms, layers))
            for view in _term_views(gm, i, node, parent, layer, ndim)
        ]
        chosen = _best_fold(gm, root, views, only_if_cheaper, cost)
        if chosen is None:
            continue
        group, merged = chosen
        if _written_during(gm, root, terms, inner, group):
            logger.debug("not folding %s: a tensor it reads is written in place", root.name)
            continue
        return _emit_sum(gm, root, terms, inner, group, merged)
    return None


def _best_fold(
    gm: fx.GraphModule,
    root: fx.Node,
    views: list[_View],
    only_if_cheaper: bool,
    cost: LayerCost | None,
) -> tuple[list[_View], ConvParams] | None:
    """The views to fold (two or more summands of one tensor) and their sum, or ``None``."""
    price = layer_macs if cost is None else cost
    out_shape = shape_of(root)
    by_source: dict[fx.Node, list[_View]] = {}
    for view in views:
        by_source.setdefault(view.source, []).append(view)
    best: tuple[tuple[float, ...], list[_View]] | None = None
    for source, group in by_source.items():
        in_shape = shape_of(source)
        if len(group) < 2 or in_shape is None or out_shape is None:
            continue
        # convs first: the sum takes the dtype of its first operand
        group.sort(key=lambda v: (not v.is_layer, v.term))
        metas = [v.conv.to(device="meta") for v in group]  # geometry only, to price
        alone = [price(m, in_shape, out_shape) for m in metas]
        sizes = range(len(group), 1, -1) if len(group) <= MAX_SUBSET_SEARCH else [len(group)]
        for size in sizes:
            for picked in itertools.combinations(range(len(group)), size):
                subset = [group[i] for i in picked]
                if all(v.branch is None for v in subset):
                    continue  # x + x: nothing to fold
                try:
                    merged = add_parallel(*(metas[i] for i in picked))
                except ValueError:
                    continue  # strides or output sizes differ
                forced = not only_if_cheaper or any(
                    _same_segment(v.branch or v.source, root) for v in subset
                )
                saving = sum(alone[i] for i in picked) - price(merged, in_shape, out_shape)
                if not forced and not saving >= 0:
                    continue  # the summed kernel costs more than the branches
                key = (1, size, saving) if forced else (0, saving, size)
                if best is None or key > best[0]:
                    best = (key, subset)
    if best is None:
        return None
    subset = best[1]
    return subset, add_parallel(*(v.conv for v in subset))


def _written_during(
    gm: fx.GraphModule,
    root: fx.Node,
    terms: list[tuple[fx.Node, fx.Node]],
    inner: list[fx.Node],
    group: list[_View],
) -> bool:
    """Whether an in-place op writes a tensor that the fold reads at another moment.

    The folded conv reads its source once, at ``root``, where the branches read it at their
    own nodes (or at a ``Pad`` feeding them), and the summands left over are read at ``root``
    instead of at their inner adds; so nothing may write the source or a left-over summand
    (or a view of them) between the first of those reads and ``root``, ``root`` included
    (``x.add_(conv(x))`` writes ``x``).
    """
    order = topo_index(gm)
    folded = {v.term for v in group}
    watched = aliases(gm, group[0].source)
    for i, (node, _) in enumerate(terms):
        if i not in folded:
            watched |= aliases(gm, node)
    readers = [root, *inner, *(r for v in group for r in v.reads)]
    first = min(order[n] for n in readers if n in order)
    return any(
        first <= i <= order[root] and mutated_input(gm, node) in watched
        for node, i in order.items()
    )


def _emit_sum(
    gm: fx.GraphModule,
    root: fx.Node,
    terms: list[tuple[fx.Node, fx.Node]],
    inner: list[fx.Node],
    group: list[_View],
    merged: ConvParams,
) -> Event:
    """Replace the summands in ``group`` by one call of ``merged``, keeping the rest of the sum."""
    order = topo_index(gm)
    folded = sorted(group, key=lambda v: v.term)
    names = [_name_hint(terms[v.term][0]) for v in folded]
    convs = [v.branch for v in folded if v.branch is not None and v.is_layer]
    hint = _name_hint(convs[0]) if convs else root.name
    root_name = root.name
    taken = {v.term for v in group}
    rest = [node for i, (node, _) in enumerate(terms) if i not in taken]
    end = root
    if rest:
        # re-associate: (folded summands) + the rest, built where root is; root and its inner
        # adds go (they are read only inside the tree)
        with gm.graph.inserting_before(root):
            sub = _add_chain(gm, [terms[v.term][0] for v in folded], root)
            total = _add_chain(gm, [sub[-1], *rest], root)
        root.replace_all_uses_with(total[-1])
        for node in sorted([root, *inner], key=order.__getitem__, reverse=True):
            gm.graph.erase_node(node)
        end, inner = sub[-1], sub[:-1]
    erased = {v.branch for v in group if v.branch is not None}
    order = topo_index(gm)
    replaced = sorted([*erased, *inner], key=order.__getitem__)
    name = _emit(gm, group[0].source, end, merged, preferred=hint, replaced=replaced)
    return {"kind": "fold_skip", "add": root_name, "branches": names, "into": name}


def _add_chain(gm: fx.GraphModule, nodes: list[fx.Node], like: fx.Node) -> list[fx.Node]:
    """The adds of ``((nodes[0] + nodes[1]) + ...)``, inserted at the current insertion point
    with ``like``'s meta; the last one is the sum."""
    adds = []
    total = nodes[0]
    for node in nodes[1:]:
        total = gm.graph.call_function(operator.add, (total, node))
        total.meta = dict(like.meta)
        adds.append(total)
    return adds


# --------------------------------------------------------------------------- emission


def _emit(
    gm: fx.GraphModule,
    start: fx.Node,
    end: fx.Node,
    params: ConvParams | LinearParams,
    *,
    preferred: str,
    replaced: list[fx.Node] | None = None,
) -> str:
    """Replace the nodes from ``start``'s layer through ``end`` by one call of ``params``.

    ``start`` is either the first replaced layer node (chains, BN folds) or the common input of
    the branches (skip folds, with the replaced branch nodes given in ``replaced``).

    A chain's new node goes where its first layer was (:func:`~fxcompress.graph.util.run_anchor`,
    the rule collapse follows too), so it reads the input at the same moment
    (an in-place op between the two layers may write that input). A skip fold's new node goes
    where the add was; the caller checks that nothing writes the input in between.
    The module at ``preferred`` is overwritten only if nothing else calls or reads it.
    """
    if replaced is None:
        nodes = [start, end]
        source = start.args[0]
        anchor = run_anchor(nodes)  # the emission rule shared with collapse
    else:
        nodes = list(dict.fromkeys([*replaced, end]))  # add(y, y) lists y twice
        source = start
        anchor = end
    module, pad = _to_module(params)
    segment = end.meta.get(SEGMENT)
    is_old = any(n.op == "call_module" and n.target == preferred for n in nodes)
    if is_old and is_unused(gm, preferred, ignore=nodes):
        gm.add_submodule(preferred, module)  # the old module at this path is no longer used
        name = preferred
    else:
        name = install(gm, preferred.replace(".", "_") + ("_site" if is_old else "_merged"), module)
    with gm.graph.inserting_before(anchor):
        x = source
        if pad is not None:
            pad_name = install(gm, preferred.replace(".", "_") + "_crop", pad)
            x = gm.graph.call_module(pad_name, (x,))
        new = gm.graph.call_module(name, (x,))
    new.meta = dict(end.meta)
    if segment is not None:
        new.meta[SEGMENT] = segment
    end.replace_all_uses_with(new)
    for n in [end, *reversed([r for r in nodes if r is not end])]:
        if not n.users:
            gm.graph.erase_node(n)
    return name


def _to_module(params: ConvParams | LinearParams) -> tuple[nn.Module, Pad | None]:
    if isinstance(params, LinearParams):
        return params.to_module(), None
    if all(p >= 0 for p in params.padding):
        return params.to_module(), None
    crop = tuple(min(p, 0) for p in params.padding)
    rest = ConvParams(
        params.weight,
        params.bias,
        stride=params.stride,
        padding=tuple(max(p, 0) for p in params.padding),
        dilation=params.dilation,
        groups=params.groups,
    )
    return rest.to_module(), Pad(crop)


def _name_hint(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_module" else node.name


def _same_segment(a: fx.Node, b: fx.Node) -> bool:
    sa, sb = a.meta.get(SEGMENT), b.meta.get(SEGMENT)
    return sa is not None and sa == sb

