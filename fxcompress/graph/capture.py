"""Capture a model as a ``torch.fx`` GraphModule with shapes recorded.

Invariants of a captured module:
- it is a deep copy of the caller's model in eval mode (the caller's model is never touched);
- every node that produces a tensor carries ``node.meta["tensor_meta"]`` (shape, dtype) from a
  run on the example inputs;
- submodules called from several places are listed in ``gm.meta["fxcompress.shared"]``; rewrites
  never change such a module in place (they install a new module per rewritten call site);
- (with ``check=True``, the default) it computes what the model computes on the example inputs:
  ``torch.fx`` can trace a different function without failing, e.g. ``a += b`` where another
  name still refers to ``a``;
- the example inputs are never written, even by a model that writes its inputs in place;
- a submodule with forward hooks or forward pre-hooks is a leaf of the trace, installed inside a
  :class:`Hooked` wrapper that no pass recognises, so it is kept exactly as it is (hooks and all)
  and never rewritten, canonicalised or folded; ``gm.meta["fxcompress.hooked"]`` maps its
  qualified name to its hooks. Hooks on the top-level module do not run in a graph: with
  ``check=True`` they must leave the outputs alone (a torch.export module's input checks do),
  else :class:`~fxcompress.errors.CaptureError` names them. Global module hooks
  (``torch.nn.modules.module.register_module_forward_hook``) would run on every layer a rewrite
  creates or removes and are refused.
"""

from __future__ import annotations

import copy
import inspect
import logging
import traceback
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata
from torch.nn.modules import module as _module_globals

from fxcompress import meta
from fxcompress.errors import CaptureError, InvalidArgument
from fxcompress.graph.modules import Pad
from fxcompress.graph.recognise import module_call_counts
from fxcompress.graph.util import clone_tensors, compare_outputs

__all__ = ["Hooked", "capture", "forward_hooks", "normalize_inputs", "propagate_shapes"]

logger = logging.getLogger("fxcompress.capture")

LeafSpec = str | type[nn.Module]


def normalize_inputs(example_inputs: Any, *, name: str = "example_inputs") -> tuple[Any, ...]:
    """Turn a tensor or a sequence of tensors into a tuple of positional inputs.

    Raises
    ------
    InvalidArgument
        If ``example_inputs`` is not a tensor or a non-empty tuple/list whose items are tensors
        (or nested tuples/lists/dicts of tensors); the message names the offending value.

    Examples
    --------
    >>> import torch
    >>> [t.shape for t in normalize_inputs(torch.zeros(2))]
    [torch.Size([2])]
    >>> normalize_inputs((torch.zeros(1), "a"))
    Traceback (most recent call last):
    ...
    fxcompress.errors.InvalidArgument: example_inputs[1] must be a tensor (or a nested tuple/list/dict of tensors), got example_inputs[1]='a' (type=str)
    """  # noqa: E501
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and example_inputs:
        for i, item in enumerate(example_inputs):
            _check_tensors(item, f"{name}[{i}]")
        return tuple(example_inputs)
    raise InvalidArgument(
        f"{name} must be a tensor or a non-empty tuple of tensors, got {name}="
        f"{_short(example_inputs)} (type={type(example_inputs).__name__})"
    )


def _check_tensors(value: Any, where: str) -> None:
    if isinstance(value, torch.Tensor):
        return
    if isinstance(value, (tuple, list)) and value:
        for i, item in enumerate(value):
            _check_tensors(item, f"{where}[{i}]")
        return
    if isinstance(value, dict) and value:
        for key, item in value.items():
            _check_tensors(item, f"{where}[{key!r}]")
        return
    raise InvalidArgument(
        f"{where} must be a tensor (or a nested tuple/list/dict of tensors), got "
        f"{where}={_short(value)} (type={type(value).__name__})"
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class Hooked(nn.Module):
    """A submodule with forward hooks, kept as it is: it calls ``module`` (hooks included).

    No pass recognises this class, so the module inside is never rewritten, canonicalised or
    folded, and a BatchNorm or activation around it is not merged across it. Its parameters
    appear under ``<name>.module.`` in the state dict of the captured graph.

    Examples
    --------
    >>> import torch
    >>> relu = nn.ReLU()
    >>> _ = relu.register_forward_hook(lambda m, i, o: o + 1)
    >>> Hooked(relu)(torch.zeros(2))
    tensor([1., 1.])
    """

    _is_impure = True  # dead-code elimination must not drop a hook, whose effects it cannot see

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)


