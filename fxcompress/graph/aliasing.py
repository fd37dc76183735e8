"""Mutation and aliasing in a traced graph: which nodes write a tensor in place, which alias.

``torch.fx`` considers in-place ops pure, so dead-code elimination must not drop them (see
:func:`fxcompress.graph.util.finalize`) and a rewrite must not move a read across them; a rewrite
that replaces a tensor must know every view of it. Nothing here mutates a graph.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxcompress.graph.recognise import functional_inplace

__all__ = ["aliases", "mutated_input"]

_INPLACE_OPERATORS = {
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
    operator.ifloordiv,
    operator.imod,
    operator.ipow,
    operator.iand,
    operator.ior,
    operator.ixor,
    operator.ilshift,
    operator.irshift,
    operator.imatmul,
    operator.setitem,
}

_VIEW_METHODS = frozenset(
    {
        "view",
        "view_as",
        "reshape",
        "reshape_as",
        "flatten",
        "unflatten",
        "squeeze",
        "unsqueeze",
        "transpose",
        "permute",
        "t",
        "narrow",
        "select",
        "expand",
        "expand_as",
        "split",
        "chunk",
        "unbind",
        "unfold",
        "movedim",
        "swapaxes",
        "diagonal",
        "as_strided",
        "detach",
        "contiguous",
        "to",
        "type_as",
        "float",
        "double",
        "half",
        "real",
        "imag",
        "__getitem__",
    }
)

_VIEW_FUNCTIONS = {
    operator.getitem,
    torch.flatten,
    torch.reshape,
    torch.squeeze,
    torch.unsqueeze,
    torch.transpose,
    torch.permute,
    torch.narrow,
    torch.select,
    torch.split,
    torch.chunk,
    torch.unbind,
    torch.t,
    torch.movedim,
    torch.swapaxes,
    torch.diagonal,
    torch.as_strided,
    torch.detach,
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
}

_VIEW_ATTRIBUTES = frozenset({"T", "mT", "H", "mH", "data", "real", "imag"})

_VIEW_MODULES = (
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
)


def mutated_input(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The node whose tensor ``node`` writes in place (its first argument), else ``None``.

    In-place ops are methods and functions whose name ends in ``_`` (``x.add_(y)``,
    ``torch.relu_``), augmented-assignment operators and ``setitem``, calls with
    ``inplace=True`` and modules with ``inplace=True`` (``nn.ReLU(inplace=True)``). ``torch.fx``
    considers them pure, so dead-code elimination must not drop them (see
    :func:`fxcompress.graph.util.finalize`) and a rewrite must not move a read across them.

    Examples
    --------
    >>> import torch
    >>> from torch import fx, nn
    >>> class M(nn.Module):
    ...     def forward(self, x):
    ...         y = x * 2
    ...         y.relu_()
    ...         return y
    >>> gm = fx.symbolic_trace(M())
    >>> [n.name for n in gm.graph.nodes if mutated_input(gm, n) is not None]
    ['relu_']
    """
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    target = node.args[0]
    if node.op == "call_method":
        name = str(node.target)
        inplace = (name.endswith("_") and not name.startswith("_")) or name == "__setitem__"
        return target if inplace or node.kwargs.get("inplace") is True else None
    if node.op == "call_function":
        if node.target in _INPLACE_OPERATORS:
            return target
        name = getattr(node.target, "__name__", "")
        if name.endswith("_") and not name.startswith("_"):
            return target
        if node.kwargs.get("inplace") is True:
            return target
        if functional_inplace(node):
            return target
        if node.target in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d) and (
            len(node.args) > 3 and node.args[3] is True
        ):
            return target
        return None
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        return target if getattr(mod, "inplace", False) is True else None
    return None


def _is_alias_op(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node``'s output may share storage with its first argument."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if mutated_input(gm, node) is not None:
        return True  # an in-place op returns the tensor it wrote
    if node.op == "call_method":
        return str(node.target) in _VIEW_METHODS
    if node.op == "call_function":
        if node.target is getattr:
            return len(node.args) > 1 and node.args[1] in _VIEW_ATTRIBUTES
        return node.target in _VIEW_FUNCTIONS
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), _VIEW_MODULES)
    return False


def aliases(gm: fx.GraphModule, node: fx.Node, *, skip: fx.Node | None = None) -> set[fx.Node]:
    """Nodes whose tensors may share storage with ``node``'s (including ``node``).

    Follows view-like ops (``view``, ``getitem``, ``flatten``, ``transpose``, dropout, ...)
    and in-place ops back to the base tensor and then forward to every view of it. Ops not
    known to alias are assumed to return fresh tensors. The walk does not pass through
    ``skip``.

    Examples
    --------
    >>> import torch
    >>> from torch import fx, nn
    >>> class M(nn.Module):
    ...     def forward(self, x):
    ...         y = x * 2
    ...         v = y[:, :1]
    ...         return v.relu_() + y.flatten(1).sum()
    >>> gm = fx.symbolic_trace(M())
    >>> y = next(n for n in gm.graph.nodes if n.name == "mul")
    >>> sorted(n.name for n in aliases(gm, y))
    ['flatten', 'getitem', 'mul', 'relu_']
    """
    base = node
    while _is_alias_op(gm, base) and base is not skip:
        base = base.args[0]
    found = {base}
    todo = [base]
    while todo:
        current = todo.pop()
        for user in current.users:
            if user is skip or user in found:
                continue
            if user.args and user.args[0] is current and _is_alias_op(gm, user):
                found.add(user)
                todo.append(user)
    return found
