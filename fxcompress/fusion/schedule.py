"""Which blocks to fuse: candidate pairs, their similarity, and the greedy choice.

:func:`candidates` lists every pair that may be fused (structure only), :func:`scores` rates
them (:mod:`.similarity`), :func:`choose` takes the most similar until the budget is met,
clustering them with a union-find (:func:`find`, :func:`union`; a pair's :func:`key` is its
module in share mode, its block in drop mode). No graph is changed here.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from fxcompress.fusion.blocks import Block, attr, find_blocks
from fxcompress.fusion.similarity import linear_cka, record, weight_cosine

__all__ = [
    "Pair",
    "call_sites",
    "candidates",
    "choose",
    "find",
    "key",
    "max_saving",
    "scores",
    "slot_node",
    "slot_numel",
    "tensors",
    "union",
]


@dataclass(frozen=True)
class Pair:
    """Two blocks that may be fused: at ``slot`` (share mode) or whole (drop mode: ``None``)."""

    role: str
    slot: int | None  # share: slot index; drop: None
    a: Block
    b: Block
    saved: int


def call_sites(gm: fx.GraphModule) -> dict[str, set[str]]:
    """The nodes that call (or read) each module or attribute, by target."""
    sites: dict[str, set[str]] = {}
    for n in gm.graph.nodes:
        if n.op in ("call_module", "get_attr"):
            sites.setdefault(str(n.target), set()).add(n.name)
    return sites


def slot_numel(gm: fx.GraphModule, block: Block, k: int) -> int:
    """Parameters in ``block``'s slot ``k``."""
    target = block.slots[k]
    if block.slot_kinds[k] == "module":
        return sum(p.numel() for p in gm.get_submodule(target).parameters())
    value = attr(gm, target)
    return value.numel() if isinstance(value, nn.Parameter) else 0


def candidates(gm: fx.GraphModule, mode: str, skipped: dict[str, str]) -> list[Pair]:
    """Every pair that may be fused, structure only (no scores)."""
    found = find_blocks(gm)
    pairs: list[Pair] = []
    sites = call_sites(gm)
    for role, blocks in found.groups().items():
        if mode == "drop":
            ordered = sorted(blocks, key=lambda b: (b.run, b.position))
            for a, b in itertools.pairwise(ordered):
                if (b.run, b.position) != (a.run, a.position + 1):
                    continue
                if not (a.private and b.private):
                    skipped[b.name] = "parameters used outside the block: not dropped"
                    continue
                if not a.same_shape:
                    skipped[b.name] = "changes the tensor shape: cannot be applied twice"
                    continue
                pairs.append(Pair(role, None, a, b, b.params))
            continue
        inside = {n for b in blocks for n in b.nodes}
        for k, kind in enumerate(blocks[0].slot_kinds):
            if kind != "module":
                skipped[f"{blocks[0].slots[k]}"] = "share mode ties modules, not get_attr tensors"
                continue
            eligible = []
            for b in blocks:
                if sites[b.slots[k]] <= inside:
                    eligible.append(b)
                else:
                    skipped[b.slots[k]] = "also called outside its role's blocks: not shared"
            numel = slot_numel(gm, blocks[0], k)
            if numel == 0:
                continue
            for i, a in enumerate(eligible):
                for b in eligible[i + 1 :]:
                    pairs.append(Pair(role, k, a, b, numel))
    return pairs


def max_saving(gm: fx.GraphModule, mode: str) -> int:
    """Unique parameters saved by fusing every eligible pair."""
    pairs = candidates(gm, mode, {})
    parent: dict[Any, Any] = {}
    total = 0
    for p in pairs:
        ka, kb = key(p, p.a), key(p, p.b)
        if union(parent, ka, kb):
            total += p.saved
    return total


def key(pair: Pair, block: Block) -> Any:
    """Union-find key: in share mode the module (blocks already sharing it are one cluster)."""
    if pair.slot is None:
        return ("block", block.name)
    return ("module", block.slots[pair.slot])


def find(parent: dict[Any, Any], x: Any) -> Any:
    """The root of ``x``'s cluster (union-find with path halving)."""
    parent.setdefault(x, x)
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


