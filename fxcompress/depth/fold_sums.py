"""Sum folds (skip connections and structural re-parameterisation): the summands of one tensor
in a tree of adds folded into one conv.

A sum of branches that each apply a linear map to one tensor x -- a conv, a conv after a Pad,
a Pad (an identity with padding or crop), a BatchNorm (a depthwise 1x1 conv), or x itself --
is one conv of x: the sum of the branches' kernels (:func:`fxcompress.maths.add_parallel`).
fx spells ``a + b + c`` as nested adds, ``add(add(a, b), c)``; the outermost add of such a tree
sees every summand at once, so a three-branch RepVGG block folds in one step and a partial fold
(the summands of one tensor among others) re-associates the sum.
"""

from __future__ import annotations

import itertools
import logging
import operator
from dataclasses import dataclass

import torch
from torch import fx

from fxcompress.depth.emission import Event, emit, name_hint, same_segment
from fxcompress.depth.fold_batchnorms import batchnorm_rank_fits
from fxcompress.depth.partition import LayerCost, layer_macs
from fxcompress.graph.aliasing import aliases, mutated_input
from fxcompress.graph.recognise import batchnorm_call, is_add, layer_of, pad_of, single_user
from fxcompress.graph.util import shape_of, topo_index
from fxcompress.maths import (
    ConvParams,
    LinearParams,
    add_parallel,
    batchnorm_as_conv,
    compose,
    identity,
)

__all__ = ["MAX_SUBSET_SEARCH", "try_fold_sum"]

logger = logging.getLogger("fxcompress.merge")

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
        if not batchnorm_rank_fits(bn, node, ndim + 2):
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


def try_fold_sum(
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
                    same_segment(v.branch or v.source, root) for v in subset
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
    names = [name_hint(terms[v.term][0]) for v in folded]
    convs = [v.branch for v in folded if v.branch is not None and v.is_layer]
    hint = name_hint(convs[0]) if convs else root.name
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
    name = emit(gm, group[0].source, end, merged, preferred=hint, replaced=replaced)
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
