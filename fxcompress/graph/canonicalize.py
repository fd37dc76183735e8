"""Function-preserving clean-ups that make later pattern matching simple.

After :func:`canonicalize`:
- every recognised activation is an out-of-place ``call_function`` of the functional in
  :data:`fxcompress.graph.recognise.ACTIVATIONS` with its non-default constants as keyword arguments
  (module, functional, method and in-place spellings alike), except an in-place call whose
  written tensor is observed elsewhere: read again later, directly or through a view
  (``y[:, :2].relu_()`` writes ``y``), or owned by the caller (a graph input, a buffer);
- eval-mode dropout and ``nn.Identity`` calls are gone (``drop_dropout=True``).
"""

from __future__ import annotations

import logging

import torch.nn.functional as F
from torch import fx, nn

from fxcompress import meta
from fxcompress.graph.aliasing import aliases, mutated_input
from fxcompress.graph.recognise import ActivationSpec, activation_function, activation_of
from fxcompress.graph.util import clone, finalize, topo_index

__all__ = ["canonicalize"]

logger = logging.getLogger("fxcompress.canonicalize")

_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)


def canonicalize(gm: fx.GraphModule, *, drop_dropout: bool = True) -> fx.GraphModule:
    """Return a copy of ``gm`` with activations in canonical form and no-op layers removed.

    Parameters
    ----------
    gm : torch.fx.GraphModule
        A captured (eval-mode) module; not modified.
    drop_dropout : bool
        Remove ``nn.Dropout*``/``nn.Identity`` calls and ``F.dropout(..., training=False)``.

    Returns
    -------
    torch.fx.GraphModule
        The rewritten copy; ``gm.meta["fxcompress.events"]`` lists what changed.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from fxcompress.graph.capture import capture
    >>> gm = capture(nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU(inplace=True), nn.Dropout()),
    ...              torch.randn(1, 1, 4, 4))
    >>> print([n.target.__name__ for n in canonicalize(gm).graph.nodes if n.op == "call_function"])
    ['relu']
    """
    gm = clone(gm)
    events: list[dict[str, object]] = []
    order = topo_index(gm)
    for node in list(gm.graph.nodes):
        if drop_dropout and _is_noop(gm, node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            events.append({"kind": "drop", "node": node.name})
            continue
        spec = activation_of(gm, node)
        if spec is None or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        source = node.args[0]
        if _is_canonical(node, spec):
            continue
        if mutated_input(gm, node) is not None and _write_is_observed(gm, node, order):
            logger.debug("keeping in-place %s: the tensor it writes is read elsewhere", node.name)
            continue
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(
                activation_function(spec.name), (source,), dict(spec.kwargs)
            )
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        order[new] = order[node]
    gm.meta[meta.EVENTS] = [*gm.meta.get(meta.EVENTS, []), *events]
    return finalize(gm)


def _is_canonical(node: fx.Node, spec: ActivationSpec) -> bool:
    return (
        node.op == "call_function"
        and node.target is activation_function(spec.name)
        and len(node.args) == 1
        and tuple(sorted(node.kwargs.items())) == spec.kwargs
    )


def _write_is_observed(gm: fx.GraphModule, node: fx.Node, order: dict[fx.Node, int]) -> bool:
    """Whether making the in-place ``node`` out of place would change what anything sees.

    That is the case when the written tensor (or any view of it, e.g. ``y[:, :2].relu_()``
    writes into ``y``) is read after ``node`` by anything but ``node``'s own result, or when it
    belongs to the caller (a graph input or a parameter/buffer).
    """
    written = aliases(gm, node.args[0], skip=node)
    if any(n.op in ("placeholder", "get_attr") for n in written):
        return True
    return any(u is not node and order.get(u, -1) > order[node] for n in written for u in n.users)


def _is_noop(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), _DROPOUTS) and len(node.args) == 1
    if node.op == "call_function" and node.target in (F.dropout, F.dropout1d, F.dropout2d):
        training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
        return training is False
    return False
