"""Exact merging passes: BatchNorm folding, conv∘conv / linear∘linear merging, skip folding.

Every rewrite here is function-preserving in eval mode (up to floating-point rounding; the maths
runs in float64). Patterns and the reasons they are skipped:

- ``layer -> BN``: folded when the layer's output feeds only the BN (else others would see the
  folded values) and the BN uses running statistics.
- ``BN -> layer`` (a BN that could not be folded into its producer): folded into the layer that
  alone reads it when that layer does not zero-pad (event ``fold_bn_before``).
- ``conv1 -> conv2``: merged into one conv when nothing else reads conv1's output, conv2 does not
  zero-pad (padding of an intermediate map is not a convolution of the input), and — unless both
  nodes carry the same ``meta["fxcompress.segment"]`` chosen by a planner — the merged conv costs
  no more multiply-accumulates than the two it replaces (a depthwise chain turned dense would).
- ``add(convA(x), convB(x))``, ``add(conv(x), x)`` and ``add(conv(x), Pad(x))``: folded into one
  conv (projection shortcut, identity skip, cropped identity) under the same cost rule.
- ``linear1 -> linear2``: merged when the product is no larger than the pair.

A module called from several places is never modified: each rewritten call site gets a new module;
nor is a module overwritten while anything still calls it or reads one of its attributes.
In-place ops are respected: a chain's merged layer reads its input where the first layer did, and
a skip is not folded when its input is written in place between the branches' reads.
"""

from __future__ import annotations

import itertools
import logging
import math
from typing import Any

import torch
from torch import fx, nn

from ._graph import clone, eliminate_dead_code, finalize, install, is_unused, shape_of, topo_index
from .canonicalize import canonicalize
from .errors import InvalidArgument
from .kernels import (
    ConvParams,
    LinearParams,
    add_parallel,
    compose,
    compose_linear,
    fold_bn,
    fold_bn_before,
    identity,
)
from .modules import Pad
from .ops import (
    aliases,
    batchnorm_of,
    bn_statistics,
    is_add,
    layer_of,
    mutated_input,
    pad_of,
    single_user,
)
from .partition import LayerCost, cheapest_partition, composed_geometry, layer_macs

__all__ = ["fold_batchnorm", "merge"]

logger = logging.getLogger("fxcompress.merge")

SEGMENT = "fxcompress.segment"
Event = dict[str, Any]


