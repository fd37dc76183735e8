"""Capture a model as a ``torch.fx`` GraphModule with shapes recorded.

Invariants of a captured module:
- it is a deep copy of the caller's model in eval mode (the caller's model is never touched);
- every node that produces a tensor carries ``node.meta["tensor_meta"]`` (shape, dtype) from a
  run on the example inputs;
- submodules called from several places are listed in ``gm.meta["fxcompress.shared"]``; rewrites
  never change such a module in place (they install a new module per rewritten call site).
"""

from __future__ import annotations

import copy
import logging
import traceback
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .errors import CaptureError, InvalidArgument
from .ops import module_call_counts

__all__ = ["capture", "normalize_inputs", "propagate_shapes"]

logger = logging.getLogger("fxcompress.capture")

LeafSpec = str | type[nn.Module]


def normalize_inputs(example_inputs: Any, *, name: str = "example_inputs") -> tuple[Any, ...]:
    """Turn a tensor or a sequence of tensors into a tuple of positional inputs.

    Raises
    ------
    InvalidArgument
        If ``example_inputs`` is not a tensor or a non-empty tuple/list whose items are tensors
        (or nested tuples/lists/dicts of tensors).
    """
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and example_inputs:
        return tuple(example_inputs)
    raise InvalidArgument(
        f"{name} must be a tensor or a non-empty tuple of tensors, got {name}="
        f"{_short(example_inputs)} (type={type(example_inputs).__name__})"
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class _Tracer(fx.Tracer):
    """A tracer that keeps user-named leaf modules opaque and remembers where it is."""

    def __init__(self, leaf_types: tuple[type, ...], leaf_names: frozenset[str]) -> None:
        super().__init__()
        self.leaf_types = leaf_types
        self.leaf_names = leaf_names
        self.stack: list[str] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names or isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        name = self.path_of_module(m)
        self.stack.append(name)
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self.stack.pop()


def capture(
    model: nn.Module,
    example_inputs: Any,
    *,
    leaf_modules: Sequence[LeafSpec] = (),
) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule (eval-mode deep copy) with shapes in ``node.meta``.

    Parameters
    ----------
    model : torch.nn.Module
        The model; it is deep-copied and the copy put in eval mode. ``model`` itself is unchanged.
    example_inputs : Tensor or tuple of Tensor
        Positional inputs used to record shapes and dtypes.
    leaf_modules : sequence of str or type
        Submodules (by qualified name) or module classes that are kept as opaque calls instead of
        being traced through, e.g. parts with data-dependent control flow.

    Returns
    -------
    torch.fx.GraphModule

    Raises
    ------
    InvalidArgument
        If ``model`` is not a module or ``example_inputs`` are not tensors.
    CaptureError
        If ``torch.fx`` cannot trace the model or the traced graph fails on the example inputs;
        the message names the submodule and source line and suggests ``leaf_modules``.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> gm = capture(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), torch.randn(1, 3, 8, 8))
    >>> [n.meta["tensor_meta"].shape for n in gm.graph.nodes if n.op == "call_module"]
    [torch.Size([1, 8, 6, 6]), torch.Size([1, 8, 6, 6])]
    """
    if not isinstance(model, nn.Module):
        raise InvalidArgument(
            f"model must be a torch.nn.Module, got model={_short(model)} "
            f"(type={type(model).__name__})"
        )
    inputs = normalize_inputs(example_inputs)
    leaf_types, leaf_names = _split_leaves(leaf_modules)
    copied = copy.deepcopy(model).eval()

    tracer = _Tracer(leaf_types, leaf_names)
    try:
        graph = tracer.trace(copied)
    except Exception as exc:
        raise _capture_error(exc, tracer, copied) from exc
    gm = fx.GraphModule(copied, graph, class_name=type(model).__name__)
    propagate_shapes(gm, inputs)

    counts = module_call_counts(gm)
    shared = sorted(
        name for name, c in counts.items() if c > 1 and any(True for _ in _params(gm, name))
    )
    gm.meta["fxcompress.shared"] = tuple(shared)
    if shared:
        logger.info("modules called at several places (never rewritten in place): %s", shared)
    return gm


def _params(gm: fx.GraphModule, name: str) -> Any:
    return gm.get_submodule(name).parameters()


def propagate_shapes(gm: fx.GraphModule, inputs: tuple[Any, ...]) -> None:
    """Record ``tensor_meta`` on every node by running ``gm`` on ``inputs`` (no grad)."""
    n_placeholders = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    if len(inputs) > n_placeholders:
        raise InvalidArgument(
            f"example_inputs has {len(inputs)} tensors but the model's forward takes "
            f"{n_placeholders} positional inputs"
        )
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*inputs)
    except Exception as exc:
        raise CaptureError(
            f"the traced model failed on the example inputs: {type(exc).__name__}: {exc}. "
            "Check that example_inputs have the shapes and dtypes the model expects."
        ) from exc


def _split_leaves(leaf_modules: Sequence[LeafSpec]) -> tuple[tuple[type, ...], frozenset[str]]:
    if isinstance(leaf_modules, (str, type)):
        leaf_modules = (leaf_modules,)
    types: list[type] = []
    names: set[str] = set()
    for item in leaf_modules:
        if isinstance(item, str):
            names.add(item)
        elif isinstance(item, type) and issubclass(item, nn.Module):
            types.append(item)
        else:
            raise InvalidArgument(
                f"leaf_modules items must be qualified module names or nn.Module classes, got "
                f"{_short(item)} (type={type(item).__name__})"
            )
    return tuple(types), frozenset(names)


def _capture_error(exc: Exception, tracer: _Tracer, model: nn.Module) -> CaptureError:
    where = tracer.stack[-1] if tracer.stack else ""
    kind = type(model.get_submodule(where)).__name__ if where else type(model).__name__
    line = ""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if "/torch/" not in frame.filename.replace("\\", "/"):
            line = f" at {frame.filename}:{frame.lineno}: `{(frame.line or '').strip()}`"
            break
    target = f"module '{where}' ({kind})" if where else f"the top-level module ({kind})"
    hint = (
        f"pass leaf_modules=('{where}',) or leaf_modules=({kind},) to keep it as an opaque call"
        if where
        else "move the untraceable code into a submodule and list it in leaf_modules"
    )
    return CaptureError(
        f"torch.fx could not trace {target}{line}: {type(exc).__name__}: {exc}. {hint}."
    )
