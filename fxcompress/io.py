"""Save and load compressed models without pickle.

Two formats, both safe under PyTorch's ``weights_only=True`` default:

- ``.pt2``: a ``torch.export`` program (graph + weights); ``load`` returns its module. The batch
  size (dimension 0 of every tensor input) is dynamic by default: the program runs at any batch,
  not only the example's (falling back, with a logged warning, to the example's batch when the
  model cannot be exported that way).
- a directory: ``plan.json`` (the :class:`~fxcompress.pipeline.plan.Plan`) plus ``state.pt`` (the
  relaxed or merged model's ``state_dict``), replayed on the original model with :func:`load_plan`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from fxcompress import meta
from fxcompress.data import flat_tensors
from fxcompress.depth.merge import merge
from fxcompress.errors import InvalidArgument
from fxcompress.graph.capture import normalize_inputs
from fxcompress.pipeline.plan import Plan, relax

__all__ = ["export_onnx", "export_program", "load", "load_plan", "save", "save_plan"]

logger = logging.getLogger(__name__)


def _example_inputs(model: nn.Module, example_inputs: Any) -> tuple[Any, ...]:
    if example_inputs is not None:
        return normalize_inputs(example_inputs)
    if not isinstance(model, fx.GraphModule):
        raise InvalidArgument(
            f"example_inputs is required for a {type(model).__name__} (only a GraphModule "
            "from fxcompress records its input shapes)"
        )
    inputs = []
    for node in model.graph.nodes:
        meta = node.meta.get("tensor_meta") if node.op == "placeholder" else None
        if node.op == "placeholder":
            if meta is None:
                raise InvalidArgument(
                    "example_inputs is required: the model has no recorded input shapes"
                )
            inputs.append(torch.zeros(meta.shape, dtype=meta.dtype))
    return tuple(inputs)


def _batch_spec(inputs: tuple[Any, ...]) -> tuple[tuple[Any, ...], tuple[Any, ...]] | None:
    """``(inputs to trace with, dynamic_shapes)`` marking dimension 0 of every tensor input.

    Inputs whose dimension 0 has one size share one ``batch`` dimension; otherwise each input
    gets its own. A batch of 1 is traced as a batch of 2 (``torch.export`` specialises sizes 0
    and 1). ``None`` if no tensor input has a dimension 0 to vary.
    """
    tensors = [t for t in inputs if isinstance(t, torch.Tensor) and t.dim() > 0]
    if not tensors or any(t.shape[0] == 0 for t in tensors):
        return None
    shared = len({t.shape[0] for t in tensors}) == 1
    batch = torch.export.Dim("batch")
    traced, spec = [], []
    for i, t in enumerate(inputs):
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            traced.append(t)
            spec.append(None)
            continue
        traced.append(torch.cat([t, t]) if t.shape[0] == 1 else t)
        spec.append({0: batch if shared else torch.export.Dim(f"batch{i}")})
    return tuple(traced), tuple(spec)


def _outputs_match(program: Any, model: nn.Module, inputs: tuple[Any, ...]) -> bool:
    """Whether ``program`` computes what ``model`` does on ``inputs`` (fresh copies each run)."""

    def copies() -> tuple[Any, ...]:
        return tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in inputs)

    with torch.no_grad():
        got, want = flat_tensors(program.module()(*copies())), flat_tensors(model(*copies()))
    def close(g: torch.Tensor, w: torch.Tensor) -> bool:
        if g.shape != w.shape or g.dtype != w.dtype:
            return False
        if not w.is_floating_point():
            return bool(torch.equal(g, w))
        tol = 1e-2 if w.dtype in (torch.float16, torch.bfloat16) else 1e-4
        return bool(torch.allclose(g, w, rtol=tol, atol=tol * 0.1))

    return len(got) == len(want) and all(close(g, w) for g, w in zip(got, want))


def export_program(
    model: nn.Module, example_inputs: Any = None, *, dynamic_batch: bool = True
) -> torch.export.ExportedProgram:
    """``torch.export`` ``model`` (in eval mode), with a dynamic batch dimension by default.

    Parameters
    ----------
    model : torch.nn.Module
        E.g. the result of :func:`fxcompress.optimize`; its ``training`` flag is restored.
    example_inputs : tensor or tuple, optional
        Inputs to trace with; by default zeros of the input shapes recorded in ``model``.
    dynamic_batch : bool, default True
        Mark dimension 0 of every tensor input dynamic, so the program runs at any batch size.
        If the model cannot be exported that way (it fixes its batch size, or computes
        something else at another batch), a warning is logged and the program is exported for
        the example's shapes only.

    Returns
    -------
    torch.export.ExportedProgram
    """
    inputs = _example_inputs(model, example_inputs)
    was_training = model.training
    model.eval()
    try:
        spec = _batch_spec(inputs) if dynamic_batch else None
        if spec is not None:
            traced, shapes = spec
            try:
                program = torch.export.export(model, traced, dynamic_shapes=shapes)
                if _outputs_match(program, model, inputs):
                    return program
                reason = "its outputs at the example's batch size differ from the model's"
            except Exception as exc:  # torch.export raises many types; any means "not dynamic"
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            batches = sorted({t.shape[0] for t in inputs if isinstance(t, torch.Tensor)})
            logger.warning(
                "the model could not be exported with a dynamic batch dimension (%s); the "
                "program runs at the example's batch size %s only",
                reason,
                ", ".join(map(str, batches)),
            )
        return torch.export.export(model, inputs)
    finally:
        model.train(was_training)


def save(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_inputs: Any = None,
    *,
    dynamic_batch: bool = True,
) -> Path:
    """Save ``model`` as a ``torch.export`` program (``.pt2``), by default for any batch size.

    See :func:`export_program` for ``example_inputs`` and ``dynamic_batch``.

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
    ...     x8 = torch.randn(8, 3, 8, 8)  # another batch size than the example's
    ...     torch.allclose(load(p)(x8), gm(x8), atol=1e-6)
    True
    """
    path = Path(path)
    if path.suffix != ".pt2":
        raise InvalidArgument(
            f"save writes a torch.export program; use a '.pt2' path, got path={str(path)!r}"
        )
    program = export_program(model, example_inputs, dynamic_batch=dynamic_batch)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(path))
    return path


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_inputs: Any = None,
    *,
    dynamic_batch: bool = True,
) -> Path:
    """Export ``model`` to ONNX (``torch.onnx``'s dynamo exporter; the ``export`` extra), by
    default for any batch size.

    The graph is the one :func:`export_program` gives (same ``example_inputs`` and
    ``dynamic_batch``), so the ONNX file's batch dimension is symbolic too.
    """
    path = Path(path)
    if path.suffix != ".onnx":
        raise InvalidArgument(f"export_onnx writes an '.onnx' file, got path={str(path)!r}")
    try:
        import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter needs it)
    except ImportError as exc:
        raise InvalidArgument(
            "ONNX export needs onnx and onnxscript: pip install 'fxcompress[export]'"
        ) from exc
    program = export_program(model, example_inputs, dynamic_batch=dynamic_batch)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(program, (), str(path), dynamo=True, verbose=False)
    return path


def load(path: str | os.PathLike[str]) -> nn.Module:
    """Load a model saved by :func:`save` (no unpickling of arbitrary objects).

    A program saved with a dynamic batch dimension (the default) runs at any batch size.
    """
    path = Path(path)
    if path.suffix != ".pt2":
        raise InvalidArgument(
            f"load reads '.pt2' programs written by fxcompress.save, got path={str(path)!r}"
        )
    return torch.export.load(str(path)).module()


def save_plan(relaxed: fx.GraphModule, directory: str | os.PathLike[str]) -> Path:
    """Save a relaxed (e.g. fine-tuned) model as ``plan.json`` + ``state.pt`` in ``directory``."""
    plan = relaxed.meta.get(meta.PLAN)
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