def forward_hooks(module: nn.Module) -> list[str]:
    """Descriptions of the forward hooks and forward pre-hooks registered on ``module`` itself.

    Examples
    --------
    >>> def double(m, inputs, output):
    ...     return 2 * output
    >>> relu = nn.ReLU()
    >>> _ = relu.register_forward_hook(double)
    >>> forward_hooks(relu)
    ['forward hook double']
    """
    return [
        f"{kind} {_hook_name(hook)}"
        for kind, hooks in (
            ("forward pre-hook", module._forward_pre_hooks),
            ("forward hook", module._forward_hooks),
        )
        for hook in hooks.values()
    ]


def _hook_name(hook: Any) -> str:
    name = getattr(hook, "__qualname__", None) or type(hook).__qualname__
    return str(name)


def _check_global_hooks() -> None:
    """Refuse global module hooks: no rewritten graph can keep what they do."""
    global_hooks = [
        f"{kind} {_hook_name(h)}"
        for kind, hooks in (
            ("forward pre-hook", _module_globals._global_forward_pre_hooks),
            ("forward hook", _module_globals._global_forward_hooks),
        )
        for h in hooks.values()
    ]
    if global_hooks:
        raise CaptureError(
            f"global module hooks are registered ({', '.join(global_hooks)}): they run on every "
            "module call, also on the layers a rewrite creates or removes, so no rewritten graph "
            "can compute what the model computes with them. Remove them while compressing "
            "(the handle returned by torch.nn.modules.module.register_module_forward_hook has "
            ".remove()) and register them again afterwards."
        )


class _Tracer(fx.Tracer):
    """A tracer that keeps user-named leaf modules opaque and remembers where it is."""

    def __init__(
        self, leaf_types: tuple[type, ...] = (), leaf_names: frozenset[str] = frozenset()
    ) -> None:  # defaults: GraphModule unpickling instantiates the tracer class without args
        super().__init__()
        self.leaf_types = leaf_types
        self.leaf_names = leaf_names
        self.stack: list[str] = []
        self.failed_in: str | None = None  # innermost module being traced when tracing failed

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names or isinstance(m, self.leaf_types):
            return True
        if isinstance(m, (Pad, Hooked)):
            return True  # fxcompress's own ops: keep them recognisable when a result is re-captured
        if forward_hooks(m):
            return True  # traced through, its hooks would be dropped or frozen at trace time
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        try:
            name = self.path_of_module(m)
        except NameError:
            name = ""  # a module that is not a registered submodule; the base class says so
        self.stack.append(name)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = name
            raise
        finally:
            self.stack.pop()


