"""The caller's fine-tune callbacks, run under one contract.

A fine-tune (``finetune``, ``trial_finetune``) gets a relaxed GraphModule in eval mode and either
trains it in place and returns None, or returns the trained model (an ``nn.Module``), which is
then used instead; anything else raises :class:`~fxcompress.errors.InvalidArgument`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from torch import fx, nn

from fxcompress import meta
from fxcompress.errors import InvalidArgument
from fxcompress.graph.capture import propagate_shapes
from fxcompress.graph.util import clone
from fxcompress.meta import SEGMENT
from fxcompress.pipeline.captured import capture_once
from fxcompress.pipeline.checks import short
from fxcompress.pipeline.plan import Plan

__all__ = ["run_finetune", "weights_back"]

logger = logging.getLogger("fxcompress")


def run_finetune(
    fn: Callable[[fx.GraphModule], Any],
    relaxed: fx.GraphModule,
    inputs: tuple[Any, ...],
    plan: Plan,
    name: str,
) -> fx.GraphModule:
    """Run the caller's fine-tune ``fn`` on ``relaxed``; the eval-mode graph to merge after it.

    The contract (see :func:`fxcompress.optimize`): ``fn`` gets ``relaxed`` in eval mode and
    trains it in place (returning None), or returns the trained model, which is then merged
    instead. A returned ``nn.Module`` that is not ``relaxed`` is copied (a module other than a
    GraphModule is captured), its shapes are recorded on ``inputs``, and the planned segments are
    marked on the nodes it shares by name with ``relaxed``, so that :func:`merge` merges them as
    planned.
    """
    out = fn(relaxed)
    if out is None or out is relaxed:
        return relaxed.eval()
    if not isinstance(out, nn.Module):
        raise InvalidArgument(
            f"{name} returned {short(out)} (type={type(out).__name__}); it must train the "
            "relaxed model it is given in place and return None, or return the trained model "
            "(an nn.Module, e.g. a trained copy of the relaxed GraphModule) to merge instead"
        )
    if isinstance(out, fx.GraphModule):
        trained = clone(out).eval()
        propagate_shapes(trained, inputs)
    else:
        trained = capture_once(out, inputs, leaf_modules=plan.leaf_modules).gm
    tags = {n.name: n.meta[SEGMENT] for n in relaxed.graph.nodes if SEGMENT in n.meta}
    for node in trained.graph.nodes:
        if node.name in tags and SEGMENT not in node.meta:
            node.meta[SEGMENT] = tags[node.name]
    trained.meta.setdefault(meta.PLAN, plan.to_dict())
    logger.info("%s returned a %s: merging it", name, type(out).__name__)
    return trained


def weights_back(finetune: Callable[[fx.GraphModule], Any]) -> Callable[[fx.GraphModule], None]:
    """``finetune`` for a pass that merges the model it hands over: a returned model's weights
    are copied back into it (they must have the same names and shapes)."""

    def run(gm: fx.GraphModule) -> None:
        out = finetune(gm)
        if out is None or out is gm:
            return
        if not isinstance(out, nn.Module):
            raise InvalidArgument(
                f"finetune returned {short(out)} (type={type(out).__name__}); it must train "
                "the model it is given in place and return None, or return the trained model"
            )
        try:
            gm.load_state_dict(out.state_dict())
        except RuntimeError as exc:
            raise InvalidArgument(
                f"finetune returned a {type(out).__name__} whose parameters are not those of "
                f"the model it was given ({str(exc).splitlines()[0]}); with methods=('lowrank',) "
                "train the given model in place, or return a trained copy of it"
            ) from None

    return run
