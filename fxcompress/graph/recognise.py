"""Recognise the ops fxcompress reasons about in a traced graph (a pure read of the graph).

A *layer* is a convolution or linear map whose parameters are fixed tensors: an ``nn.ConvNd`` /
``nn.Linear`` called as a module, or ``F.convNd`` / ``F.linear`` called on ``get_attr`` parameters.
Activations are recognised in every spelling (module, functional, method, in-place) and named by
a canonical string. Nothing here mutates a graph.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxcompress.graph.modules import Pad
from fxcompress.maths import ConvParams, LinearParams

__all__ = [
    "ACTIVATIONS",
    "ActivationSpec",
    "BatchNormCall",
    "activation_function",
    "activation_of",
    "batchnorm_call",
    "batchnorm_of",
    "bn_statistics",
    "functional_inplace",
    "is_add",
    "is_inplace",
    "layer_of",
    "module_call_counts",
    "pad_of",
    "reads_rank_only",
    "single_user",
]


@dataclass(frozen=True)
class ActivationSpec:
    """A recognised activation: its canonical ``name`` and constant arguments."""

    name: str
    kwargs: tuple[tuple[str, Any], ...] = ()


_MODULE_ACTS: dict[type[nn.Module], Callable[[nn.Module], ActivationSpec]] = {
    nn.ReLU: lambda m: ActivationSpec("relu"),
    nn.ReLU6: lambda m: ActivationSpec("relu6"),
    nn.Hardswish: lambda m: ActivationSpec("hardswish"),
    nn.Hardsigmoid: lambda m: ActivationSpec("hardsigmoid"),
    nn.SiLU: lambda m: ActivationSpec("silu"),
    nn.Sigmoid: lambda m: ActivationSpec("sigmoid"),
    nn.Tanh: lambda m: ActivationSpec("tanh"),
    nn.Mish: lambda m: ActivationSpec("mish"),
    nn.GELU: lambda m: ActivationSpec("gelu", (("approximate", m.approximate),)),
    nn.LeakyReLU: lambda m: ActivationSpec("leaky_relu", (("negative_slope", m.negative_slope),)),
    nn.ELU: lambda m: ActivationSpec("elu", (("alpha", m.alpha),)),
    nn.Hardtanh: lambda m: ActivationSpec(
        "hardtanh", (("min_val", m.min_val), ("max_val", m.max_val))
    ),
}

# canonical name -> (functional used in canonical graphs, names of its constant keyword args)
ACTIVATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "relu": F.relu,
    "relu6": F.relu6,
    "hardswish": F.hardswish,
    "hardsigmoid": F.hardsigmoid,
    "silu": F.silu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "mish": F.mish,
    "gelu": F.gelu,
    "leaky_relu": F.leaky_relu,
    "elu": F.elu,
    "hardtanh": F.hardtanh,
}

_FUNCTION_ACTS: dict[Any, str] = {
    F.relu: "relu",
    torch.relu: "relu",
    torch.relu_: "relu",
    F.relu_: "relu",
    F.relu6: "relu6",
    F.hardswish: "hardswish",
    F.hardsigmoid: "hardsigmoid",
    F.silu: "silu",
    torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid",
    torch.tanh: "tanh",
    F.tanh: "tanh",
    F.mish: "mish",
    F.gelu: "gelu",
    F.leaky_relu: "leaky_relu",
    F.elu: "elu",
    F.hardtanh: "hardtanh",
}

_METHOD_ACTS: dict[str, str] = {
    "relu": "relu",
    "relu_": "relu",
    "sigmoid": "sigmoid",
    "sigmoid_": "sigmoid",
    "tanh": "tanh",
    "tanh_": "tanh",
}

# positional order of the constant arguments of each functional (after the input)
_POSITIONAL: dict[str, tuple[str, ...]] = {
    "gelu": ("approximate",),
    "leaky_relu": ("negative_slope", "inplace"),
    "elu": ("alpha", "inplace"),
    "hardtanh": ("min_val", "max_val", "inplace"),
    "relu": ("inplace",),
    "relu6": ("inplace",),
    "hardswish": ("inplace",),
    "hardsigmoid": ("inplace",),
    "silu": ("inplace",),
    "mish": ("inplace",),
}


def activation_function(name: str) -> Callable[..., torch.Tensor]:
    """The functional that computes the canonical activation ``name``."""
    return ACTIVATIONS[name]


# constant arguments at their default values are dropped from a spec, so that every spelling of
# the same activation gives the same spec
_DEFAULTS: dict[str, dict[str, Any]] = {
    "gelu": {"approximate": "none"},
    "leaky_relu": {"negative_slope": 0.01},
    "elu": {"alpha": 1.0},
    "hardtanh": {"min_val": -1.0, "max_val": 1.0},
}


def _normalised(spec: ActivationSpec) -> ActivationSpec:
    args = {**_DEFAULTS.get(spec.name, {}), **dict(spec.kwargs)}
    if spec.name == "hardtanh" and (args["min_val"], args["max_val"]) == (0.0, 6.0):
        return ActivationSpec("relu6")  # F.relu6 is hardtanh(x, 0, 6)
    defaults = _DEFAULTS.get(spec.name, {})
    kept = tuple(
        (k, v)
        for k, v in sorted(args.items())
        if not (k in defaults and not isinstance(v, bool) and v == defaults[k])
    )
    return ActivationSpec(spec.name, kept)


def activation_of(gm: fx.GraphModule, node: fx.Node) -> ActivationSpec | None:
    """The activation computed by ``node`` in any spelling, or ``None`` if it is not one.

    Only elementwise activations of a single tensor argument are recognised; ``inplace`` flags are
    dropped from the spec (whether rewriting an in-place call is safe is the caller's question),
    and so are constant arguments at their defaults. ``hardtanh`` clamping to [0, 6] is
    ``relu6``.

    Examples
    --------
    >>> import torch.nn.functional as F
    >>> from torch import fx, nn
    >>> class M(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.act = nn.LeakyReLU(0.2, inplace=True)
    ...     def forward(self, x):
    ...         return F.hardtanh(self.act(x), 0.0, 6.0).relu()
    >>> gm = fx.symbolic_trace(M())
    >>> specs = [activation_of(gm, n) for n in gm.graph.nodes if n.op != "placeholder"]
    >>> [s.name for s in specs[:3]], specs[0].kwargs
    (['leaky_relu', 'relu6', 'relu'], (('negative_slope', 0.2),))
    """
    spec = _activation_spec(gm, node)
    return None if spec is None else _normalised(spec)


def _activation_spec(gm: fx.GraphModule, node: fx.Node) -> ActivationSpec | None:
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        make = _MODULE_ACTS.get(type(mod))
        return make(mod) if make is not None else None
    if node.op == "call_function":
        name = _FUNCTION_ACTS.get(node.target)
        if name is None or not _only_constant_args(node):
            return None
        return ActivationSpec(name, _constant_kwargs(name, node))
    if node.op == "call_method":
        name = _METHOD_ACTS.get(str(node.target))
        return ActivationSpec(name) if name is not None and len(node.args) == 1 else None
    return None


def _only_constant_args(node: fx.Node) -> bool:
    """Whether every argument after the input is a constant (not another tensor)."""
    rest = [*node.args[1:], *node.kwargs.values()]
    return not any(isinstance(a, fx.Node) for a in rest)


def is_inplace(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether the activation ``node`` writes into its input tensor."""
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(str(node.target)), "inplace", False))
    if node.op == "call_method":
        return str(node.target).endswith("_")
    if node.target in (torch.relu_, F.relu_):
        return True
    return bool(node.kwargs.get("inplace", False)) or _positional(node, "inplace") is True


