"""Align the hidden units of one block to another's before their weights are averaged.

Hidden units are permutation-symmetric: permuting the output units of a layer, the channelwise
ops that follow it (BatchNorm, activation, dropout) and the input units of the next layer in the
same way leaves the block's function unchanged. Averaging two blocks unit by unit is only
meaningful after such a permutation has lined their units up.

A **hidden space** is ``producer -> [BatchNorm | activation | dropout]* -> consumer`` inside a
block, with producer and consumer both dense (``groups == 1``) convolutions or both linears.
The block's input and output live in the residual stream and are never permuted.

Alignment is *weight matching*: the permutation of each space maximises the inner product of the
two blocks' weights that touch the space (the producer's rows, bias and norm parameters, the
consumer's columns). When spaces are coupled (a bottleneck's middle conv consumes one and
produces another) the permutations are found by coordinate ascent, each step an exact linear
assignment, until none changes. The assignment solver is our own (shortest augmenting paths with
potentials, O(n³), numpy-vectorised over columns) so that no SciPy dependency is needed; it
returns the dual potentials, which certify optimality.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import fx, nn

from fxcompress.fusion.blocks import Block, is_elementwise
from fxcompress.graph.recognise import batchnorm_of, single_user

__all__ = ["HiddenSpace", "align_block", "hidden_spaces", "linear_sum_assignment"]

MAX_SWEEPS = 20

_DENSE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def linear_sum_assignment(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Minimum-cost perfect matching of a square cost matrix.

    Returns ``(cols, u, v)``: row ``i`` is matched to column ``cols[i]``, and the potentials
    satisfy ``u[i] + v[j] <= cost[i, j]`` everywhere with equality on the matching, which proves
    the matching optimal (LP duality).

    Examples
    --------
    >>> import numpy as np
    >>> cols, u, v = linear_sum_assignment(np.array([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0],
    ...                                             [3.0, 2.0, 2.0]]))
    >>> cols.tolist()
    [1, 0, 2]
    """
    a = np.asarray(cost, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"cost must be a square matrix, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError("cost must be finite")
    n = a.shape[0]
    u = np.zeros(n + 1)
    v = np.zeros(n + 1)
    row_of = np.zeros(n + 1, dtype=np.int64)  # column j (1-based) -> matched row (1-based); 0 free
    way = np.zeros(n + 1, dtype=np.int64)
    for i in range(1, n + 1):
        row_of[0] = i
        j0 = 0
        minv = np.full(n + 1, np.inf)
        used = np.zeros(n + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = row_of[j0]
            free = ~used
            free[0] = False
            cur = a[i0 - 1, :] - u[i0] - v[1:]
            better = free[1:] & (cur < minv[1:])
            minv[1:][better] = cur[better]
            way[1:][better] = j0
            masked = np.where(free, minv, np.inf)
            j1 = int(np.argmin(masked))
            delta = masked[j1]
            u[row_of[used]] += delta
            v[used] -= delta
            minv[free] -= delta
            j0 = j1
            if row_of[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            row_of[j0] = row_of[j1]
            j0 = j1
    cols = np.empty(n, dtype=np.int64)
    cols[row_of[1:] - 1] = np.arange(n)
    return cols, u[1:], v[1:]


@dataclass(frozen=True)
class HiddenSpace:
    """Units between ``producer`` and ``consumer`` (module names), with the norms between."""

    producer: str
    norms: tuple[str, ...]
    consumer: str
    size: int


def hidden_spaces(gm: fx.GraphModule, block: Block) -> tuple[HiddenSpace, ...]:
    """The permutable hidden spaces of ``block`` in graph order (empty if none)."""
    inside = set(block.nodes)
    nodes = {n.name: n for n in gm.graph.nodes}
    spaces = []
    for name in block.nodes:
        node = nodes[name]
        producer = _dense(gm, node)
        if producer is None:
            continue
        norms: list[str] = []
        cur = node
        while True:
            user = single_user(cur)
            if user is None or user.name not in inside:
                break
            consumer = _dense(gm, user)
            if consumer is not None:
                if (
                    (
                        type(consumer) is type(producer)
                        or (
                            isinstance(consumer, nn.modules.conv._ConvNd)
                            and isinstance(producer, nn.modules.conv._ConvNd)
                        )
                    )
                    and _in_units(consumer) == _out_units(producer)
                    and user.args[0] is cur
                ):
                    spaces.append(
                        HiddenSpace(
                            str(node.target), tuple(norms), str(user.target), _out_units(producer)
                        )
                    )
                break
            bn = batchnorm_of(gm, user)
            if bn is not None and bn.num_features == _out_units(producer):
                norms.append(str(user.target))
            elif not is_elementwise(gm, user):
                break
            cur = user
    return tuple(spaces)


def _dense(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    mod = gm.get_submodule(str(node.target))
    if type(mod) not in _DENSE:
        return None
    if isinstance(mod, nn.modules.conv._ConvNd) and mod.groups != 1:
        return None  # grouped channels cannot be permuted freely
    return mod


def _out_units(mod: nn.Module) -> int:
    return int(mod.weight.shape[0])


def _in_units(mod: nn.Module) -> int:
    return int(mod.weight.shape[1])


# --------------------------------------------------------------------------- matching


def _space_tensors(
    gm: fx.GraphModule,
    space: HiddenSpace,
    spaces: tuple[HiddenSpace, ...],
    perms: dict[int, np.ndarray],
) -> np.ndarray:
    """One row per unit of ``space``: every weight touching it, other spaces permuted."""
    prod = gm.get_submodule(space.producer)
    cons = gm.get_submodule(space.consumer)
    w = prod.weight.detach().double()
    for k, other in enumerate(spaces):
        if other.consumer == space.producer and k in perms:
            w = w[:, torch.as_tensor(perms[k])]
    parts = [w.reshape(w.shape[0], -1)]
    if prod.bias is not None:
        parts.append(prod.bias.detach().double()[:, None])
    for name in space.norms:
        bn = gm.get_submodule(name)
        for t in (bn.weight, bn.bias):
            if t is not None:
                parts.append(t.detach().double()[:, None])
    c = cons.weight.detach().double()
    for k, other in enumerate(spaces):
        if other.producer == space.consumer and k in perms:
            c = c[torch.as_tensor(perms[k])]
    parts.append(c.transpose(0, 1).reshape(c.shape[1], -1))
    return torch.cat(parts, dim=1).numpy()


def match(
    gm: fx.GraphModule, anchor: Block, other: Block
) -> tuple[tuple[HiddenSpace, ...], dict[int, np.ndarray]]:
    """Permutations of ``other``'s hidden spaces that line its units up with ``anchor``'s.

    Returns ``other``'s spaces and, per space index, ``perm`` with: new unit ``i`` of ``other``
    = old unit ``perm[i]``. Spaces that do not correspond (different sizes) are left out.
    """
    sa, sb = hidden_spaces(gm, anchor), hidden_spaces(gm, other)
    if len(sa) != len(sb):
        return sb, {}
    usable = [k for k in range(len(sb)) if sa[k].size == sb[k].size]
    ident = {k: np.arange(sb[k].size) for k in usable}
    perms = dict(ident)
    for _ in range(MAX_SWEEPS):
        changed = False
        for k in usable:
            fa = _space_tensors(gm, sa[k], sa, {})
            fb = _space_tensors(gm, sb[k], sb, perms)
            cols, _, _ = linear_sum_assignment(-(fa @ fb.T))
            if not np.array_equal(cols, perms[k]):
                perms[k] = cols
                changed = True
        if not changed:
            break
    return sb, {k: p for k, p in perms.items() if not np.array_equal(p, ident[k])}


def permute(
    gm: fx.GraphModule, spaces: tuple[HiddenSpace, ...], perms: dict[int, np.ndarray]
) -> None:
    """Apply ``perms`` to the modules of ``spaces`` in place (a function-preserving rewrite).

    The modules must be private to one call site (the caller checks).
    """
    with torch.no_grad():
        for k, perm in perms.items():
            space = spaces[k]
            idx = torch.as_tensor(perm)
            prod = gm.get_submodule(space.producer)
            prod.weight.copy_(prod.weight[idx])
            if prod.bias is not None:
                prod.bias.copy_(prod.bias[idx])
            for name in space.norms:
                bn = gm.get_submodule(name)
                for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
                    if t is not None:
                        t.copy_(t[idx])
            cons = gm.get_submodule(space.consumer)
            cons.weight.copy_(cons.weight[:, idx])


def align_block(gm: fx.GraphModule, anchor: Block, other: Block) -> int:
    """Permute ``other``'s hidden units in place to match ``anchor``; return units moved."""
    spaces, perms = match(gm, anchor, other)
    permute(gm, spaces, perms)
    return int(sum((p != np.arange(len(p))).sum() for p in perms.values()))
