"""Find the chains of mergeable layers in a captured graph (a pure read of the graph).

Vocabulary (see docs/concepts.md):

- A **unit** is a conv or linear layer node, the eval BatchNorm that alone reads it (if any) and
  the activation that alone reads that (if any).
- A **residual** is ``add(branch(x), shortcut(x))`` where the branch is a run of units starting at
  the fork ``x`` and the shortcut is ``x`` itself or one unit without activation; the activation
  that alone reads the add belongs to the residual.
- A **chain** is a maximal sequence of items (units and residuals) in which each item's output is
  read only by the next item. Position ``i`` of a chain sits after its ``i``-th item; a segment
  ``(k, l]`` merges items ``k+1..l`` into one layer, removing the activations inside it.
- A residual's branch is a chain of its own (planned on its own when the residual is kept).

Everything else (pooling, concatenation, gates, reshapes, attention, unknown ops, layers of modules
called at several places) ends chains and is left as it is; :attr:`Analysis.kept` reports it.
The result names nodes and modules by string and holds no ``fx.Node``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import fx

from fxcompress import meta
from fxcompress.depth.segment import MERGE
from fxcompress.graph.recognise import ACTIVATIONS, batchnorm_of, is_add, layer_of, single_user
from fxcompress.graph.util import shape_of
from fxcompress.maths import ConvParams, LinearParams

__all__ = [
    "Analysis",
    "Chain",
    "MergeOption",
    "Residual",
    "Unit",
    "analyze",
    "segment_options",
    "units_of",
]

MAX_SEGMENT_ITEMS = 8
MAX_MERGED_EXTENT = 15
MAX_PRUNABLE_ENUMERATED = 8


@dataclass(frozen=True)
class Unit:
    """One layer with its BatchNorm and activation (node names; ``None`` when absent)."""

    layer: str
    bn: str | None
    act: str | None
    input: str
    output: str
    kind: str  # "conv" | "linear"
    act_kind: str | None
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    weight_l1: float

    @property
    def prunable(self) -> bool:
        """LayerMerge's reducible conv: same channels in and out, stride 1, shape-preserving."""
        return (
            self.kind == "conv"
            and self.in_channels == self.out_channels
            and all(s == 1 for s in self.stride)
            and self.input_shape == self.output_shape
        )

    @property
    def depthwise(self) -> bool:
        return self.kind == "conv" and self.groups == self.in_channels and self.groups > 1

    @property
    def name(self) -> str:
        return self.layer


@dataclass(frozen=True)
class Residual:
    """``act(add(branch(x), shortcut(x)))``; ``shortcut`` is ``None`` for an identity skip."""

    fork: str
    branch: str  # name of the branch's chain
    branch_units: tuple[Unit, ...]
    shortcut: Unit | None
    add: str
    act: str | None
    output: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    act_kind: str | None = None

    @property
    def name(self) -> str:
        return self.add

    @property
    def input(self) -> str:
        return self.fork


Item = Unit | Residual


@dataclass(frozen=True)
class Chain:
    """A maximal series of items; ``parent`` is the residual (add node) whose branch it is."""

    name: str
    items: tuple[Item, ...]
    parent: str | None = None

    def __len__(self) -> int:
        return len(self.items)


@dataclass(frozen=True)
class Analysis:
    """Chains of a captured graph, plus what was left out and why."""

    chains: tuple[Chain, ...]
    kept: tuple[tuple[str, str], ...] = field(default=())  # (node, reason)

    def chain(self, name: str) -> Chain:
        for c in self.chains:
            if c.name == name:
                return c
        raise KeyError(name)

    @property
    def roots(self) -> tuple[Chain, ...]:
        return tuple(c for c in self.chains if c.parent is None)

    def to_dict(self) -> dict[str, object]:
        return {
            "chains": [
                {"name": c.name, "parent": c.parent, "items": [i.name for i in c.items]}
                for c in self.chains
            ],
            "kept": [list(k) for k in self.kept],
        }