def functional_inplace(node: fx.Node) -> bool:
    """Whether ``node`` calls a functional activation with ``inplace`` given positionally as True.

    ``F.relu(x, True)``, ``F.leaky_relu(x, 0.1, True)``, ...: the spelling
    :func:`fxcompress.graph.aliasing.mutated_input` cannot read off a keyword.
    """
    return node.target in _FUNCTION_ACTS and _positional(node, "inplace") is True


def _positional(node: fx.Node, arg: str) -> Any:
    name = _FUNCTION_ACTS.get(node.target)
    order = _POSITIONAL.get(name or "", ())
    if arg in order and len(node.args) > order.index(arg) + 1:
        return node.args[order.index(arg) + 1]
    return None


def _constant_kwargs(name: str, node: fx.Node) -> tuple[tuple[str, Any], ...]:
    out = []
    for arg in _POSITIONAL.get(name, ()):
        if arg == "inplace":
            continue
        value = node.kwargs.get(arg, _positional(node, arg))
        if value is not None:
            out.append((arg, value))
    return tuple(out)


_CONV_FUNCS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}


def layer_of(gm: fx.GraphModule, node: fx.Node) -> ConvParams | LinearParams | None:
    """The conv / linear map computed by ``node``, or ``None`` if it is not a plain layer.

    Convolutions with ``padding_mode`` other than zeros, transposed convolutions and layers
    whose weights are not fixed attributes of ``gm`` are not layers here.
    """
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if type(mod) in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
            try:
                return ConvParams.from_module(mod)
            except ValueError:
                return None  # e.g. reflect padding or unresolvable 'same' padding
        if type(mod) is nn.Linear:
            return LinearParams.from_module(mod)
        return None
    if node.op == "call_function" and node.target in _CONV_FUNCS:
        return _functional_conv(gm, node, _CONV_FUNCS[node.target])
    if node.op == "call_function" and node.target is F.linear:
        weight = _attr(gm, node.args[1] if len(node.args) > 1 else node.kwargs.get("weight"))
        bias_arg = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        bias = _attr(gm, bias_arg) if bias_arg is not None else None
        if weight is None or (bias_arg is not None and bias is None):
            return None
        return LinearParams(weight.detach(), None if bias is None else bias.detach())
    return None


