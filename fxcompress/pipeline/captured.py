"""The first stage: the model captured and canonicalised once, handed to every later stage."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from torch import fx, nn

from fxcompress.depth.analysis import Analysis, analyze
from fxcompress.graph.canonicalize import canonicalize
from fxcompress.graph.capture import capture

__all__ = ["Captured", "capture_once"]


@dataclass(frozen=True)
class Captured:
    """A model's canonical graph on its example inputs.

    Stages read it and never change it: a relaxation starts from a deep copy
    (:func:`fxcompress.pipeline.plan.relax_graph`), a merge returns a new graph.

    Attributes
    ----------
    gm : torch.fx.GraphModule
        The captured, canonicalised graph (eval mode, shapes in ``node.meta``).
    inputs : tuple
        The example inputs it was captured on.
    leaf_modules : tuple
        The ``leaf_modules`` it was captured with.
    """

    gm: fx.GraphModule
    inputs: tuple[Any, ...]
    leaf_modules: tuple[Any, ...] = ()

    @cached_property
    def analysis(self) -> Analysis:
        """:func:`~fxcompress.depth.analysis.analyze` of :attr:`gm`, computed once."""
        return analyze(self.gm)


def capture_once(
    model: nn.Module,
    inputs: tuple[Any, ...],
    *,
    leaf_modules: Sequence[Any] = (),
    check: bool = True,
) -> Captured:
    """``canonicalize(capture(model, inputs, ...))`` as a :class:`Captured`."""
    gm = canonicalize(capture(model, inputs, leaf_modules=leaf_modules, check=check))
    return Captured(gm, tuple(inputs), tuple(leaf_modules))
