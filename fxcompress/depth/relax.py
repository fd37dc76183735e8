"""Relax a captured graph according to planned segments (graph surgery only).

For every segment that merges more than one item (or merges a residual whole) the relaxed graph:

1. drops the activations inside the segment (the one at its end stays);
2. drops the pruned units (conv and BN), wiring their input straight through;
3. moves all zero padding of the segment onto the convs that read the segment's input
   (``p = p1 + s1*p2 + s1*s2*p3 + ...`` per axis) and sets every later conv's padding to 0; a
   shortcut inside the segment gets a :class:`~fxcompress.graph.modules.Pad` (or padding) that
   aligns it with the grown intermediate maps;
4. tags every node of the segment with ``meta["fxcompress.segment"]`` so that :func:`merge`
   merges the segment into one layer.

The relaxed module computes, in eval mode, exactly what its merged form computes; BatchNorm is
kept, so it can be fine-tuned.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx

from fxcompress.depth.analysis import Analysis, Item, Residual, Unit
from fxcompress.depth.segment import DROP, KEEP, Segment
from fxcompress.graph.capture import propagate_shapes
from fxcompress.graph.modules import Pad
from fxcompress.graph.util import finalize, install, shallow_clone
from fxcompress.meta import SEGMENT

__all__ = ["apply_choices", "apply_segments"]


def apply_segments(
    gm: fx.GraphModule,
    analysis: Analysis,
    segments: Iterable[tuple[str, int, int, tuple[str, ...]]],
    *,
    drops: Iterable[tuple[str, int]] = (),
    record_shapes: bool = True,
) -> fx.GraphModule:
    """Return a relaxed copy of ``gm`` with each ``(chain, start, stop, pruned)`` segment relaxed.

    Each ``(chain, index)`` of ``drops`` names a residual whose branch is removed: the block
    becomes its shortcut followed by its final activation. ``gm`` must be the canonicalised
    graph ``analysis`` was computed from. With ``record_shapes`` the relaxed (larger) shapes are
    re-recorded in ``node.meta`` by one run on zeros of the captured input shapes; :func:`merge`
    needs them.
    """
    gm = shallow_clone(gm)  # modules are shared with ``gm``; changed ones are copied first
    nodes = _Nodes(gm.graph)
    for chain_name, index in drops:
        item = analysis.chain(chain_name).items[index]
        if not isinstance(item, Residual):
            raise ValueError(f"item {index} of chain {chain_name!r} is not a residual: {item!r}")
        _drop_branch(nodes, item)
    for chain_name, start, stop, pruned in segments:
        items = analysis.chain(chain_name).items[start:stop]
        tag = f"{chain_name}:{start}-{stop}"
        _relax_segment(gm, nodes, items, frozenset(pruned), tag)
    finalize(gm)
    if record_shapes:
        _reshape(gm)
    return gm


def apply_choices(
    gm: fx.GraphModule,
    analysis: Analysis,
    choices: Iterable[Segment | tuple[str, int, int, str, tuple[str, ...]]],
    *,
    record_shapes: bool = True,
) -> fx.GraphModule:
    """:func:`apply_segments` for planned :class:`~fxcompress.depth.segment.Segment` s (or their
    tuples ``(chain, start, stop, key, pruned)``).

    ``"keep"`` changes nothing, ``"drop"`` drops the residual's branch, every other key relaxes
    the segment.
    """
    planned = [Segment(*choice) for choice in choices]
    segments = [(c.chain, c.start, c.stop, c.pruned) for c in planned if c.key not in (KEEP, DROP)]
    drops = [(c.chain, c.start) for c in planned if c.key == DROP]
    return apply_segments(gm, analysis, segments, drops=drops, record_shapes=record_shapes)


class _Nodes:
    """Look nodes up by their captured name, following every replacement made since.

    Relaxing erases nodes (a dropped activation, a pruned conv and its BatchNorm) and wires their
    users to what replaced them. An analysis name may stand for a node erased in a later step
    (an activation mapped to its BatchNorm, which a pruning then erases; the activation being a
    residual's fork), so a look-up follows the chain of replacements to the node standing for it
    now, never to an erased one.
    """

    def __init__(self, graph: fx.Graph) -> None:
        self._by_name = {n.name: n for n in graph.nodes}
        self._moved: dict[fx.Node, fx.Node] = {}

    def __getitem__(self, name: str) -> fx.Node:
        node = self._by_name[name]
        while node in self._moved:
            node = self._moved[node]
        return node

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def replace(self, node: fx.Node, by: fx.Node) -> None:
        """Wire the users of ``node`` to ``by`` and erase ``node``."""
        node.replace_all_uses_with(by)
        self._moved[node] = by
        node.graph.erase_node(node)


def _reshape(gm: fx.GraphModule) -> None:
    """Re-record shapes (the relaxed intermediate maps are larger) from the placeholders' specs."""
    inputs = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        meta = node.meta.get("tensor_meta")
        if meta is None:
            return  # not captured by fxcompress: leave shapes as they are
        inputs.append(torch.zeros(meta.shape, dtype=meta.dtype))
    propagate_shapes(gm, tuple(inputs))


def _relax_segment(
    gm: fx.GraphModule,
    nodes: _Nodes,
    items: tuple[Item, ...],
    pruned: frozenset[str],
    tag: str,
) -> None:
    last = len(items) - 1
    for i, item in enumerate(items):
        if isinstance(item, Residual):
            for u in item.branch_units:
                _drop(nodes, u.act)
        if i < last:
            _drop(nodes, item.act)
    for item in items:
        for unit in _path(item):
            if unit.layer in pruned:
                _prune(nodes, unit)
    _relocate(gm, nodes, items, pruned, tag)


def _path(item: Item) -> tuple[Unit, ...]:
    return (item,) if isinstance(item, Unit) else item.branch_units


def _drop(nodes: _Nodes, name: str | None) -> None:
    if name is None:
        return
    node = nodes[name]
    nodes.replace(node, node.args[0])


def _drop_branch(nodes: _Nodes, res: Residual) -> None:
    """``act(branch(x) + shortcut(x))`` becomes ``act(shortcut(x))``; the branch is dead code."""
    shortcut = nodes[res.fork] if res.shortcut is None else nodes[res.shortcut.output]
    nodes.replace(nodes[res.add], shortcut)


def _prune(nodes: _Nodes, unit: Unit) -> None:
    conv = nodes[unit.layer]
    source = conv.args[0]
    if unit.bn is not None:
        nodes.replace(nodes[unit.bn], source)
    nodes.replace(conv, source)


def _relocate(
    gm: fx.GraphModule,
    nodes: _Nodes,
    items: tuple[Item, ...],
    pruned: frozenset[str],
    tag: str,
) -> None:
    kept = [u for it in items for u in _path(it) if u.layer not in pruned]
    if not kept or kept[0].kind != "conv":
        for it in items:
            for u in _path(it):
                _tag(nodes, (u.layer, u.bn), tag)
        return
    nd = len(kept[0].kernel_size)
    # natural border (extra positions per side) of each map, walking back from the segment end
    e = (0,) * nd
    plan: list[tuple[Unit, tuple[int, ...], tuple[int, ...]]] = []  # unit, e_in, e_out
    shortcuts: list[tuple[Residual, tuple[int, ...], tuple[int, ...]]] = []  # res, e_join, e_fork
    for it in reversed(items):
        if isinstance(it, Residual):
            e_join = e
            for u in reversed(it.branch_units):
                e = _back(plan, u, e, pruned)
            shortcuts.append((it, e_join, e))
        else:
            e = _back(plan, it, e, pruned)
    # what now stands for the segment's input (a dropped branch before it leaves its shortcut)
    entry = nodes[items[0].input]
    zero = (0,) * nd
    for unit, e_in, e_out in plan:
        reads_entry = nodes[unit.layer].args[0] is entry
        actual_in = zero if reads_entry else e_in
        pad = tuple(
            p + s * eo - ai for p, s, eo, ai in zip(unit.padding, unit.stride, e_out, actual_in)
        )
        _set_padding(gm, nodes[unit.layer], pad)
        _tag(nodes, (unit.layer, unit.bn), tag)
    for res, e_join, e_fork in shortcuts:
        # a pruned layer before the residual leaves its fork reading the segment's entry
        actual_fork = zero if nodes[res.fork] is entry else e_fork
        add = nodes[res.add]
        _tag(nodes, (res.add,), tag)
        if res.shortcut is None:
            amounts = tuple(j - f for j, f in zip(e_join, actual_fork))
            if any(amounts):
                fork = nodes[res.fork]
                with gm.graph.inserting_before(add):
                    name = install(gm, res.add + "_align", Pad(amounts))
                    pad_node = gm.graph.call_module(name, (fork,))
                pad_node.meta[SEGMENT] = tag
                add.args = tuple(pad_node if a is fork else a for a in add.args)
            continue
        sc = res.shortcut
        pad = tuple(p + s * j - f for p, s, j, f in zip(sc.padding, sc.stride, e_join, actual_fork))
        conv = nodes[sc.layer]
        _tag(nodes, (sc.layer, sc.bn), tag)
        if all(p >= 0 for p in pad):
            _set_padding(gm, conv, pad)
            continue
        _set_padding(gm, conv, tuple(max(p, 0) for p in pad))
        with gm.graph.inserting_before(conv):
            name = install(gm, res.add + "_align", Pad(tuple(min(p, 0) for p in pad)))
            pad_node = gm.graph.call_module(name, (conv.args[0],))
        pad_node.meta[SEGMENT] = tag
        conv.args = (pad_node, *conv.args[1:])


def _back(
    plan: list[Any], unit: Unit, e_out: tuple[int, ...], pruned: frozenset[str]
) -> tuple[int, ...]:
    if unit.layer in pruned:
        return e_out
    e_in = tuple(p + s * e for p, s, e in zip(unit.padding, unit.stride, e_out))
    plan.append((unit, e_in, e_out))
    return e_in


def _tag(nodes: _Nodes, names: Iterable[str | None], tag: str) -> None:
    for name in names:
        if name is not None and name in nodes:
            nodes[name].meta[SEGMENT] = tag


def _set_padding(gm: fx.GraphModule, node: fx.Node, pad: tuple[int, ...]) -> None:
    if node.op == "call_module":
        mod = copy.deepcopy(gm.get_submodule(str(node.target)))
        gm.add_submodule(str(node.target), mod)
        mod.padding = tuple(int(p) for p in pad)
        mod._reversed_padding_repeated_twice = [p for p in reversed(pad) for _ in range(2)]
        return
    args = list(node.args)
    if len(args) > 4:
        args[4] = tuple(pad)
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, "padding": tuple(pad)}