def analyze(gm: fx.GraphModule) -> Analysis:
    """Find units, residuals and chains in a captured, canonicalised graph.

    Parameters
    ----------
    gm : torch.fx.GraphModule
        Output of :func:`fxcompress.capture` followed by :func:`fxcompress.canonicalize`.

    Returns
    -------
    Analysis

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from fxcompress.graph.capture import capture
    >>> from fxcompress.graph.canonicalize import canonicalize
    >>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU())
    >>> a = analyze(canonicalize(capture(m, torch.randn(1, 3, 16, 16))))
    >>> [len(c) for c in a.chains]
    [2]
    """
    shared = set(gm.meta.get(meta.SHARED, ()))
    nodes = {n.name: n for n in gm.graph.nodes}
    kept: list[tuple[str, str]] = []

    units: dict[str, Unit] = {}  # by output node name
    for node in gm.graph.nodes:
        unit = _unit_at(gm, node, shared, kept)
        if unit is not None:
            units[unit.output] = unit

    residuals: dict[str, Residual] = {}
    in_residual: set[str] = set()
    for node in gm.graph.nodes:
        res = _residual_at(node, units, nodes)
        if res is not None:
            residuals[res.output] = res
            in_residual.update(u.output for u in res.branch_units)
            if res.shortcut is not None:
                in_residual.add(res.shortcut.output)

    items: dict[str, Item] = {k: u for k, u in units.items() if k not in in_residual}
    items.update(residuals)
    chains = _link(items, nodes)
    branch_chains = [
        Chain(f"{r.add}.branch", _branch_items(r), parent=r.add) for r in residuals.values()
    ]
    covered = _covered_names(items)  # one pass: a per-node scan of all items is O(n^2)
    kept_names = {k for k, _ in kept}
    for node in gm.graph.nodes:
        if (
            node.op in ("call_module", "call_function", "call_method")
            and node.name not in covered
            and node.name not in kept_names
        ):
            kept.append((node.name, "not part of a mergeable chain"))
    ordered = sorted(chains, key=lambda c: _order(c, nodes))
    named = [Chain(f"chain{i}", c.items) for i, c in enumerate(ordered)]
    return Analysis(
        tuple(named + sorted(branch_chains, key=lambda c: _order(c, nodes))), tuple(kept)
    )


def _order(chain: Chain, nodes: dict[str, fx.Node]) -> int:
    order = {n: i for i, n in enumerate(nodes)}
    first = chain.items[0]
    return order[first.layer if isinstance(first, Unit) else first.add]


def _branch_items(res: Residual) -> tuple[Item, ...]:
    return res.branch_units


def _covered_names(items: dict[str, Item]) -> set[str]:
    """Names of the nodes that belong to some item (layers, BNs, activations, residual adds)."""
    names: set[str] = set()
    for item in items.values():
        for unit in units_of(item):
            names.update(n for n in (unit.layer, unit.bn, unit.act) if n is not None)
        if isinstance(item, Residual):
            names.update(n for n in (item.add, item.act) if n is not None)
    return names


def units_of(item: Item) -> Iterator[Unit]:
    """The units of an item: the unit itself, or a residual's branch units and shortcut."""
    if isinstance(item, Unit):
        yield item
    else:
        yield from item.branch_units
        if item.shortcut is not None:
            yield item.shortcut


def _is_act(node: fx.Node) -> bool:
    return (
        node.op == "call_function"
        and any(node.target is f for f in ACTIVATIONS.values())
        and len(node.args) == 1
    )


def _act_kind(node: fx.Node | None) -> str | None:
    if node is None:
        return None
    return next(name for name, f in ACTIVATIONS.items() if node.target is f)


def _unit_at(gm: fx.GraphModule, node: fx.Node, shared: set[str], kept: list) -> Unit | None:
    layer = layer_of(gm, node)
    if layer is None:
        return None
    if node.op == "call_module" and str(node.target) in shared:
        kept.append((node.name, "module called at several places"))
        return None
    in_shape, out_shape = shape_of(node.args[0]), shape_of(node)
    if in_shape is None or out_shape is None:
        kept.append((node.name, "shape unknown"))
        return None
    out = node
    bn = None
    user = single_user(out)
    if user is not None and batchnorm_of(gm, user) is not None:
        mod = batchnorm_of(gm, user)
        if (
            mod is not None
            and mod.num_features == layer.weight.shape[0]
            and (isinstance(layer, ConvParams) or len(out_shape) == 2)
        ):
            bn, out = user, user
    act = None
    user = single_user(out)
    if user is not None and _is_act(user):
        act, out = user, user
    if isinstance(layer, LinearParams):
        kind, k, s, p, d, g = "linear", (), (), (), (), 1
        cin, cout = layer.weight.shape[1], layer.weight.shape[0]
    else:
        kind, k, s, p, d, g = (
            "conv",
            layer.kernel_size,
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.groups,
        )
        cin, cout = layer.in_channels, layer.out_channels
    return Unit(
        layer=node.name,
        bn=None if bn is None else bn.name,
        act=None if act is None else act.name,
        input=node.args[0].name,
        output=out.name,
        kind=kind,
        act_kind=_act_kind(act),
        in_channels=int(cin),
        out_channels=int(cout),
        kernel_size=tuple(k),
        stride=tuple(s),
        padding=tuple(p),
        dilation=tuple(d),
        groups=int(g),
        input_shape=in_shape,
        output_shape=out_shape,
        weight_l1=float(layer.weight.detach().abs().sum()),
    )


