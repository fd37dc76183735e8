"""Save and load compressed models without pickle.

Two formats, both safe under PyTorch's ``weights_only=True`` default:

- ``.pt2``: a ``torch.export`` program (graph + weights); ``load`` returns its module.
- a directory: ``plan.json`` (the :class:`~fxcompress.api.Plan`) plus ``state.pt`` (the relaxed or
  merged model's ``state_dict``), replayed on the original model with :func:`load_plan`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from .api import Plan, relax
from .capture import normalize_inputs
from .errors import InvalidArgument
from .merge import merge

__all__ = ["load", "load_plan", "save", "save_plan"]


def _example_inputs(gm: fx.GraphModule, example_inputs: Any) -> tuple[Any, ...]:
    if example_inputs is not None:
        return normalize_inputs(example_inputs)
    inputs = []
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta") if node.op == "placeholder" else None
        if node.op == "placeholder":
            if meta is None:
                raise InvalidArgument(
                    "example_inputs is required: the model has no recorded input shapes"
                )
            inputs.append(torch.zeros(meta.shape, dtype=meta.dtype))
    return tuple(inputs)


def save(model: fx.GraphModule, path: str | os.PathLike[str], example_inputs: Any = None) -> Path:
    """Save ``model`` as a ``torch.export`` program (``.pt2``).

    Examples
    --------
    >>> import tempfile, torch
    >>> from torch import nn
    >>> import fxcompress
    >>> m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    >>> x = torch.randn(1, 3, 8, 8)
    >>> gm = fxcompress.optimize(m, 1.0, example_inputs=x, latency="flops")
    >>> with tempfile.TemporaryDirectory() as d:
    ...     p = save(gm, d + "/m.pt2")
    ...     torch.allclose(load(p)(x), gm(x))
    True
    """
    path = Path(path)
    if path.suffix != ".pt2":
        raise InvalidArgument(
            f"save writes a torch.export program; use a '.pt2' path, got path={str(path)!r}"
        )
    inputs = _example_inputs(model, example_inputs)
    program = torch.export.export(model.eval(), inputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(path))
    return path


def load(path: str | os.PathLike[str]) -> nn.Module:
    """Load a model saved by :func:`save` (no unpickling of arbitrary objects)."""
    path = Path(path)
    if path.suffix != ".pt2":
        raise InvalidArgument(
            f"load reads '.pt2' programs written by fxcompress.save, got path={str(path)!r}"
        )
    return torch.export.load(str(path)).module()


def save_plan(relaxed: fx.GraphModule, directory: str | os.PathLike[str]) -> Path:
    """Save a relaxed (e.g. fine-tuned) model as ``plan.json`` + ``state.pt`` in ``directory``."""
    plan = relaxed.meta.get("fxcompress.plan")
    if plan is None:
        raise InvalidArgument("save_plan needs a model returned by fxcompress.relax")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "plan.json").write_text(json.dumps(plan, sort_keys=True, indent=1))
    torch.save(relaxed.state_dict(), d / "state.pt")
    return d


def load_plan(
    model: nn.Module, directory: str | os.PathLike[str], *, merged: bool = True
) -> fx.GraphModule:
    """Replay a saved plan on the original ``model`` and load the saved weights.

    Returns the merged (deployable) model, or the relaxed one with ``merged=False``.
    """
    d = Path(directory)
    plan = Plan.from_dict(json.loads((d / "plan.json").read_text()))
    relaxed = relax(model, plan)
    state = torch.load(d / "state.pt", weights_only=True)
    relaxed.load_state_dict(state)
    return merge(relaxed) if merged else relaxed
