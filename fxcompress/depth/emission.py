"""How every pass of :func:`~fxcompress.depth.merge.merge` writes its result into the graph: one
call of the new layer in place of the nodes it replaces (:func:`emit`), and the events it
records.
"""

from __future__ import annotations

from typing import Any

from torch import fx, nn

from fxcompress import meta
from fxcompress.graph.modules import Pad
from fxcompress.graph.util import install, is_unused, run_anchor
from fxcompress.maths import ConvParams, LinearParams
from fxcompress.meta import SEGMENT

__all__ = ["Event", "Layer", "emit", "name_hint", "record_events", "same_segment"]

Event = dict[str, Any]

Layer = ConvParams | LinearParams


def emit(
    gm: fx.GraphModule,
    start: fx.Node,
    end: fx.Node,
    params: ConvParams | LinearParams,
    *,
    preferred: str,
    replaced: list[fx.Node] | None = None,
) -> str:
    """Replace the nodes from ``start``'s layer through ``end`` by one call of ``params``.

    ``start`` is either the first replaced layer node (chains, BN folds) or the common input of
    the branches (skip folds, with the replaced branch nodes given in ``replaced``).

    A chain's new node goes where its first layer was (:func:`~fxcompress.graph.util.run_anchor`,
    the rule collapse follows too), so it reads the input at the same moment
    (an in-place op between the two layers may write that input). A skip fold's new node goes
    where the add was; the caller checks that nothing writes the input in between.
    The module at ``preferred`` is overwritten only if nothing else calls or reads it.
    """
    if replaced is None:
        nodes = [start, end]
        source = start.args[0]
        anchor = run_anchor(nodes)  # the emission rule shared with collapse
    else:
        nodes = list(dict.fromkeys([*replaced, end]))  # add(y, y) lists y twice
        source = start
        anchor = end
    module, pad = _to_module(params)
    segment = end.meta.get(SEGMENT)
    is_old = any(n.op == "call_module" and n.target == preferred for n in nodes)
    if is_old and is_unused(gm, preferred, ignore=nodes):
        gm.add_submodule(preferred, module)  # the old module at this path is no longer used
        name = preferred
    else:
        name = install(gm, preferred.replace(".", "_") + ("_site" if is_old else "_merged"), module)
    with gm.graph.inserting_before(anchor):
        x = source
        if pad is not None:
            pad_name = install(gm, preferred.replace(".", "_") + "_crop", pad)
            x = gm.graph.call_module(pad_name, (x,))
        new = gm.graph.call_module(name, (x,))
    new.meta = dict(end.meta)
    if segment is not None:
        new.meta[SEGMENT] = segment
    end.replace_all_uses_with(new)
    for n in [end, *reversed([r for r in nodes if r is not end])]:
        if not n.users:
            gm.graph.erase_node(n)
    return name


def _to_module(params: ConvParams | LinearParams) -> tuple[nn.Module, Pad | None]:
    if isinstance(params, LinearParams):
        return params.to_module(), None
    if all(p >= 0 for p in params.padding):
        return params.to_module(), None
    crop = tuple(min(p, 0) for p in params.padding)
    rest = ConvParams(
        params.weight,
        params.bias,
        stride=params.stride,
        padding=tuple(max(p, 0) for p in params.padding),
        dilation=params.dilation,
        groups=params.groups,
    )
    return rest.to_module(), Pad(crop)


def name_hint(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_module" else node.name


def same_segment(a: fx.Node, b: fx.Node) -> bool:
    sa, sb = a.meta.get(SEGMENT), b.meta.get(SEGMENT)
    return sa is not None and sa == sb


def record_events(gm: fx.GraphModule, events: list[Event]) -> None:
    """Append ``events`` to ``gm.meta["fxcompress.events"]``."""
    gm.meta[meta.EVENTS] = [*gm.meta.get(meta.EVENTS, []), *events]