def capture(
    model: nn.Module,
    example_inputs: Any,
    *,
    leaf_modules: Sequence[LeafSpec] = (),
    check: bool = True,
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
    check : bool
        Run the model itself on (copies of) the example inputs and require the traced graph to
        give the same outputs. ``torch.fx`` can trace a graph that computes something else
        without failing (``a += b`` on a tensor that another name refers to is traced as a new
        tensor, a Python side effect runs once at trace time), and every later rewrite would
        faithfully preserve the wrong function.

    Returns
    -------
    torch.fx.GraphModule

    Raises
    ------
    InvalidArgument
        If ``model`` is not a module or ``example_inputs`` are not tensors.
    CaptureError
        If ``torch.fx`` cannot trace the model, the traced graph fails on the example inputs (the
        message holds the underlying error, e.g. a channel count that does not match), or (with
        ``check``) it computes something else than the model; the message names the submodule
        and source line and suggests ``leaf_modules`` (or names the top-level module's forward
        hooks, which do not run in a graph). Also if global module hooks are registered.

    Notes
    -----
    **Forward hooks are respected, not refused.** A submodule with forward hooks or forward
    pre-hooks (``register_forward_hook``, ``register_forward_pre_hook``) is not traced through:
    it stays one call of the module itself, wrapped in :class:`Hooked`, so its hooks run as
    before and no pass rewrites, canonicalises or folds it (nor merges across it). It is logged,
    listed in ``gm.meta["fxcompress.hooked"]`` and reported among the parts left as they are.
    Remove a hook before compressing to let that module be compressed. Hooks on ``model`` itself
    cannot be kept (the graph is its forward): with ``check`` they must leave the outputs
    alone, as the input checks of a ``torch.export`` module do; without it they are logged.

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
    for name in sorted(leaf_names):
        try:
            model.get_submodule(name)
        except AttributeError:
            raise InvalidArgument(
                f"leaf_modules names {name!r}, which is not a submodule of the model"
            ) from None
    _check_global_hooks()
    root_hooks = forward_hooks(model)
    try:
        copied = copy.deepcopy(model).eval()
    except RuntimeError as exc:
        raise CaptureError(
            f"the model cannot be copied ({_cause(exc)}), and fxcompress never works on the "
            "caller's model itself. torch.nn.utils.weight_norm, spectral_norm and "
            "torch.nn.utils.prune leave computed weights that cannot be copied: remove them first "
            "(remove_weight_norm, prune.remove) or use torch.nn.utils.parametrizations."
        ) from None

    tracer = _Tracer(leaf_types, leaf_names)
    try:
        graph = tracer.trace(copied, concrete_args=_defaults_after(copied, len(inputs)))
    except Exception as exc:
        # the message holds the cause and where it happened; the chained traceback (still in
        # ``__context__``) would be torch.fx's internals
        raise _capture_error(exc, tracer, copied) from None
    gm = fx.GraphModule(copied, graph, class_name=type(model).__name__)
    _wrap_hooked(gm)
    traced_out = propagate_shapes(gm, inputs)
    if check:
        _check_trace(copied, gm, inputs, traced_out, root_hooks)
    elif root_hooks:
        logger.warning(
            "the model's own %s do not run in the traced graph, and check=False does not verify "
            "that they leave the outputs alone",
            ", ".join(root_hooks),
        )

    counts = module_call_counts(gm)
    shared = sorted(
        name for name, c in counts.items() if c > 1 and any(True for _ in _params(gm, name))
    )
    gm.meta[meta.SHARED] = tuple(shared)
    if shared:
        logger.info("modules called at several places (never rewritten in place): %s", shared)
    return gm


def _wrap_hooked(gm: fx.GraphModule) -> None:
    """Install every called submodule that has forward hooks inside a :class:`Hooked` wrapper."""
    hooked: dict[str, list[str]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target in hooked:
            continue
        target = str(node.target)
        mod = gm.get_submodule(target)
        inner = mod.module if isinstance(mod, Hooked) else mod
        hooks = forward_hooks(inner)
        if not hooks:
            continue
        if not isinstance(mod, Hooked):
            gm.add_submodule(target, Hooked(mod))
        hooked[target] = hooks
        logger.info(
            "module '%s' (%s) has %s: kept as it is (not rewritten, canonicalized or folded)",
            target,
            type(inner).__name__,
            ", ".join(hooks),
        )
    gm.meta[meta.HOOKED] = hooked


def _defaults_after(model: nn.Module, given: int) -> dict[str, Any] | None:
    """Forward's parameters with defaults past the ``given`` positional inputs, at their defaults.

    Traced as constants: otherwise ``torch.fx`` makes them placeholders and traces
    ``if scale is None`` as false, a graph the model never runs with the given inputs.
    """
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    rest = {}
    for i, p in enumerate(params):
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        if (p.kind not in positional or i >= given) and p.default is not inspect.Parameter.empty:
            rest[p.name] = p.default
    return rest or None


def _params(gm: fx.GraphModule, name: str) -> Any:
    return gm.get_submodule(name).parameters()


def _check_trace(
    model: nn.Module,
    gm: fx.GraphModule,
    inputs: tuple[Any, ...],
    traced_out: Any,
    root_hooks: Sequence[str] = (),
) -> None:
    try:
        with torch.no_grad():
            expected = model(*clone_tensors(inputs))
    except Exception as exc:  # pragma: no cover - the trace ran, so the model normally does too
        raise CaptureError(f"the model failed on the example inputs: {_cause(exc)}") from None
    _, problem = compare_outputs(traced_out, expected)
    if problem is not None and root_hooks:
        raise CaptureError(
            f"the model itself ({type(model).__name__}) has {', '.join(root_hooks)}, which do "
            f"not run in a traced graph, and the graph computes something else ({problem}). "
            "Remove them while compressing and register them on the result (a GraphModule) "
            "afterwards; hooks on submodules are kept (the hooked submodule is left as it is)."
        )
    if problem is not None:
        raise CaptureError(
            f"the graph traced by torch.fx does not compute what the model computes on the "
            f"example inputs ({problem}). Typical causes: an in-place update of a tensor that "
            "another variable also refers to (e.g. `a += b` where `a` is read again later; "
            "torch.fx traces it as a new tensor), Python side effects in forward, or random "
            "ops. Rewrite that part out of place, or list its submodule in leaf_modules; "
            "capture(..., check=False) skips this check."
        )


def propagate_shapes(gm: fx.GraphModule, inputs: tuple[Any, ...]) -> Any:
    """Record ``tensor_meta`` on every node by running ``gm`` on ``inputs`` (no grad).

    The inputs are copied first, so a graph that writes its inputs in place leaves the caller's
    tensors alone. Returns the graph's output.

    Raises
    ------
    CaptureError
        If the graph fails on the inputs; the message names the node (and module) that failed
        and holds the underlying error, e.g. ``expected input[1, 1, 32, 32] to have 3 channels,
        but got 1 channels instead``.

    Examples
    --------
    >>> import torch
    >>> gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 3)))
    >>> propagate_shapes(gm, (torch.zeros(1, 1, 8, 8),))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    fxcompress.errors.CaptureError: the traced model failed on the example inputs (shapes ((1, 1, 8, 8),)) at module '0' (Conv2d): RuntimeError: Given groups=1, weight of size [4, 3, 3, 3], expected input[1, 1, 8, 8] to have 3 channels, but got 1 channels instead. ...
    """  # noqa: E501
    n_placeholders = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    if len(inputs) > n_placeholders:
        raise InvalidArgument(
            f"example_inputs has {len(inputs)} tensors but the model's forward takes "
            f"{n_placeholders} positional inputs"
        )
    recorder = _ShapeRecorder(gm)
    try:
        with torch.no_grad():
            return recorder.run(*clone_tensors(inputs))
    except Exception as exc:
        shapes = tuple(tuple(t.shape) if isinstance(t, torch.Tensor) else t for t in inputs)
        where = f" at {_describe(gm, recorder.failed)}" if recorder.failed is not None else ""
        # the message is self-contained; the original traceback stays in ``__context__``
        raise CaptureError(
            f"the traced model failed on the example inputs (shapes {shapes}){where}: "
            f"{_cause(exc)}. Check that example_inputs have the shapes and dtypes the model "
            "expects."
        ) from None


class _ShapeRecorder(fx.Interpreter):
    """Runs a graph and records each node's ``tensor_meta`` (like torch.fx's ``ShapeProp``,
    which prints a traceback to stderr when a node fails); remembers the node that failed."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.extra_traceback = False  # keep the node's exception message as it is
        self.failed: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception:
            if self.failed is None:
                self.failed = n
            raise
        found = False

        def extract(obj: Any) -> Any:
            nonlocal found
            if isinstance(obj, torch.Tensor):
                found = True
                return _extract_tensor_metadata(obj)
            return obj

        meta = map_aggregate(result, extract)
        if found:
            n.meta["tensor_meta"] = meta
        n.meta["type"] = type(result)
        return result


def _describe(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        inner = mod.module if isinstance(mod, Hooked) else mod
        return f"module '{node.target}' ({type(inner).__name__})"
    if node.op == "call_function":
        return f"node '{node.name}' ({getattr(node.target, '__name__', node.target)})"
    return f"node '{node.name}' ({node.op} {node.target})"


def _cause(exc: BaseException, limit: int = 600) -> str:
    """``Type: message`` of ``exc`` on one line, shortened to about ``limit`` characters."""
    text = " ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


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
    where = tracer.failed_in or ""
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
    return CaptureError(f"torch.fx could not trace {target}{line}: {_cause(exc)}. {hint}.")
