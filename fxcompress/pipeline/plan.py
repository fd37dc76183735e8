"""What the planner chose: :class:`Plan` (JSON-able), and :func:`relax`, which replays it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from fxcompress import meta
from fxcompress.depth.relax import apply_choices
from fxcompress.depth.segment import Segment
from fxcompress.errors import InvalidArgument
from fxcompress.graph.capture import normalize_inputs, propagate_shapes
from fxcompress.graph.util import clone
from fxcompress.pipeline.captured import Captured, capture_once

__all__ = ["Plan", "relax", "relax_graph"]


@dataclass(frozen=True)
class Plan:
    """A chosen set of segments (JSON-able; replayable with :func:`relax` on the original model).

    Attributes
    ----------
    segments : tuple of Segment
        ``(chain, start, stop, key, pruned)`` named tuples; plain 5-tuples are converted.
    input_shapes : tuple of (shape, dtype name) of the example inputs the plan was made for

    Examples
    --------
    >>> p = Plan(segments=(("layer1", 0, 2, "merge", ()),), input_shapes=(((1, 3), "float32"),),
    ...          budget_ms=1.0, predicted_ms=0.9, original_ms=2.0, damage=0.1)
    >>> p.segments[0].id
    'layer1:0-2:merge'
    >>> Plan.from_json(p.to_json()) == p
    True
    """

    segments: tuple[Segment, ...]
    input_shapes: tuple[tuple[tuple[int, ...], str], ...]
    budget_ms: float
    predicted_ms: float
    original_ms: float
    damage: float
    leaf_modules: tuple[str, ...] = ()
    front: tuple[tuple[float, float], ...] = field(default=())
    #: predicted (kept, planned) milliseconds of each segment, aligned with ``segments``
    segment_ms: tuple[tuple[float, float], ...] = field(default=())

    def __post_init__(self) -> None:
        segments = tuple(
            s if isinstance(s, Segment) else Segment.from_json(s) for s in self.segments
        )
        object.__setattr__(self, "segments", segments)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": 1,
            "segments": [s.to_json() for s in self.segments],
            "input_shapes": [[list(s), d] for s, d in self.input_shapes],
            "budget_ms": self.budget_ms,
            "predicted_ms": self.predicted_ms,
            "original_ms": self.original_ms,
            "damage": self.damage,
            "leaf_modules": list(self.leaf_modules),
            "front": [list(p) for p in self.front],
            "segment_ms": [list(p) for p in self.segment_ms],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        return cls(
            segments=tuple(Segment.from_json(s) for s in d["segments"]),
            input_shapes=tuple((tuple(s), dt) for s, dt in d["input_shapes"]),
            budget_ms=float(d["budget_ms"]),
            predicted_ms=float(d["predicted_ms"]),
            original_ms=float(d["original_ms"]),
            damage=float(d["damage"]),
            leaf_modules=tuple(d.get("leaf_modules", ())),
            front=tuple(tuple(p) for p in d.get("front", ())),
            segment_ms=tuple(tuple(map(float, p)) for p in d.get("segment_ms", ())),
        )

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(json.loads(text))


def relax_graph(captured: Captured, plan: Plan) -> fx.GraphModule:
    """The trainable form of ``plan`` applied to an already captured model.

    The relaxation starts from a deep copy of ``captured.gm``: training it never reaches the
    captured graph, and every call gives a fresh network.
    """
    relaxed = apply_choices(clone(captured.gm), captured.analysis, plan.segments)
    propagate_shapes(relaxed, captured.inputs)
    relaxed.meta[meta.PLAN] = plan.to_dict()
    return relaxed


def relax(model: nn.Module, plan: Plan, example_inputs: Any = None) -> fx.GraphModule:
    """The trainable form of ``plan`` applied to ``model``.

    Activations inside the planned segments are removed, pruned convs dropped and padding moved
    to each segment's first conv; BatchNorm stays. ``merge(relax(model, plan))`` computes exactly
    what ``relax(model, plan)`` computes (in eval mode).

    Parameters
    ----------
    model : torch.nn.Module
        The original model (unchanged).
    plan : Plan
        From :func:`~fxcompress.pipeline.problem.make_plan` (or ``Plan.from_json``).
    example_inputs : optional
        Inputs to trace with; by default zeros of the shapes recorded in ``plan``.
    """
    if not isinstance(plan, Plan):
        raise InvalidArgument(f"plan must be a fxcompress.Plan, got {type(plan).__name__}")
    inputs = (
        normalize_inputs(example_inputs)
        if example_inputs is not None
        else tuple(torch.zeros(s, dtype=getattr(torch, d)) for s, d in plan.input_shapes)
    )
    return relax_graph(capture_once(model, inputs, leaf_modules=plan.leaf_modules), plan)
