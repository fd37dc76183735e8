"""Fusion surgery: tie clustered modules (share) or replace a run of blocks by one (drop).

Both edit the GraphModule in place and write the mean of the aligned originals into the module
they keep; the caller ends with :func:`~fxcompress.graph.util.finalize`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from fxcompress.fusion.blocks import Block, attr
from fxcompress.fusion.report import Fusion
from fxcompress.fusion.schedule import Pair, find, key

__all__ = ["average_into", "averaged", "drop", "share"]


def averaged(values: list[torch.Tensor]) -> torch.Tensor:
    """The element-wise mean of ``values`` (float64 maths; integer tensors: the first)."""
    if not values[0].is_floating_point():
        return values[0].clone()  # e.g. BatchNorm's num_batches_tracked: keep the first
    mean = torch.stack([v.detach().double() for v in values]).mean(0)
    return mean.to(values[0].dtype)


def average_into(modules: list[nn.Module], keep: nn.Module) -> None:
    """Write the element-wise mean of ``modules``' parameters and buffers into ``keep``."""
    with torch.no_grad():
        for name, t in list(keep.named_parameters()) + list(keep.named_buffers()):
            values = [
                m.get_parameter(name) if isinstance(t, nn.Parameter) else m.get_buffer(name)
                for m in modules
            ]
            t.copy_(averaged(values))


def share(
    gm: fx.GraphModule, chosen: list[tuple[Pair, float]], parent: dict[Any, Any]
) -> list[Fusion]:
    """Tie every module of each cluster to its first-called member (weights: the mean)."""
    targets: dict[Any, set[str]] = {}
    for p, _ in chosen:
        for b in (p.a, p.b):
            k = key(p, b)
            targets.setdefault(find(parent, k), set()).add(k[1])
    kept_of: dict[Any, str] = {}
    for root, names in targets.items():
        sites = [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target) in names]
        keep = str(sites[0].target)
        kept_of[root] = keep
        # one entry per call site: a module already shared by several blocks weighs more
        average_into([gm.get_submodule(str(n.target)) for n in sites], gm.get_submodule(keep))
        for n in sites:
            n.target = keep
    return [
        Fusion(
            "share",
            p.role,
            kept_of[find(parent, key(p, p.a))],
            (p.a.name, p.b.name),
            score,
            p.saved,
        )
        for p, score in chosen
    ]


def drop(
    gm: fx.GraphModule, chosen: list[tuple[Pair, float]], parent: dict[Any, Any]
) -> list[Fusion]:
    """Replace each cluster of adjacent blocks by its first (weights: the mean), applied once."""
    nodes = {n.name: n for n in gm.graph.nodes}
    clusters: dict[Any, dict[str, Block]] = {}
    for p, _ in chosen:
        for b in (p.a, p.b):
            clusters.setdefault(find(parent, key(p, b)), {})[b.name] = b
    fusions = []
    doomed: list[fx.Node] = []
    attrs: set[str] = set()
    for members in clusters.values():
        run = sorted(members.values(), key=lambda b: b.position)
        keep = run[0]
        for k, kind in enumerate(keep.slot_kinds):
            if kind == "module":
                average_into(
                    [gm.get_submodule(b.slots[k]) for b in run], gm.get_submodule(keep.slots[k])
                )
            else:
                value = attr(gm, keep.slots[k])
                with torch.no_grad():
                    value.copy_(averaged([attr(gm, b.slots[k]) for b in run]))
                attrs.update(b.slots[k] for b in run[1:])
        nodes[run[-1].output].replace_all_uses_with(nodes[keep.output])
        doomed += [nodes[n] for b in run[1:] for n in b.nodes]
        score = min(s for p, s in chosen if p.a.name in members and p.b.name in members)
        fusions.append(
            Fusion(
                "drop",
                keep.signature,
                None,
                tuple(b.name for b in run),
                score,
                sum(b.params for b in run[1:]),
            )
        )
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    for n in sorted(set(doomed), key=index.__getitem__, reverse=True):
        gm.graph.erase_node(n)
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for t in attrs - used:
        owner, _, name = t.rpartition(".")
        delattr(gm.get_submodule(owner) if owner else gm, name)
    return fusions
