"""Find repeated residual blocks in a captured graph (a pure read of the graph).

A **residual region** is everything between a fork ``F`` and an ``add`` node ``J`` that reads
two tensors descending from ``F``: the nodes on paths ``F -> J`` plus side nodes that only read
the region (``torch._assert`` checks). It must be single-entry, single-exit: every user of ``F``
and of every inner node lies in the region, and inner nodes read nothing from outside but
parameters. Parameter-free, shape-preserving unary ops that alone read ``J`` (the ReLU after a
ResNet add) belong to the region as its *tail*.

Regions whose fork is the previous region's output form a **run** (a residual trunk). A run is cut
into **blocks** of ``p`` consecutive regions, ``p`` and the offset chosen to cover the most regions
by blocks equal to a neighbour (``p = 1`` for ResNets, ``p = 2`` for pre-norm transformers whose
attention and MLP halves are separate regions).

Two blocks play the **same role** when their *signatures* are equal: the same node kinds in the
same order, with the same module types, parameter shapes, constants, tensor shapes and wiring.
Nothing here is specific to an architecture. Results name nodes and modules by string.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import fx, nn

from fxcompress.graph.recognise import activation_of, is_add, module_call_counts
from fxcompress.graph.util import shape_of

__all__ = ["Block", "Blocks", "find_blocks"]

MAX_PERIOD = 4
_PASS_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity)
_PASS_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d)
_PROXY = re.compile(r"Proxy\([^)]*\)")


@dataclass(frozen=True)
class Block:
    """One residual block: its nodes (graph order), input/output nodes and parameter slots.

    ``slots`` are the qualified names of the modules (``call_module`` with parameters or buffers)
    and attributes (``get_attr``) the block uses, in the order of first use; two blocks with the
    same ``signature`` correspond slot by slot. ``private`` says whether no slot is used outside
    the block (required to rewrite the block's parameters).
    """

    name: str
    nodes: tuple[str, ...]
    input: str
    output: str
    signature: str
    slots: tuple[str, ...]
    slot_kinds: tuple[str, ...]  # "module" | "attr"
    params: int
    private: bool
    run: int
    position: int  # index of the block within its run
    same_shape: bool  # output shape equals input shape


@dataclass(frozen=True)
class Blocks:
    """The residual blocks of a graph, grouped by role."""

    blocks: tuple[Block, ...]

    def groups(self) -> dict[str, tuple[Block, ...]]:
        """Blocks by signature (only signatures held by two or more blocks)."""
        out: dict[str, list[Block]] = {}
        for b in self.blocks:
            out.setdefault(b.signature, []).append(b)
        return {k: tuple(v) for k, v in out.items() if len(v) > 1}

    def by_name(self, name: str) -> Block:
        for b in self.blocks:
            if b.name == name:
                return b
        raise KeyError(name)


@dataclass(frozen=True)
class _Region:
    fork: fx.Node
    nodes: tuple[fx.Node, ...]  # graph order, tail included
    output: fx.Node


def find_blocks(gm: fx.GraphModule) -> Blocks:
    """Find the residual blocks of a captured graph and their roles.

    Parameters
    ----------
    gm : torch.fx.GraphModule
        A graph from :func:`fxcompress.capture` (shapes recorded in ``node.meta``).

    Returns
    -------
    Blocks

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from fxcompress.graph.capture import capture
    >>> class Res(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc = nn.Linear(4, 4)
    ...     def forward(self, x):
    ...         return torch.relu(x + self.fc(x))
    >>> m = nn.Sequential(Res(), Res(), Res())
    >>> found = find_blocks(capture(m, torch.randn(2, 4)))
    >>> [b.slots for b in found.blocks]
    [('0.fc',), ('1.fc',), ('2.fc',)]
    >>> len(set(b.signature for b in found.blocks))
    1
    """
    regions = _regions(gm)
    runs = _runs(regions)
    counts = module_call_counts(gm)
    attr_uses = Counter(str(n.target) for n in gm.graph.nodes if n.op == "get_attr")
    blocks: list[Block] = []
    for r, run in enumerate(runs):
        sigs = [_signature(gm, reg.nodes, reg.fork) for reg in run]
        for pos, (start, stop) in enumerate(_segment(sigs)):
            part = run[start:stop]
            nodes = tuple(n for reg in part for n in reg.nodes)
            nodes = _with_attrs(nodes)
            blocks.append(
                _make_block(gm, nodes, part[0].fork, part[-1].output, r, pos, counts, attr_uses)
            )
    return Blocks(tuple(blocks))


# --------------------------------------------------------------------------- regions


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if a.op != "get_attr"]


def _regions(gm: fx.GraphModule) -> list[_Region]:
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    anc: dict[fx.Node, int] = {}  # bitmask of (non-parameter) ancestors
    for n in nodes:
        mask = 0
        for a in _tensor_inputs(n):
            mask |= anc[a] | (1 << index[a])
        anc[n] = mask
    found: list[_Region] = []
    for j in nodes:
        if not is_add(j):
            continue
        a, b = j.args
        common = (anc[a] | (1 << index[a])) & (anc[b] | (1 << index[b]))
        if not common:
            continue  # e.g. adding a parameter: nothing forks
        fork = nodes[common.bit_length() - 1]
        region = _region_between(nodes, index, anc, fork, j)
        if region is not None:
            found.append(region)
    unique: dict[frozenset[fx.Node], _Region] = {}
    for r in found:  # regions may nest (a skip around a whole trunk): all are kept
        unique.setdefault(frozenset(r.nodes), r)
    return list(unique.values())


def _region_between(
    nodes: list[fx.Node],
    index: dict[fx.Node, int],
    anc: dict[fx.Node, int],
    fork: fx.Node,
    join: fx.Node,
) -> _Region | None:
    f, j = index[fork], index[join]
    core = {n for n in nodes[f + 1 : j] if anc[n] >> f & 1 and anc[join] >> index[n] & 1}
    core.add(join)
    inside = set(core)
    for n in nodes[f + 1 : j]:  # side nodes: read only the region (shape checks, asserts)
        if (
            n not in inside
            and n.op != "get_attr"
            and _tensor_inputs(n)
            and all(a in inside or a is fork for a in _tensor_inputs(n))
        ):
            inside.add(n)
    for n in inside:
        if n is not join and any(u not in inside for u in n.users):
            return None  # an inner value escapes: not a single-exit block
        if any(a not in inside and a is not fork for a in _tensor_inputs(n)):
            return None  # reads a value from outside: not a single-entry block
    if any(u not in inside for u in fork.users):
        return None  # the fork feeds something else too
    if not any(n.op == "call_module" or n.op == "call_function" for n in core - {join}):
        return None
    out = join
    tail = []
    while len(out.users) == 1:
        user = next(iter(out.users))
        if not _is_plain_unary(user, out):
            break
        tail.append(user)
        out = user
    ordered = tuple(sorted(inside, key=index.__getitem__)) + tuple(tail)
    return _Region(fork, ordered, out)


def _is_plain_unary(node: fx.Node, source: fx.Node) -> bool:
    """An elementwise op of ``source`` alone (activation, dropout, identity)."""
    return node.all_input_nodes == [source] and is_elementwise(node.graph.owning_module, node)


def is_elementwise(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` is an activation, a dropout or an identity of one tensor."""
    if len(node.all_input_nodes) != 1:
        return False
    if activation_of(gm, node) is not None:
        return True
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))) in _PASS_MODULES
    return node.op == "call_function" and node.target in _PASS_FUNCTIONS


