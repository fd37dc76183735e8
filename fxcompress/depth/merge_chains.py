"""Chain merges: a linear run of convs (or of linear layers), each read only by the next, split
into the parts of least total cost (:mod:`fxcompress.depth.partition`), each merged into one
layer.
"""

from __future__ import annotations

import logging
import math

from torch import fx

from fxcompress.depth.emission import Event, Layer, emit, name_hint, same_segment
from fxcompress.depth.partition import LayerCost, cheapest_partition, composed_geometry, layer_macs
from fxcompress.errors import InvalidArgument
from fxcompress.graph.recognise import layer_of, single_user
from fxcompress.graph.util import shape_of
from fxcompress.maths import ConvParams, LinearParams, compose, compose_linear

__all__ = ["ASSUMED_SIZE", "try_merge_chain"]

logger = logging.getLogger("fxcompress.merge")


def try_merge_chain(
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
    names = [name_hint(n) for n in part]
    merged = layers[start]
    for layer in layers[start + 1 : stop]:
        merged = _compose_layers(merged, layer)
    # one node where the part's first layer was: it reads the run's input at the same moment
    name = emit(gm, part[0], part[-1], merged, preferred=names[0])
    if len(part) > 2:
        for inner in reversed(part[:-1]):  # each read only by the next, which is gone
            gm.graph.erase_node(inner)
    event: Event = {"kind": "merge", "layers": names, "into": name}
    if isinstance(merged, ConvParams):
        event["kernel_size"] = list(merged.kernel_size)
        event["groups"] = merged.groups
    return event


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
                f"{[name_hint(n) for n in nodes[start:stop]]}){kept}; it must return a real "
                "number, math.inf for a merged layer never to build"
            )
        return float(value)

    joined = {k for k in range(1, len(nodes)) if same_segment(nodes[k - 1], nodes[k])}
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
