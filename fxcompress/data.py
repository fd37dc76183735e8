"""Calibration and training data as fxcompress reads it: batches, inputs and outputs.

A batch is a tensor, a tuple of positional inputs, or ``(inputs, targets)``; a model output is a
tensor or a (nested) tuple, list or dict of tensors. One reader for each, used by every method.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from fxcompress.errors import InvalidArgument
from fxcompress.graph.capture import normalize_inputs

__all__ = ["flat_tensors", "inputs_for", "split_batch"]


def split_batch(batch: Any) -> tuple[tuple[Any, ...], Any]:
    """``inputs`` or ``(inputs, targets)`` -> (tuple of positional inputs, targets or None).

    Raises
    ------
    InvalidArgument
        For a dict batch (or dict inputs), which has no positional order, and any other batch
        that is not a tensor or a non-empty tuple/list.

    Examples
    --------
    >>> x = torch.zeros(2, 3)
    >>> [len(part) for part in split_batch((x, torch.zeros(2)))[:1]]
    [1]
    >>> split_batch({"x": x})
    Traceback (most recent call last):
    ...
    fxcompress.errors.InvalidArgument: data batches must be tensors, tuples of inputs or (inputs, targets), but a data batch is a dict (keys ['x']): the model's inputs are passed positionally; map the batches to tuples, e.g. ((b["x"],), b["y"]) for each dict b
    """  # noqa: E501
    if isinstance(batch, torch.Tensor):
        return (batch,), None
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        x, y = batch
        if isinstance(x, torch.Tensor):
            return (x,), y
        if isinstance(x, (tuple, list)):
            return tuple(x), y
        _refuse_batch(x, "the inputs of a data batch (inputs, targets)")
    if isinstance(batch, (tuple, list)) and batch:
        return tuple(batch), None
    _refuse_batch(batch, "a data batch")
    raise AssertionError("unreachable")  # pragma: no cover


def _refuse_batch(value: Any, what: str) -> None:
    if isinstance(value, dict):
        keys = sorted(map(str, value))
        shown = keys if len(keys) <= 8 else [*keys[:8], "..."]
        raise InvalidArgument(
            f"data batches must be tensors, tuples of inputs or (inputs, targets), but {what} "
            f"is a dict (keys {shown}): the model's inputs are passed positionally; map the "
            'batches to tuples, e.g. ((b["x"],), b["y"]) for each dict b'
        )
    raise InvalidArgument(
        f"data batches must be tensors, non-empty tuples of inputs or (inputs, targets), but "
        f"{what} is of type {type(value).__name__}"
    )


def flat_tensors(out: Any) -> list[torch.Tensor]:
    """The tensors of a model output (tensor, tuple/list or dict by sorted key), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in flat_tensors(out[k])]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in flat_tensors(o)]
    return []


def inputs_for(example_inputs: Any, data: Iterable[Any] | None) -> tuple[Any, ...]:
    """The inputs to trace with: ``example_inputs``, else the first batch's inputs in ``data``."""
    if example_inputs is not None:
        return normalize_inputs(example_inputs)
    if data is None:
        raise InvalidArgument(
            "example_inputs is required when data is not given: pass example_inputs=(x,) with a "
            "batch of the shape the model expects"
        )
    for batch in data:
        return split_batch(batch)[0]
    raise InvalidArgument("data is empty and example_inputs is not given: nothing to trace with")
