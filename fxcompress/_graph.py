"""Graph-surgery helpers shared by the rewrite passes (no tensor maths here)."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx, nn

from .errors import RewriteError

__all__ = ["clone", "finalize", "install", "shape_of", "topo_index"]


def clone(gm: fx.GraphModule) -> fx.GraphModule:
    """A deep copy of ``gm`` that keeps its ``meta`` (node metadata is copied with the graph)."""
    new = copy.deepcopy(gm)
    new.meta = copy.deepcopy(gm.meta)
    return new


def shallow_clone(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` with its own graph but the same submodule objects (cheap).

    A rewrite working on a shallow clone must not mutate a submodule; it installs a new one.
    """
    new = fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__)
    new.meta = copy.deepcopy(gm.meta)
    return new


def finalize(gm: fx.GraphModule) -> fx.GraphModule:
    """End every surgery the same way: DCE, drop unused submodules, lint, recompile."""
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    try:
        gm.graph.lint()
    except Exception as exc:
        raise RewriteError(f"rewritten graph failed lint: {exc}") from exc
    gm.recompile()
    return gm


def install(gm: fx.GraphModule, preferred: str, module: nn.Module) -> str:
    """Add ``module`` to ``gm`` under ``preferred`` if that name is free, else a suffixed one."""
    name = preferred
    k = 1
    while _exists(gm, name):
        name = f"{preferred}_{k}"
        k += 1
    gm.add_submodule(name, module)
    return name


def _exists(gm: fx.GraphModule, name: str) -> bool:
    try:
        gm.get_submodule(name)
    except AttributeError:
        return hasattr(gm, name.split(".")[0]) and "." not in name
    return True


def is_unused(gm: fx.GraphModule, target: str) -> bool:
    """Whether no node calls the submodule ``target`` any more."""
    return not any(n.op == "call_module" and n.target == target for n in gm.graph.nodes)


def replace_module(gm: fx.GraphModule, old_target: str, module: nn.Module) -> str:
    """Install ``module`` at ``old_target`` if nothing calls that any more, else beside it."""
    if is_unused(gm, old_target):
        gm.add_submodule(old_target, module)
        return old_target
    return install(gm, old_target.replace(".", "_") + "_site", module)


def shape_of(node: Any) -> tuple[int, ...] | None:
    """The recorded output shape of ``node`` (``None`` if unknown or not a tensor)."""
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


def dtype_of(node: Any) -> torch.dtype | None:
    """The recorded output dtype of ``node``."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return getattr(meta, "dtype", None)


def topo_index(gm: fx.GraphModule) -> dict[fx.Node, int]:
    """Position of every node in the graph's (topological) order."""
    return {n: i for i, n in enumerate(gm.graph.nodes)}


def numel(shape: Iterable[int]) -> int:
    return math.prod(shape)