def _attr(gm: fx.GraphModule, arg: Any) -> torch.Tensor | None:
    if not isinstance(arg, fx.Node) or arg.op != "get_attr":
        return None
    value = gm
    for part in str(arg.target).split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value if isinstance(value, torch.Tensor) else None


def _functional_conv(gm: fx.GraphModule, node: fx.Node, ndim: int) -> ConvParams | None:
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    args = dict(zip(names, node.args))
    args.update(node.kwargs)
    weight = _attr(gm, args.get("weight"))
    bias = _attr(gm, args["bias"]) if args.get("bias") is not None else None
    if weight is None or (args.get("bias") is not None and bias is None):
        return None
    padding = args.get("padding", 0)
    if isinstance(padding, str):
        return None  # string paddings of the functional form are left alone

    def tup(v: Any) -> tuple[int, ...]:
        return tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * ndim

    try:
        return ConvParams(
            weight.detach(),
            None if bias is None else bias.detach(),
            stride=tup(args.get("stride", 1)),
            padding=tup(padding),
            dilation=tup(args.get("dilation", 1)),
            groups=int(args.get("groups", 1)),
        )
    except (ValueError, TypeError):
        return None


def pad_of(gm: fx.GraphModule, node: fx.Node) -> tuple[int, ...] | None:
    """The amounts of an fxcompress :class:`~fxcompress.graph.modules.Pad` node, else ``None``."""
    if node.op != "call_module":
        return None
    mod = gm.get_submodule(str(node.target))
    return mod.amounts if isinstance(mod, Pad) else None


_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def bn_statistics(bn: nn.modules.batchnorm._BatchNorm) -> dict[str, Any]:
    """The keyword arguments :func:`fxcompress.maths.fold_bn` takes, read off ``bn``."""
    return {
        "mean": bn.running_mean,
        "var": bn.running_var,
        "weight": bn.weight,
        "bias": bn.bias,
        "eps": bn.eps,
    }


def batchnorm_of(gm: fx.GraphModule, node: fx.Node) -> nn.modules.batchnorm._BatchNorm | None:
    """The BatchNorm module called by ``node`` if it normalises with running statistics."""
    if node.op != "call_module":
        return None
    mod = gm.get_submodule(str(node.target))
    if type(mod) not in _BN_TYPES or mod.training:
        return None
    if mod.running_mean is None or mod.running_var is None:
        return None  # track_running_stats=False: normalises with batch statistics, not foldable
    return mod


@dataclass(frozen=True, eq=False)
class BatchNormCall:
    """An eval-mode BatchNorm call found in a graph (module or functional spelling).

    Attributes
    ----------
    stats : dict
        The keyword arguments of :func:`fxcompress.maths.fold_bn` (``mean``, ``var``,
        ``weight``, ``bias``, ``eps``).
    num_features : int
        Number of channels; the BatchNorm normalises axis 1 of its input, whatever its rank.
    rank : int or None
        The input rank the module enforces (``nn.BatchNorm2d``: 4, ``nn.BatchNorm3d``: 5), or
        ``None`` if several are accepted (``nn.BatchNorm1d``: 2 or 3; ``F.batch_norm``: any).
    name : str
        The module's qualified name (for the functional spelling: the owner of its statistics).
    """

    stats: dict[str, Any]
    num_features: int
    rank: int | None
    name: str


_BN_RANK = {nn.BatchNorm1d: None, nn.BatchNorm2d: 4, nn.BatchNorm3d: 5}


