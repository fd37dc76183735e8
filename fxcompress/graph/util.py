"""Graph-surgery helpers shared by the rewrite passes (no tensor maths here)."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx, nn

from fxcompress.errors import RewriteError
from fxcompress.graph.aliasing import mutated_input

__all__ = [
    "clone",
    "eliminate_dead_code",
    "finalize",
    "install",
    "run_anchor",
    "shape_of",
    "topo_index",
]


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
    """End every surgery the same way: DCE, drop unused submodules, lint, recompile.

    Dead-code elimination keeps in-place ops whose result is unused (``y.relu_()`` as a
    statement): ``torch.fx`` considers method calls pure and would drop the write.
    """
    eliminate_dead_code(gm)
    gm.delete_all_unused_submodules()
    try:
        gm.graph.lint()
    except Exception as exc:
        raise RewriteError(f"rewritten graph failed lint: {exc}") from exc
    gm.recompile()
    return gm


def eliminate_dead_code(gm: fx.GraphModule) -> None:
    """``gm.graph.eliminate_dead_code()`` that keeps in-place ops whose result is unused.

    ``torch.fx`` treats method calls and in-place modules as pure, so ``y.relu_()`` written as a
    statement would be dropped together with its write into ``y``.
    """
    gm.graph.eliminate_dead_code(
        is_impure_node=lambda n: n.is_impure() or mutated_input(gm, n) is not None
    )


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


def is_unused(gm: fx.GraphModule, target: str, *, ignore: Iterable[fx.Node] = ()) -> bool:
    """Whether no node (other than those in ``ignore``) calls submodule ``target`` or reads it.

    Reads are ``get_attr`` nodes of ``target`` or of anything inside it (``conv.weight``).
    """
    skip = set(ignore)
    for n in gm.graph.nodes:
        if n in skip:
            continue
        if n.op == "call_module" and n.target == target:
            return False
        if n.op == "get_attr" and (n.target == target or str(n.target).startswith(target + ".")):
            return False
    return True


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


def run_anchor(run: Iterable[fx.Node]) -> fx.Node:
    """The node before which one node replacing the layer run ``run`` is inserted: its first.

    The emission rule of every rewrite that composes a run of layers into one (merge's chains,
    LayerCollapse's runs): the new node reads the run's input, and the run's first layer read it
    at its own place, so the new node goes exactly there. Anywhere later, an op between the
    layers may already have written that input in place (``h = fc1(x); x.mul_(2);
    y = fc2(act(h))``: a node at ``fc2`` would read the doubled ``x``). The intermediate maps
    are read only inside the run, so nothing between the layers needs the new node's output.

    Parameters
    ----------
    run : iterable of torch.fx.Node
        The nodes being replaced, all of one graph, in any order.

    Returns
    -------
    torch.fx.Node
        The earliest of them in graph order.

    Examples
    --------
    >>> import torch
    >>> from torch import fx, nn
    >>> gm = fx.symbolic_trace(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2)))
    >>> layers = [n for n in gm.graph.nodes if n.op == "call_module" and n.target != "1"]
    >>> run_anchor(reversed(layers)).target
    '0'
    """
    members = set(run)
    if not members:
        raise ValueError("run_anchor needs at least one node")
    graph = next(iter(members)).graph
    for node in graph.nodes:
        if node in members:
            return node
    raise ValueError(f"the nodes {sorted(n.name for n in members)} are not in their graph")


def numel(shape: Iterable[int]) -> int:
    return math.prod(shape)


# --------------------------------------------------------------------------- output comparison

_RTOL = {
    torch.float64: 1e-9,
    torch.complex128: 1e-9,
    torch.float32: 1e-4,
    torch.complex64: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,  # 8 significand bits, 8x coarser than float16
}


def clone_tensors(value: Any) -> Any:
    """``value`` with every tensor (inside tuples, lists and dicts) replaced by a copy.

    Used before running a model on example inputs: a model that writes its inputs in place must
    change neither the caller's tensors nor the inputs of a later run.
    """
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(clone_tensors(v) for v in value)
    if isinstance(value, dict):
        return {k: clone_tensors(v) for k, v in value.items()}
    return value


def default_rtol(dtype: torch.dtype) -> float:
    """Relative tolerance for outputs of ``dtype`` (0 for integer and bool outputs)."""
    return _RTOL.get(dtype, 0.0)


def _leaves(value: Any, path: str) -> Iterable[tuple[str, Any]]:
    if isinstance(value, dict):
        yield path, ("dict", tuple(sorted(map(repr, value))))
        for key in sorted(value, key=repr):
            yield from _leaves(value[key], f"{path}[{key!r}]")
    elif isinstance(value, (tuple, list)):
        # by kind, not class: a traced graph returns torch.fx's immutable_list for a list
        yield path, ("list" if isinstance(value, list) else "tuple", len(value))
        for i, item in enumerate(value):
            yield from _leaves(item, f"{path}[{i}]")
    else:
        yield path, value


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, tuple[int, ...]]:
    """``max|actual - expected| / max|expected|`` and the index of the worst element.

    Non-finite values of ``expected`` must be matched exactly (NaN by NaN); anything else there
    is an infinite error.
    """
    wide = torch.complex128 if (actual.is_complex() or expected.is_complex()) else torch.float64
    a = actual.detach().cpu().to(wide)
    e = expected.detach().cpu().to(wide)
    if a.numel() == 0:
        return 0.0, ()
    finite = torch.isfinite(e)
    same_special = (~finite) & ((a == e) | (torch.isnan(a) & torch.isnan(e)))
    diff = (a - e).abs()
    diff = torch.where(same_special, torch.zeros_like(diff), diff)
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, math.inf), diff)
    scale = float(e[finite].abs().max()) if bool(finite.any()) else 0.0
    flat = int(torch.argmax(diff.reshape(-1)))
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), tuple(diff.shape)))
    worst = float(diff.reshape(-1)[flat])
    if worst == 0.0:
        return 0.0, index
    return worst / max(scale, torch.finfo(torch.float64).tiny), index


def compare_outputs(
    actual: Any, expected: Any, *, rtol: float | None = None
) -> tuple[float, str | None]:
    """Compare two (nested tuple/list/dict) outputs tensor by tensor.

    Returns the largest relative error and, if the structures, shapes or values differ beyond
    ``rtol`` (default: :func:`default_rtol` of the less precise dtype of each pair), a message
    naming the first offending output (``output[1]['logits']``), the error and the index.
    """
    la = list(_leaves(actual, "output"))
    le = list(_leaves(expected, "output"))
    pa = [p for p, _ in la]
    pe = [p for p, _ in le]
    if pa != pe:
        return math.inf, f"output structures differ: {pa} vs {pe}"
    worst = 0.0
    for (path, x), (_, y) in zip(la, le):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return math.inf, (
                f"{path}: one output is a tensor and the other is "
                f"{type(x).__name__}/{type(y).__name__}"
            )
        if not isinstance(x, torch.Tensor):
            if x != y:
                return math.inf, f"{path}: {x!r} != {y!r}"
            continue
        if x.shape != y.shape:
            return math.inf, f"{path}: shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}"
        tol = rtol if rtol is not None else max(default_rtol(x.dtype), default_rtol(y.dtype))
        err, index = relative_error(x, y)
        if not err <= tol:
            got = x.detach().reshape(-1)[_flat_index(index, x.shape)].item() if index else x.item()
            want = y.detach().reshape(-1)[_flat_index(index, y.shape)].item() if index else y.item()
            at = f" at index {index}" if index else ""
            return err, (
                f"outputs differ at {path}: max relative error {err:.3g} > rtol {tol:.3g}{at} "
                f"(got {got!r}, expected {want!r})"
            )
        worst = max(worst, err)
    return worst, None


def _flat_index(index: tuple[int, ...], shape: torch.Size) -> int:
    flat = 0
    for i, n in zip(index, shape):
        flat = flat * n + i
    return flat