def _runs(regions: list[_Region]) -> list[list[_Region]]:
    by_fork: dict[fx.Node, _Region] = {}
    for r in sorted(regions, key=lambda r: -len(r.nodes)):
        by_fork[r.fork] = r  # of nested regions starting at one fork, the innermost continues
    succ = {id(r): by_fork[r.output] for r in regions if r.output in by_fork}
    has_pred = {id(s) for s in succ.values()}
    runs = []
    for r in regions:
        if id(r) in has_pred:
            continue
        run = [r]
        while id(run[-1]) in succ and len(run) <= len(regions):
            run.append(succ[id(run[-1])])
        runs.append(run)
    return runs


def _segment(sigs: list[str]) -> list[tuple[int, int]]:
    """Cut a run into blocks of ``p`` regions: the (p, offset) covering most repeated blocks."""
    n = len(sigs)
    best = (0, 1, 0)  # coverage, p, offset
    for p in range(1, min(MAX_PERIOD, n // 2) + 1):
        for o in range(p):
            wins = [tuple(sigs[s : s + p]) for s in range(o, n - p + 1, p)]
            cover = sum(
                p
                for k, w in enumerate(wins)
                if (k > 0 and wins[k - 1] == w) or (k + 1 < len(wins) and wins[k + 1] == w)
            )
            if cover > best[0]:
                best = (cover, p, o)
    _, p, o = best
    cuts = [(i, i + 1) for i in range(o)]
    s = o
    while s + p <= n:
        cuts.append((s, s + p))
        s += p
    cuts += [(i, i + 1) for i in range(s, n)]
    return cuts


# --------------------------------------------------------------------------- signatures


def _with_attrs(nodes: tuple[fx.Node, ...]) -> tuple[fx.Node, ...]:
    """``nodes`` with the ``get_attr`` nodes they read put first (in first-use order)."""
    attrs: list[fx.Node] = []
    for n in nodes:
        for a in n.all_input_nodes:
            if a.op == "get_attr" and a not in attrs:
                attrs.append(a)
    return (*attrs, *nodes)


def _module_key(mod: nn.Module) -> tuple[Any, ...]:
    params = tuple((k, tuple(v.shape), str(v.dtype)) for k, v in mod.named_parameters())
    buffers = tuple(
        (k, tuple(v.shape), str(v.dtype)) for k, v in mod.named_buffers() if v is not None
    )
    return (type(mod).__qualname__, mod.extra_repr(), params, buffers, mod.training)


def _encode(arg: Any, local: dict[fx.Node, int], fork: fx.Node) -> Any:
    if isinstance(arg, fx.Node):
        if arg is fork:
            return "IN"
        return ("n", local[arg]) if arg in local else ("ext", arg.name)
    if isinstance(arg, (tuple, list)):
        return (type(arg).__name__, tuple(_encode(a, local, fork) for a in arg))
    if isinstance(arg, dict):
        return tuple((k, _encode(v, local, fork)) for k, v in sorted(arg.items()))
    return _PROXY.sub("Proxy", repr(arg))  # messages formatted at trace time name proxies


def _target_key(gm: fx.GraphModule, node: fx.Node, first_use: dict[str, int]) -> Any:
    if node.op == "call_module":
        target = str(node.target)
        return ("m", _module_key(gm.get_submodule(target)), first_use[target])
    if node.op == "get_attr":
        value = attr(gm, str(node.target))
        shape = tuple(value.shape) if hasattr(value, "shape") else repr(value)
        return ("a", shape, first_use[str(node.target)])
    if node.op == "call_function":
        return ("f", getattr(node.target, "__module__", ""), getattr(node.target, "__name__", ""))
    return (node.op, str(node.target))


def _signature(gm: fx.GraphModule, nodes: Iterable[fx.Node], fork: fx.Node) -> str:
    nodes = _with_attrs(tuple(nodes))
    local = {n: i for i, n in enumerate(nodes)}
    first_use: dict[str, int] = {}
    for i, n in enumerate(nodes):
        if n.op in ("call_module", "get_attr"):
            first_use.setdefault(str(n.target), i)
    parts = [("in", shape_of(fork))]
    for n in nodes:
        parts.append(
            (
                _target_key(gm, n, first_use),
                _encode(n.args, local, fork),
                _encode(dict(n.kwargs), local, fork),
                shape_of(n),
            )
        )
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:12]


def attr(gm: fx.GraphModule, target: str) -> Any:
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _slots(gm: fx.GraphModule, nodes: tuple[fx.Node, ...]) -> Iterator[tuple[str, str]]:
    seen: set[str] = set()
    for n in nodes:
        target = str(n.target)
        if target in seen:
            continue
        if n.op == "call_module":
            mod = gm.get_submodule(target)
            if any(True for _ in mod.parameters()) or any(True for _ in mod.buffers()):
                seen.add(target)
                yield target, "module"
        elif n.op == "get_attr":
            seen.add(target)
            yield target, "attr"


def _make_block(
    gm: fx.GraphModule,
    nodes: tuple[fx.Node, ...],
    fork: fx.Node,
    output: fx.Node,
    run: int,
    position: int,
    counts: dict[str, int],
    attr_uses: dict[str, int],
) -> Block:
    slots = list(_slots(gm, nodes))
    inner_calls: dict[str, int] = {}
    for n in nodes:
        if n.op in ("call_module", "get_attr"):
            inner_calls[str(n.target)] = inner_calls.get(str(n.target), 0) + 1
    private = all(
        inner_calls[t] == (counts.get(t, 0) if kind == "module" else attr_uses.get(t, 0))
        for t, kind in slots
    )
    params = 0
    for t, kind in slots:
        if kind == "module":
            params += sum(p.numel() for p in gm.get_submodule(t).parameters())
        else:
            value = attr(gm, t)
            params += value.numel() if isinstance(value, nn.Parameter) else 0
    sig_nodes = [n for n in nodes if n.op != "get_attr"]
    prefix = _common_prefix([str(n.target) for n in nodes if n.op in ("call_module", "get_attr")])
    return Block(
        name=prefix or output.name,
        nodes=tuple(n.name for n in nodes),
        input=fork.name,
        output=output.name,
        signature=_signature(gm, sig_nodes, fork),
        slots=tuple(t for t, _ in slots),
        slot_kinds=tuple(k for _, k in slots),
        params=params,
        private=private,
        run=run,
        position=position,
        same_shape=shape_of(fork) is not None and shape_of(fork) == shape_of(output),
    )


def _common_prefix(names: list[str]) -> str:
    if not names:
        return ""
    parts = [n.split(".")[:-1] for n in names]
    common: list[str] = []
    for items in zip(*parts):
        if any(x != items[0] for x in items):
            break
        common.append(items[0])
    return ".".join(common)