def fold_batchnorm(gm: fx.GraphModule) -> fx.GraphModule:
    """Return a copy of ``gm`` with every foldable eval-mode BatchNorm folded into its layer.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from fxcompress.capture import capture
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
        parts of least total cost (see :mod:`fxcompress.partition`); with False, into the fewest
        parts. Layers that a planner marked as one segment are merged regardless.
    cost : callable, optional
        ``cost(layer, input_shape, output_shape) -> float`` prices a layer of a linear run (see
        :data:`fxcompress.partition.LayerCost`); default: its multiply-accumulates at the traced
        shape (:func:`fxcompress.partition.layer_macs`). ``latency_cost(table)`` prices it by
        a :class:`~fxcompress.latency.LatencyTable`.

    Returns
    -------
    torch.fx.GraphModule
        ``meta["fxcompress.events"]`` lists each fold and merge.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from fxcompress.capture import capture
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
            "fxcompress.partition.latency_cost(table)"
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
            event = _try_chain(gm, node, only_if_cheaper, cost) or _try_add(
                gm, node, only_if_cheaper
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
    gm.meta["fxcompress.events"] = [*gm.meta.get("fxcompress.events", []), *events]


# --------------------------------------------------------------------------- BatchNorm folding


def _fold_all_bn(gm: fx.GraphModule) -> list[Event]:
    events = []
    for node in list(gm.graph.nodes):
        bn = batchnorm_of(gm, node)
        if bn is None or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        producer = node.args[0]
        if single_user(producer) is not node:
            continue  # the layer's output is read elsewhere too; those readers need it unfolded
        layer = layer_of(gm, producer)
        if layer is None:
            continue  # BN after something that is not a conv/linear layer
        if layer.weight.shape[0] != bn.num_features:
            continue
        if isinstance(layer, LinearParams) and len(shape_of(producer) or ()) != 2:
            continue  # BatchNorm1d on a 3-D linear output normalises another axis
        folded = fold_bn(layer, **bn_statistics(bn))
        name = _emit(gm, producer, node, folded, preferred=_name_hint(producer))
        events.append(
            {"kind": "fold_bn", "layer": _name_hint(producer), "bn": str(node.target), "into": name}
        )
    events += _fold_bn_before(gm)
    return events


def _fold_bn_before(gm: fx.GraphModule) -> list[Event]:
    """Fold a BatchNorm that could not go into its producer into the layer that alone reads it.

    Exact only when that layer does not zero-pad (padding zeros come after the normalisation).
    """
    events = []
    for node in list(gm.graph.nodes):
        if node.graph is not gm.graph:
            continue  # erased in this pass
        bn = batchnorm_of(gm, node)
        if bn is None or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        consumer = single_user(node)
        if consumer is None or not consumer.args or consumer.args[0] is not node:
            continue
        if node in consumer.args[1:] or node in consumer.kwargs.values():
            continue
        layer = layer_of(gm, consumer)
        shape = shape_of(node)
        if layer is None or shape is None:
            continue
        if isinstance(layer, LinearParams):
            if len(shape) != 2 or layer.in_features != bn.num_features:
                continue  # BatchNorm1d normalises axis 1, a linear layer mixes the last one
        elif (
            len(shape) != layer.ndim + 2
            or layer.in_channels != bn.num_features
            or any(p > 0 for p in layer.padding)
        ):
            continue
        folded = fold_bn_before(layer, **bn_statistics(bn))
        name = _emit(gm, node, consumer, folded, preferred=_name_hint(consumer))
        events.append(
            {
                "kind": "fold_bn_before",
                "layer": _name_hint(consumer),
                "bn": str(node.target),
                "into": name,
            }
        )
    return events


# --------------------------------------------------------------------------- chains


def _try_chain(
    gm: fx.GraphModule, node: fx.Node, only_if_cheaper: bool, cost: LayerCost | None = None
) -> Event | None:
    """Merge the part of ``node``'s linear run that begins at ``node``, if it has several layers.

    The run (see :func:`_linear_run`) is split by
    :func:`fxcompress.partition.cheapest_partition`: least total ``cost`` (default:
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

    The layers hold ``meta`` tensors (see :func:`fxcompress.partition.composed_geometry`): the
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


# --------------------------------------------------------------------------- skip folding


def _branch(
    gm: fx.GraphModule, node: fx.Node, add: fx.Node
) -> tuple[fx.Node, ConvParams, bool] | None:
    """View one input of ``add`` as ``(input, conv, erasable)``."""
    if single_user(node) is not add or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    layer = layer_of(gm, node)
    if isinstance(layer, ConvParams):
        source = node.args[0]
        crop = _pad_as_conv(gm, source, layer.in_channels, layer.weight.dtype)
        if crop is not None and single_user(source) is node:
            # Pad(x) -> conv: a relocated projection shortcut; the pad is folded in too
            try:
                return source.args[0], compose(crop, layer), True
            except ValueError:
                return None
        return source, layer, True
    shape = shape_of(node.args[0])
    crop = _pad_as_conv(gm, node, shape[1] if shape else 0, _dtype(node))
    if crop is not None:
        return node.args[0], crop, True
    return None


def _dtype(node: fx.Node) -> torch.dtype:
    meta = node.meta.get("tensor_meta")
    return getattr(meta, "dtype", torch.float32)


def _pad_as_conv(
    gm: fx.GraphModule, node: fx.Node, channels: int, dtype: torch.dtype
) -> ConvParams | None:
    """A :class:`Pad` node viewed as an identity conv with that padding (crop if negative)."""
    amounts = pad_of(gm, node)
    if amounts is None or channels <= 0 or not isinstance(node.args[0], fx.Node):
        return None
    return identity(channels, len(amounts), dtype=dtype, padding=tuple(amounts))


def _try_add(gm: fx.GraphModule, add: fx.Node, only_if_cheaper: bool) -> Event | None:
    if not is_add(add):
        return None
    u, v = add.args
    shape = shape_of(u)
    if shape is None or shape != shape_of(v):
        return None  # broadcasting add, or unknown shapes
    # each input viewed as a conv of some tensor: its own branch (conv, Pad, Pad -> conv), or
    # itself through an identity; fold the first pair that reads one tensor and is worth it
    options = [_views(gm, n, add, shape) for n in (u, v)]
    for (xu, cu, eu), (xv, cv, ev) in itertools.product(*options):
        if xu is not xv or not (eu or ev):
            continue  # different tensors, or x + x (nothing to fold)
        event = _fold_pair(gm, add, shape, (u, xu, cu, eu), (v, xv, cv, ev), only_if_cheaper)
        if event is not None:
            return event
    return None


def _views(
    gm: fx.GraphModule, node: fx.Node, add: fx.Node, shape: tuple[int, ...]
) -> list[tuple[fx.Node, ConvParams, bool]]:
    """``node`` as ``(input, conv, erasable)``: its own branch first, then itself as identity."""
    views = []
    branch = _branch(gm, node, add)
    if branch is not None:
        views.append(branch)
    if len(shape) >= 3:
        views.append((node, identity(shape[1], len(shape) - 2, dtype=_dtype(add)), False))
    return views


def _fold_pair(
    gm: fx.GraphModule,
    add: fx.Node,
    shape: tuple[int, ...],
    first: tuple[fx.Node, fx.Node, ConvParams, bool],
    second: tuple[fx.Node, fx.Node, ConvParams, bool],
    only_if_cheaper: bool,
) -> Event | None:
    (nu, xu, cu, eu), (nv, _, cv, ev) = first, second
    u, v = add.args
    try:
        merged = add_parallel(cu, cv)
    except ValueError as exc:
        logger.debug("not folding %s: %s", add.name, exc)
        return None
    forced = _same_segment(nu, add) or _same_segment(nv, add)
    if only_if_cheaper and not forced:
        before = _conv_macs(cu, shape) + _conv_macs(cv, shape)
        if _conv_macs(merged, shape) > before:
            return None
    replaced = [n for n, erase in ((nu, eu), (nv, ev)) if erase]
    if _written_between(gm, xu, replaced, add):
        logger.debug("not folding %s: its input is written in place in between", add.name)
        return None
    convs = [n for n in replaced if layer_of(gm, n) is not None]
    hint = _name_hint(convs[0]) if convs else add.name
    name = _emit(gm, xu, add, merged, preferred=hint, replaced=replaced)
    return {
        "kind": "fold_skip",
        "add": add.name,
        "branches": [_name_hint(n) for n in (u, v)],
        "into": name,
    }


def _written_between(gm: fx.GraphModule, x: fx.Node, branches: list[fx.Node], add: fx.Node) -> bool:
    """Whether an in-place op writes ``x`` (or a view of it) while the branches read it.

    The branches read ``x`` at their own nodes (or at a ``Pad`` feeding them) and an identity
    branch reads it at ``add``; one merged conv can read it only once. ``add`` itself counts
    when it writes its first argument in place and that argument is ``x`` (``x.add_(conv(x))``).
    """
    order = topo_index(gm)
    readers = [*branches, add]
    readers += [n.args[0] for n in branches if n.args and n.args[0] is not x]
    first = min(order[n] for n in readers if isinstance(n, fx.Node) and n in order)
    shared = aliases(gm, x)
    for node, i in order.items():
        if first <= i <= order[add] and mutated_input(gm, node) in shared:
            return True
    return False


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

    A chain's new node goes where its first layer was, so it reads the input at the same moment
    (an in-place op between the two layers may write that input). A skip fold's new node goes
    where the add was; the caller checks that nothing writes the input in between.
    The module at ``preferred`` is overwritten only if nothing else calls or reads it.
    """
    if replaced is None:
        nodes = [start, end]
        source = start.args[0]
        anchor = start
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


def _conv_macs(params: ConvParams, out_shape: tuple[int, ...] | None) -> float:
    if out_shape is None:
        return math.inf
    spatial = math.prod(out_shape[2:]) if len(out_shape) > 2 else 1
    per_output = params.weight.shape[1] * math.prod(params.kernel_size)
    return float(out_shape[0] * params.out_channels * spatial * per_output)