def batchnorm_call(gm: fx.GraphModule, node: fx.Node) -> BatchNormCall | None:
    """The BatchNorm computed by ``node`` with running statistics, in either spelling.

    Recognised: a call of an ``nn.BatchNorm{1,2,3}d`` in eval mode (see :func:`batchnorm_of`),
    and ``F.batch_norm(x, running_mean, running_var, weight, bias, training=False, ...)`` whose
    statistics, weight and bias are attributes of ``gm`` (``get_attr`` nodes) -- the form
    ``torch.fx`` records for BatchNorm subclasses it traces through, such as timm's
    ``BatchNormAct2d``. Anything else (training mode, batch statistics, tensors computed in the
    graph) is ``None``.

    Examples
    --------
    >>> import torch.nn.functional as F
    >>> from torch import fx, nn
    >>> class M(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.bn = nn.BatchNorm2d(3).eval()
    ...     def forward(self, x):
    ...         w, b = self.bn.weight, self.bn.bias
    ...         y = F.batch_norm(x, self.bn.running_mean, self.bn.running_var, w, b, eps=1e-3)
    ...         return self.bn(y)
    >>> gm = fx.symbolic_trace(M())
    >>> calls = [batchnorm_call(gm, n) for n in gm.graph.nodes if n.op.startswith("call")]
    >>> [(c.name, c.rank, c.stats["eps"]) for c in calls]
    [('bn', None, 0.001), ('bn', 4, 1e-05)]
    """
    if node.op == "call_module":
        mod = batchnorm_of(gm, node)
        if mod is None:
            return None
        return BatchNormCall(
            bn_statistics(mod), mod.num_features, _BN_RANK[type(mod)], str(node.target)
        )
    if node.op != "call_function" or node.target is not F.batch_norm:
        return None
    names = ("input", "running_mean", "running_var", "weight", "bias")
    names += ("training", "momentum", "eps")
    args = dict(zip(names, node.args))
    args.update(node.kwargs)
    if args.get("training", False) is not False:
        return None  # batch statistics (or a flag computed at run time)
    eps = args.get("eps", 1e-5)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        return None
    mean, var = _attr(gm, args.get("running_mean")), _attr(gm, args.get("running_var"))
    tensors = {"mean": mean, "var": var}
    for key in ("weight", "bias"):
        value = args.get(key)
        tensors[key] = None if value is None else _attr(gm, value)
        if value is not None and tensors[key] is None:
            return None  # an affine parameter computed in the graph
    if mean is None or var is None or mean.dim() != 1 or var.shape != mean.shape:
        return None
    if any(t is not None and t.shape != mean.shape for t in tensors.values()):
        return None
    owner = str(args["running_mean"].target).rpartition(".")[0] or node.name
    stats = {k: None if t is None else t.detach() for k, t in tensors.items()}
    return BatchNormCall({**stats, "eps": float(eps)}, int(mean.shape[0]), None, owner)


def reads_rank_only(node: fx.Node, of: fx.Node) -> bool:
    """Whether ``node`` reads nothing of ``of`` but its number of dimensions.

    That is ``of.ndim``, ``of.dim()`` or ``of.ndimension()`` (as in the shape assertions that
    timm's layers trace into graphs); such a read may move to any tensor of the same rank.

    Examples
    --------
    >>> from torch import fx, nn
    >>> class M(nn.Module):
    ...     def forward(self, x):
    ...         return x.ndim + x.dim() + x.size(0)
    >>> gm = fx.symbolic_trace(M())
    >>> x = next(iter(gm.graph.nodes))
    >>> sorted(n.name for n in gm.graph.nodes if reads_rank_only(n, x))
    ['dim', 'getattr_1']
    """
    if node.kwargs or not node.args or node.args[0] is not of:
        return False
    if node.op == "call_function" and node.target is getattr:
        return node.args[1:] == ("ndim",)
    return node.op == "call_method" and node.target in ("dim", "ndimension") and len(node.args) == 1


_ADDS = {operator.add, operator.iadd, torch.add}


def is_add(node: fx.Node) -> bool:
    """Whether ``node`` is a plain two-tensor addition (no ``alpha``)."""
    if node.op == "call_function" and node.target in _ADDS:
        return (
            len(node.args) == 2
            and not node.kwargs
            and all(isinstance(a, fx.Node) for a in node.args)
        )
    if node.op == "call_method" and node.target in ("add", "add_", "__add__"):
        return len(node.args) == 2 and not node.kwargs and isinstance(node.args[1], fx.Node)
    return False


def single_user(node: fx.Node) -> fx.Node | None:
    """The only user of ``node``, or ``None`` if it has zero or several."""
    return next(iter(node.users)) if len(node.users) == 1 else None


def module_call_counts(gm: fx.GraphModule) -> dict[str, int]:
    """How many ``call_module`` nodes call each submodule (more than one means shared)."""
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            counts[str(node.target)] = counts.get(str(node.target), 0) + 1
    return counts