def union(parent: dict[Any, Any], a: Any, b: Any) -> bool:
    """Join the clusters of ``a`` and ``b``; whether they were apart."""
    ra, rb = find(parent, a), find(parent, b)
    if ra == rb:
        return False
    parent[rb] = ra
    return True


def choose(
    pairs: list[Pair], scores: list[float], current: int, target: float
) -> tuple[list[tuple[Pair, float]], dict[Any, Any], int]:
    """The pairs to fuse to bring ``current`` unique parameters down to ``target``.

    Most similar first, skipping fusions that would undershoot the budget; then, if still above
    it, the smallest fusion that reaches it (else the most similar). Returns the chosen pairs
    with their scores, the union-find ``parent`` of the clusters and the parameters left.
    """
    order = sorted(range(len(pairs)), key=lambda i: (-scores[i], i))
    parent: dict[Any, Any] = {}
    chosen: list[tuple[Pair, float]] = []

    def apart(i: int) -> bool:
        return find(parent, key(pairs[i], pairs[i].a)) != find(parent, key(pairs[i], pairs[i].b))

    def take(i: int) -> None:
        nonlocal current
        p = pairs[i]
        if union(parent, key(p, p.a), key(p, p.b)):
            chosen.append((p, scores[i]))
            current -= p.saved

    for i in order:
        if current <= target:
            break
        if current - pairs[i].saved >= target and apart(i):
            take(i)
    while current > target:
        live = [i for i in order if apart(i)]
        if not live:
            break
        reaching = [i for i in live if current - pairs[i].saved <= target]
        take(min(reaching, key=lambda i: pairs[i].saved) if reaching else live[0])
    return chosen, parent, current


def scores(
    gm: fx.GraphModule,
    pairs: list[Pair],
    mode: str,
    similarity: str,
    data: Iterable[Any] | None,
    calibration_batches: int,
) -> list[float]:
    """The similarity of every pair (see :mod:`.similarity`), in the order of ``pairs``."""
    if similarity == "weight":
        return [weight_cosine(tensors(gm, p.a, p.slot), tensors(gm, p.b, p.slot)) for p in pairs]
    assert data is not None
    nodes = {n.name: n for n in gm.graph.nodes}
    if mode == "drop":
        names = {x for p in pairs for b in (p.a, p.b) for x in (b.input, b.output)}
    else:
        names = {slot_node(p.a, p.slot, nodes) for p in pairs}
        names |= {slot_node(p.b, p.slot, nodes) for p in pairs}
    acts = record(gm, names, data, batches=calibration_batches)
    out = []
    for p in pairs:
        if mode == "drop":
            da = acts[p.a.output] - acts[p.a.input]
            db = acts[p.b.output] - acts[p.b.input]
        else:
            da = acts.get(slot_node(p.a, p.slot, nodes))
            db = acts.get(slot_node(p.b, p.slot, nodes))
            if da is None or db is None:  # not a tensor output: fall back to the weights
                out.append(weight_cosine(tensors(gm, p.a, p.slot), tensors(gm, p.b, p.slot)))
                continue
        out.append(linear_cka(da, db))
    return out


def slot_node(block: Block, slot: int | None, nodes: dict[str, fx.Node]) -> str:
    """The node of ``block`` that calls its slot ``slot``."""
    assert slot is not None
    target = block.slots[slot]
    return next(
        n for n in block.nodes if str(nodes[n].target) == target and nodes[n].op == "call_module"
    )


def tensors(gm: fx.GraphModule, block: Block, slot: int | None) -> list[torch.Tensor]:
    """The tensors of ``block``'s slot ``slot`` (all of its slots: ``None``)."""
    ks = range(len(block.slots)) if slot is None else [slot]
    out: list[torch.Tensor] = []
    for k in ks:
        if block.slot_kinds[k] == "module":
            out += list(gm.get_submodule(block.slots[k]).parameters())
        else:
            value = attr(gm, block.slots[k])
            if isinstance(value, torch.Tensor):
                out.append(value)
    return out