def _path_back(
    start: fx.Node, units: dict[str, Unit], stop: fx.Node, nodes: dict[str, fx.Node]
) -> list[Unit] | None:
    """Units ending at ``start`` walking back to ``stop``, each read only by the next."""
    path: list[Unit] = []
    node = start
    while True:
        unit = units.get(node.name)
        if unit is None:
            return None
        path.append(unit)
        inp = nodes[unit.input]
        if inp is stop:
            return list(reversed(path))
        if len(inp.users) != 1:
            return None
        node = inp


def _residual_at(
    node: fx.Node, units: dict[str, Unit], nodes: dict[str, fx.Node]
) -> Residual | None:
    if not is_add(node):
        return None
    u, v = node.args
    if shape_of(u) is None or shape_of(u) != shape_of(v) or len(shape_of(u) or ()) < 3:
        return None
    for branch_end, other in ((u, v), (v, u)):
        fork, shortcut = _shortcut(other, units, nodes)
        if fork is None or len(fork.users) != 2:
            continue
        path = _path_back(branch_end, units, fork, nodes)
        if not path or nodes[path[0].input] is not fork or any(x.kind != "conv" for x in path):
            continue
        if single_user(branch_end) is not node:
            continue
        act = single_user(node)
        act_node = act if act is not None and _is_act(act) else None
        out = act_node if act_node is not None else node
        return Residual(
            fork=fork.name,
            branch=f"{node.name}.branch",
            branch_units=tuple(path),
            shortcut=shortcut,
            add=node.name,
            act=None if act_node is None else act_node.name,
            output=out.name,
            input_shape=shape_of(fork) or (),
            output_shape=shape_of(out) or (),
            act_kind=_act_kind(act_node),
        )
    return None


def _shortcut(
    other: fx.Node, units: dict[str, Unit], nodes: dict[str, fx.Node]
) -> tuple[fx.Node | None, Unit | None]:
    unit = units.get(other.name)
    if unit is not None and unit.act is None and unit.kind == "conv" and len(other.users) == 1:
        return nodes[unit.input], unit
    return other, None


def _entry_users(item: Item) -> set[str]:
    if isinstance(item, Unit):
        return {item.layer}
    first = item.branch_units[0].layer
    return {first, item.shortcut.layer if item.shortcut is not None else item.add}


def _link(items: dict[str, Item], nodes: dict[str, fx.Node]) -> list[Chain]:
    by_input: dict[str, list[Item]] = {}
    for item in items.values():
        by_input.setdefault(item.input, []).append(item)
    succ: dict[str, Item] = {}
    has_pred: set[str] = set()
    for item in items.values():
        out = nodes[item.output]
        for cand in by_input.get(item.output, []):
            if {u.name for u in out.users} == _entry_users(cand) and _compatible(item, cand):
                succ[item.output] = cand
                has_pred.add(cand.output)
    chains = []
    for item in items.values():
        if item.output in has_pred:
            continue
        seq = [item]
        while seq[-1].output in succ:
            seq.append(succ[seq[-1].output])
        chains.append(Chain("", tuple(seq)))
    return chains


def _kind(item: Item) -> str:
    return item.kind if isinstance(item, Unit) else "conv"


def _compatible(a: Item, b: Item) -> bool:
    return _kind(a) == _kind(b)


# --------------------------------------------------------------------------- segment geometry


@dataclass(frozen=True)
class Geometry:
    """Shape of the single layer a segment merges into (for latency tables)."""

    kind: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    groups: int
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]


def kept_units(items: tuple[Item, ...], pruned: frozenset[str]) -> list[Unit]:
    """The units of ``items`` (branches included, shortcuts excluded) that are not pruned."""
    return [u for it in items for u in _path_units(it) if u.layer not in pruned]


def _path_units(item: Item) -> tuple[Unit, ...]:
    return (item,) if isinstance(item, Unit) else item.branch_units


def geometry(items: tuple[Item, ...], pruned: frozenset[str] = frozenset()) -> Geometry | None:
    """Geometry of the merged layer for ``items`` with the ``pruned`` units dropped.

    ``None`` if the segment cannot be merged (mixed kinds, nothing left, or a branch pruned
    away entirely).
    """
    for it in items:
        if isinstance(it, Residual) and all(u.layer in pruned for u in it.branch_units):
            return None
    units = kept_units(items, pruned)
    if not units:
        return None
    first, last = items[0], items[-1]
    if units[0].kind == "linear":
        if any(u.kind != "linear" for u in units) or len(set(map(type, items))) != 1:
            return None
        return Geometry(
            "linear",
            units[0].in_channels,
            units[-1].out_channels,
            (),
            (),
            (),
            1,
            first.input_shape,
            last.output_shape,
        )
    nd = len(units[0].kernel_size)
    extent = [1] * nd
    stride = [1] * nd
    pad = [0] * nd
    for it in items:
        path = [u for u in _path_units(it) if u.layer not in pruned]
        sc = it.shortcut if isinstance(it, Residual) else None
        before = list(stride)
        for u in path:
            for a in range(nd):
                extent[a] += u.dilation[a] * (u.kernel_size[a] - 1) * stride[a]
                pad[a] += u.padding[a] * stride[a]
                stride[a] *= u.stride[a]
        if sc is not None:
            for a in range(nd):
                sc_extent = 1 + sc.dilation[a] * (sc.kernel_size[a] - 1) * before[a]
                extent[a] = max(extent[a], sc_extent)
    groups = _merged_groups(units, items)
    return Geometry(
        "conv",
        units[0].in_channels if not isinstance(first, Residual) else first.input_shape[1],
        last.output_shape[1],
        tuple(extent),
        tuple(stride),
        tuple(pad),
        groups,
        first.input_shape,
        last.output_shape,
    )


def _merged_groups(units: list[Unit], items: tuple[Item, ...]) -> int:
    shortcuts = [it.shortcut for it in items if isinstance(it, Residual) and it.shortcut]
    every = units + shortcuts
    if all(u.depthwise for u in every):
        return every[0].in_channels
    g = every[0].groups
    if g > 1 and all(u.groups == g for u in every):
        return g
    return 1


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class MergeOption:
    """One way to merge a segment: which units are pruned, and the merged geometry."""

    key: str
    pruned: tuple[str, ...]
    geometry: Geometry


def segment_options(items: tuple[Item, ...]) -> list[MergeOption]:
    """Merge options of a segment: prune nothing, or prune reducible units (LayerMerge).

    Among the prune sets giving the same merged geometry, the one keeping the largest total
    L1 weight norm is used (as in LayerMerge). Deterministic order.
    """
    if len(items) > MAX_SEGMENT_ITEMS:
        return []
    prunable = [u for it in items for u in _path_units(it) if u.prunable]
    best: dict[Geometry, tuple[float, tuple[str, ...]]] = {}
    subsets: Iterator[tuple[Unit, ...]]
    if len(prunable) <= MAX_PRUNABLE_ENUMERATED:
        subsets = itertools.chain.from_iterable(
            itertools.combinations(prunable, r) for r in range(len(prunable) + 1)
        )
    else:
        subsets = iter([()])
    for subset in subsets:
        pruned = frozenset(u.layer for u in subset)
        geo = geometry(items, pruned)
        if geo is None or (geo.kind == "conv" and max(geo.kernel_size) > MAX_MERGED_EXTENT):
            continue
        kept_l1 = sum(u.weight_l1 for u in kept_units(items, pruned))
        names = tuple(sorted(pruned))
        prev = best.get(geo)
        if prev is None or (kept_l1, tuple(reversed(names))) > (prev[0], tuple(reversed(prev[1]))):
            best[geo] = (kept_l1, names)
    options = []
    for geo, (_, names) in sorted(best.items(), key=lambda kv: (len(kv[1][1]), kv[1][1])):
        key = MERGE if not names else f"{MERGE}:prune=" + ",".join(names)
        options.append(MergeOption(key, names, geo))
    return options


def macs(geo: Geometry) -> int:
    """Multiply-accumulates of the merged layer."""
    if geo.kind == "linear":
        return math.prod(geo.output_shape[:-1]) * geo.in_channels * geo.out_channels
    per = geo.in_channels // max(geo.groups, 1) * math.prod(geo.kernel_size)
    return geo.output_shape[0] * geo.out_channels * math.prod(geo.output_shape[2:]) * per
