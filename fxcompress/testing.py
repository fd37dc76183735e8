"""Property-based testing helpers: random conv/linear chains and models, and an equivalence check.

Use them to test that a deployment pipeline (``fxcompress.merge``, ``fxcompress.optimize`` with
``budget=1.0``, an export step, ...) does not change what a model computes::

    from hypothesis import given
    from fxcompress.testing import assert_equivalent, models

    @given(models())
    def test_pipeline_is_exact(case):
        model, x = case
        assert_equivalent(my_pipeline(model, x), model, x)

Every strategy draws a pair ``(model, example_input)``: the model (eval mode, in ``dtype``) and an
input tensor large enough for it. Weights are initialised from a seed that hypothesis draws, so
failures shrink and replay deterministically, and the global torch RNG is left untouched.

The strategies need `hypothesis <https://hypothesis.works>`_ (``pip install hypothesis``); it is
imported only when a strategy is called, so :func:`assert_equivalent` works without it.
``import fxcompress`` never imports this module.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._graph import clone_tensors, compare_outputs
from ._graph import default_rtol as _default_rtol

__all__ = [
    "ACTIVATION_MODULES",
    "GeneratedModel",
    "Step",
    "assert_equivalent",
    "conv_chains",
    "default_rtol",
    "graphs",
    "linear_chains",
    "models",
]

#: Activation modules the strategies put between layers (constructors, called with no argument).
ACTIVATION_MODULES: tuple[Any, ...] = (
    nn.ReLU,
    lambda: nn.ReLU(inplace=True),
    nn.ReLU6,
    nn.GELU,
    lambda: nn.GELU(approximate="tanh"),
    nn.SiLU,
    nn.Hardswish,
    lambda: nn.LeakyReLU(0.2),
    nn.Tanh,
    nn.Sigmoid,
)


#: Further activations :func:`graphs` draws from besides :data:`ACTIVATION_MODULES`: ones
#: fxcompress recognises in other spellings, and ``PReLU`` (learnable, not an activation it
#: merges across, so it must be kept as it is).
EXTRA_ACTIVATION_MODULES: tuple[Any, ...] = (
    nn.Hardsigmoid,
    nn.Mish,
    lambda: nn.ELU(0.5),
    lambda: nn.Hardtanh(-2.0, 2.0),
    lambda: nn.Hardtanh(0.0, 6.0),
    lambda: nn.LeakyReLU(0.01, inplace=True),
    nn.PReLU,
)


def _hypothesis() -> Any:
    try:
        from hypothesis import strategies as st
    except ImportError as exc:  # pragma: no cover - exercised only without hypothesis
        raise ImportError(
            "fxcompress.testing strategies need hypothesis: pip install hypothesis"
        ) from exc
    return st


# --------------------------------------------------------------------------------------------
# Equivalence check
# --------------------------------------------------------------------------------------------


def default_rtol(dtype: torch.dtype) -> float:
    """The default relative tolerance of :func:`assert_equivalent` for outputs of ``dtype``.

    float64: 1e-9, float32: 1e-4, float16: 1e-2, bfloat16: 5e-2 (8 significand bits against
    float16's 11); exact equality for other dtypes.

    Examples
    --------
    >>> default_rtol(torch.float64), default_rtol(torch.float32), default_rtol(torch.float16)
    (1e-09, 0.0001, 0.01)
    >>> default_rtol(torch.int64)
    0.0
    """
    return _default_rtol(dtype)


def _eval_run(model: Any, inputs: tuple[Any, ...]) -> Any:
    """Run ``model`` in eval mode without grad on copies of ``inputs``; restore its flags."""
    modules = list(model.modules()) if isinstance(model, nn.Module) else []
    flags = [m.training for m in modules]
    try:
        for m in modules:
            m.training = False  # not model.eval(): exported programs' modules refuse eval()
        with torch.no_grad():
            return model(*clone_tensors(inputs))  # a model may write its inputs in place
    finally:
        for m, flag in zip(modules, flags):
            m.training = flag


def assert_equivalent(a: Any, b: Any, inputs: Any, *, rtol: float | None = None) -> float:
    """Assert that ``a`` and ``b`` compute the same outputs on ``inputs``.

    Both are run in eval mode without gradients (the ``training`` flags of their submodules are
    restored afterwards), each on its own copy of the input tensors. Outputs may be tensors or
    nested tuples, lists and dicts of them; the structures must match, and every tensor pair
    must have the same shape and satisfy ``max|a - b| <= rtol * max|b|`` (``b`` is the
    reference). Non-finite values must sit at the same places. Non-tensor leaves must be equal.

    Parameters
    ----------
    a, b : callable
        The model under test and the reference (modules or any callables).
    inputs : Tensor or tuple
        Positional inputs (a single tensor is one input).
    rtol : float, optional
        Relative tolerance. By default it follows the dtype of each output (the less precise of
        the pair): float64 1e-9, float32 1e-4, float16 1e-2, bfloat16 5e-2, others exact.

    Returns
    -------
    float
        The largest relative error seen (handy for reporting).

    Raises
    ------
    AssertionError
        With the largest error, the output it occurred in (e.g. ``output[1]['logits']``) and
        the element's index.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> conv = nn.Conv2d(3, 3, 1, bias=False)
    >>> x = torch.randn(1, 3, 4, 4)
    >>> assert_equivalent(conv, lambda t: nn.functional.conv2d(t, conv.weight), x) < 1e-6
    True
    >>> assert_equivalent(conv, lambda t: 2 * conv(t), x)
    Traceback (most recent call last):
    ...
    AssertionError: outputs differ at output: max relative error 0.5 > rtol 0.0001 ...
    """
    if rtol is not None and (
        isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not rtol >= 0
    ):
        raise ValueError(f"rtol must be a non-negative number or None, got rtol={rtol!r}")
    args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    out_a = _eval_run(a, args)
    out_b = _eval_run(b, args)
    worst, problem = compare_outputs(out_a, out_b, rtol=rtol)
    if problem is not None:
        raise AssertionError(problem)
    return worst


# --------------------------------------------------------------------------------------------
# Shared drawing helpers
# --------------------------------------------------------------------------------------------

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_EPS = (1e-5, 1e-3, 0.1)


@dataclass(frozen=True)
class _BNSpec:
    eps: float
    affine: bool


def _randomise_bn(bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Non-trivial running statistics and affine parameters (uses the current torch RNG)."""
    with torch.no_grad():
        c = bn.num_features
        bn.running_mean.copy_(torch.randn(c) * 0.5)
        bn.running_var.copy_(torch.rand(c) * 1.9 + 0.1)
        if bn.affine:
            bn.weight.copy_(torch.randn(c) * 0.5 + 1.0)
            bn.bias.copy_(torch.randn(c) * 0.5)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run the block with the torch RNG seeded by ``seed``; the caller's RNG state is restored."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _activation(index: int) -> nn.Module:
    return ACTIVATION_MODULES[index]()


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _check_dtype(dtype: Any) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got dtype={dtype!r}")
    return dtype


# --------------------------------------------------------------------------------------------
# Conv chains
# --------------------------------------------------------------------------------------------


def conv_chains(
    *,
    ndim: int = 2,
    min_convs: int = 1,
    max_convs: int = 4,
    max_channels: int = 8,
    max_kernel: int = 7,
    max_stride: int = 3,
    max_dilation: int = 3,
    groups: bool = True,
    batchnorm: bool = True,
    activations: bool = True,
    padding: str = "first",
    dtype: torch.dtype = torch.float32,
    max_extent: int | None = None,
) -> Any:
    """Strategy for ``(nn.Sequential of convolutions, input)`` pairs.

    Each convolution has a random kernel size (1..``max_kernel``), stride (1..``max_stride``) and
    dilation (1..``max_dilation``) drawn per spatial axis, a bias or not, and groups that are
    dense, grouped or depthwise (with a channel multiplier). Optionally an eval-mode BatchNorm
    with random running statistics and ``eps`` follows a conv, and an activation sits between
    two convs. The input is just large enough (per axis at most ``max_extent``) for the chain.

    Parameters
    ----------
    ndim : {1, 2, 3}
        Spatial axes.
    min_convs, max_convs : int
        Number of convolutions.
    max_channels : int
        Largest channel count.
    max_kernel, max_stride, max_dilation : int
        Upper bounds per axis.
    groups : bool
        Allow grouped and depthwise convolutions.
    batchnorm : bool
        Allow a BatchNorm after each conv.
    activations : bool
        Allow an activation (from :data:`ACTIVATION_MODULES`) between convs.
    padding : {"first", "none", "all"}
        Which convs may zero-pad: only the first (such chains merge exactly into one conv when
        there is no activation), none, or all.
    dtype : torch.dtype
        Of the parameters and the input.
    max_extent : int, optional
        Largest input size per axis (default 40, 160 and 12 for 2-D, 1-D and 3-D); kernels,
        dilations and strides are drawn within it.

    Returns
    -------
    hypothesis.strategies.SearchStrategy
        Of ``(model, x)`` with ``model`` an ``nn.Sequential`` in eval mode.

    Examples
    --------
    >>> import torch
    >>> from hypothesis import given, settings
    >>> @settings(max_examples=5, database=None, deadline=None)
    ... @given(conv_chains(dtype=torch.float64))
    ... def check(case):
    ...     model, x = case
    ...     assert model(x).dtype == torch.float64
    >>> check()
    """
    st = _hypothesis()
    if ndim not in (1, 2, 3):
        raise ValueError(f"ndim must be 1, 2 or 3, got ndim={ndim!r}")
    if padding not in ("first", "none", "all"):
        raise ValueError(f"padding must be 'first', 'none' or 'all', got padding={padding!r}")
    if not 1 <= min_convs <= max_convs:
        raise ValueError(f"need 1 <= min_convs <= max_convs, got {min_convs}, {max_convs}")
    dtype = _check_dtype(dtype)
    extent = max_extent if max_extent is not None else {1: 160, 2: 40, 3: 12}[ndim]

    @st.composite
    def draw_chain(draw: Any) -> tuple[nn.Sequential, torch.Tensor]:
        n = draw(st.integers(min_convs, max_convs))
        c_in = draw(st.integers(1, max_channels))
        channels = c_in
        rf = [1] * ndim
        jump = [1] * ndim
        first_pad = [0] * ndim
        specs: list[dict[str, Any]] = []
        for i in range(n):
            kernel, stride, dil, pad = [], [], [], []
            for ax in range(ndim):
                span = max(0, (extent - rf[ax]) // jump[ax])
                d = draw(st.integers(1, max(1, min(max_dilation, span))))
                k = draw(st.integers(1, max(1, min(max_kernel, span // d + 1))))
                s = draw(st.integers(1, max_stride))
                if jump[ax] * s > extent:
                    s = 1
                may_pad = padding == "all" or (padding == "first" and i == 0)
                p = draw(st.integers(0, d * (k - 1))) if may_pad else 0
                rf[ax] += (k - 1) * d * jump[ax]
                if i == 0:
                    first_pad[ax] = p
                jump[ax] *= s
                kernel.append(k)
                stride.append(s)
                dil.append(d)
                pad.append(p)
            kind = draw(st.sampled_from(("dense", "grouped", "depthwise"))) if groups else "dense"
            if kind == "depthwise":
                g = channels
                out = channels * draw(st.integers(1, max(1, max_channels // channels)))
            elif kind == "grouped":
                g = draw(st.sampled_from(_divisors(channels)))
                out = g * draw(st.integers(1, max(1, max_channels // g)))
            else:
                g = 1
                out = draw(st.integers(1, max_channels))
            bn = None
            if batchnorm and draw(st.booleans()):
                bn = _BNSpec(draw(st.sampled_from(_EPS)), draw(st.booleans()))
            act = None
            if activations and i < n - 1 and draw(st.booleans()):
                act = draw(st.integers(0, len(ACTIVATION_MODULES) - 1))
            specs.append(
                {
                    "in": channels,
                    "out": out,
                    "kernel": tuple(kernel),
                    "stride": tuple(stride),
                    "dilation": tuple(dil),
                    "padding": tuple(pad),
                    "groups": g,
                    "bias": draw(st.booleans()),
                    "bn": bn,
                    "act": act,
                }
            )
            channels = out
        # input size: enough for the receptive field, plus a few positions to exercise strides
        size = []
        for ax in range(ndim):
            need = max(1, rf[ax] - 2 * first_pad[ax])
            # keep the padded intermediate maps non-empty with "all" padding as well
            size.append(min(max(need, 1) + draw(st.integers(0, 3)), max(extent, need)))
        batch = draw(st.integers(1, 2))
        seed = draw(st.integers(0, 2**31 - 1))
        return _build_chain(ndim, specs, (batch, c_in, *size), dtype, seed)

    return draw_chain()


def _build_chain(
    ndim: int,
    specs: list[dict[str, Any]],
    input_shape: tuple[int, ...],
    dtype: torch.dtype,
    seed: int,
) -> tuple[nn.Sequential, torch.Tensor]:
    with _seeded(seed):
        layers: list[nn.Module] = []
        for s in specs:
            layers.append(
                _CONV[ndim](
                    s["in"],
                    s["out"],
                    s["kernel"],
                    stride=s["stride"],
                    padding=s["padding"],
                    dilation=s["dilation"],
                    groups=s["groups"],
                    bias=s["bias"],
                )
            )
            if s["bn"] is not None:
                bn = _BN[ndim](s["out"], eps=s["bn"].eps, affine=s["bn"].affine)
                _randomise_bn(bn)
                layers.append(bn)
            if s["act"] is not None:
                layers.append(_activation(s["act"]))
        model = nn.Sequential(*layers).to(dtype).eval()
        x = torch.randn(input_shape, dtype=dtype)
    return model, x


# --------------------------------------------------------------------------------------------
# Linear chains
# --------------------------------------------------------------------------------------------


def linear_chains(
    *,
    min_layers: int = 1,
    max_layers: int = 4,
    max_features: int = 16,
    batchnorm: bool = True,
    activations: bool = True,
    sequence: bool = True,
    dtype: torch.dtype = torch.float32,
) -> Any:
    """Strategy for ``(nn.Sequential of nn.Linear, input)`` pairs.

    Feature sizes are drawn in 1..``max_features``; biases are on or off; an eval-mode
    ``BatchNorm1d`` with random statistics may follow a layer and an activation may sit between
    two layers. The input is ``(batch, d_in)``, or ``(batch, length, d_in)`` when ``sequence``
    allows it and the chain has no BatchNorm (``BatchNorm1d`` normalises axis 1).

    Returns
    -------
    hypothesis.strategies.SearchStrategy
        Of ``(model, x)``.

    Examples
    --------
    >>> import torch
    >>> from hypothesis import given, settings
    >>> @settings(max_examples=5, database=None, deadline=None)
    ... @given(linear_chains(batchnorm=False, activations=False))
    ... def check(case):
    ...     model, x = case
    ...     assert model(x).shape[-1] == model[-1].out_features
    >>> check()
    """
    st = _hypothesis()
    if not 1 <= min_layers <= max_layers:
        raise ValueError(f"need 1 <= min_layers <= max_layers, got {min_layers}, {max_layers}")
    dtype = _check_dtype(dtype)

    @st.composite
    def draw_chain(draw: Any) -> tuple[nn.Sequential, torch.Tensor]:
        n = draw(st.integers(min_layers, max_layers))
        sizes = [draw(st.integers(1, max_features)) for _ in range(n + 1)]
        bias = [draw(st.booleans()) for _ in range(n)]
        bns = [
            _BNSpec(draw(st.sampled_from(_EPS)), draw(st.booleans()))
            if batchnorm and draw(st.booleans())
            else None
            for _ in range(n)
        ]
        acts = [
            draw(st.integers(0, len(ACTIVATION_MODULES) - 1))
            if activations and i < n - 1 and draw(st.booleans())
            else None
            for i in range(n)
        ]
        lead: tuple[int, ...] = (draw(st.integers(1, 3)),)
        if sequence and all(b is None for b in bns) and draw(st.booleans()):
            lead = (*lead, draw(st.integers(1, 4)))
        seed = draw(st.integers(0, 2**31 - 1))
        with _seeded(seed):
            layers: list[nn.Module] = []
            for i in range(n):
                layers.append(nn.Linear(sizes[i], sizes[i + 1], bias=bias[i]))
                if bns[i] is not None:
                    bn = nn.BatchNorm1d(sizes[i + 1], eps=bns[i].eps, affine=bns[i].affine)
                    _randomise_bn(bn)
                    layers.append(bn)
                if acts[i] is not None:
                    layers.append(_activation(acts[i]))
            model = nn.Sequential(*layers).to(dtype).eval()
            x = torch.randn((*lead, sizes[0]), dtype=dtype)
        return model, x

    return draw_chain()


# --------------------------------------------------------------------------------------------
# Random DAG models
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One step of a :class:`GeneratedModel`: ``values.append(op(values[i] for i in inputs))``.

    ``op`` is ``"module"`` (call the submodule named ``arg``), ``"conv_fn"`` (``F.conv2d`` on the
    model's parameters ``arg``), ``"add"``, ``"cat"``, ``"relu"`` (``F.relu``), ``"relu_method"``
    (``x.relu()``), ``"scale"`` (``x * arg``), ``"gate"`` (``x * sigmoid(x)``),
    ``"max_pool"``/``"avg_pool"`` (2x2), ``"global_pool"`` (adaptive average to 1x1),
    ``"flatten"``, ``"mul"`` (two values), ``"sigmoid"``, ``"reshape"`` (flatten the spatial
    axes and unflatten them to ``arg``), ``"transpose"`` (swap the spatial axes and back) or
    ``"mean_pool"`` (``x.mean((2, 3), keepdim=True)``). ``"add"`` is spelled ``a + b`` unless
    ``arg`` is ``"torch.add"`` or ``"method"`` (``a.add(b)``).
    """

    op: str
    inputs: tuple[int, ...]
    arg: Any = None


class GeneratedModel(nn.Module):
    """A model that runs a fixed list of :class:`Step` (traceable by ``torch.fx``).

    ``forward(x)`` starts with ``values = [x]``, appends the result of every step and returns
    the values listed in ``outputs`` (one tensor, or a tuple when several).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> m = GeneratedModel(
    ...     {"conv": nn.Conv2d(2, 2, 3, padding=1)},
    ...     [Step("module", (0,), "conv"), Step("add", (0, 1)), Step("relu", (2,))],
    ... )
    >>> print(m.program())
    v1 = conv(v0)
    v2 = v0 + v1
    v3 = relu(v2)
    return v3
    >>> m(torch.randn(1, 2, 5, 5)).shape
    torch.Size([1, 2, 5, 5])
    """

    def __init__(
        self,
        modules: dict[str, nn.Module],
        steps: Sequence[Step],
        outputs: Sequence[int] = (-1,),
        params: dict[str, nn.Parameter] | None = None,
    ) -> None:
        super().__init__()
        for name, module in modules.items():
            self.add_module(name, module)
        for name, param in (params or {}).items():
            self.register_parameter(name, param)
        self.steps = tuple(steps)
        n = len(self.steps) + 1
        self.outputs = tuple(o % n for o in outputs)

    def forward(self, x: torch.Tensor) -> Any:
        values = [x]
        for step in self.steps:
            values.append(self._run(step, [values[i] for i in step.inputs]))
        if len(self.outputs) == 1:
            return values[self.outputs[0]]
        return tuple(values[i] for i in self.outputs)

    def _run(self, step: Step, args: list[torch.Tensor]) -> torch.Tensor:
        op = step.op
        if op == "module":
            return getattr(self, step.arg)(args[0])
        if op == "conv_fn":
            weight, bias, stride, padding = step.arg
            b = getattr(self, bias) if bias is not None else None
            return F.conv2d(args[0], getattr(self, weight), b, stride=stride, padding=padding)
        if op == "add":
            if step.arg == "torch.add":
                return torch.add(args[0], args[1])
            if step.arg == "method":
                return args[0].add(args[1])
            return args[0] + args[1]
        if op == "mul":
            return args[0] * args[1]
        if op == "sigmoid":
            return torch.sigmoid(args[0])
        if op == "reshape":
            return args[0].flatten(2).unflatten(2, step.arg)
        if op == "transpose":
            return args[0].transpose(-1, -2).contiguous().transpose(-1, -2)
        if op == "mean_pool":
            return args[0].mean((2, 3), keepdim=True)
        if op == "cat":
            return torch.cat(args, dim=1)
        if op == "relu":
            return F.relu(args[0])
        if op == "relu_method":
            return args[0].relu()
        if op == "scale":
            return args[0] * step.arg
        if op == "gate":
            return args[0] * torch.sigmoid(args[0])
        if op == "max_pool":
            return F.max_pool2d(args[0], 2)
        if op == "avg_pool":
            return F.avg_pool2d(args[0], 2)
        if op == "global_pool":
            return F.adaptive_avg_pool2d(args[0], 1)
        if op == "flatten":
            return torch.flatten(args[0], 1)
        raise ValueError(f"unknown step op {op!r}")

    def program(self) -> str:
        """The steps as pseudo-code, one line each."""
        lines = []
        for i, s in enumerate(self.steps, start=1):
            a = [f"v{j}" for j in s.inputs]
            body = {
                "module": lambda s=s, a=a: f"{s.arg}({a[0]})",
                "conv_fn": lambda s=s, a=a: f"F.conv2d({a[0]}, {s.arg})",
                "add": lambda a=a: f"{a[0]} + {a[1]}",
                "mul": lambda a=a: f"{a[0]} * {a[1]}",
                "cat": lambda a=a: f"cat([{', '.join(a)}], 1)",
                "scale": lambda s=s, a=a: f"{a[0]} * {s.arg}",
                "gate": lambda a=a: f"{a[0]} * sigmoid({a[0]})",
            }.get(s.op, lambda s=s, a=a: f"{s.op}({a[0]})")()
            lines.append(f"v{i} = {body}")
        lines.append("return " + ", ".join(f"v{o}" for o in self.outputs))
        return "\n".join(lines)

    def extra_repr(self) -> str:
        return "program:\n  " + self.program().replace("\n", "\n  ")


def models(
    *,
    max_steps: int = 6,
    max_channels: int = 8,
    min_size: int = 6,
    max_size: int = 12,
    head: bool | None = None,
    multiple_outputs: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Any:
    """Strategy for small random 2-D CNNs as ``(GeneratedModel, input)`` pairs.

    A model is a sequence of blocks drawn from: conv (+ BatchNorm) (+ activation, in module,
    functional, method or in-place spelling); a residual block with an identity shortcut or a
    projection shortcut (1x1 conv, same stride, optional BatchNorm); a conv module called at two
    places (shared weights), once followed by a BatchNorm; a functional ``F.conv2d`` on the
    model's own parameters; elementwise ops (scaling, a sigmoid gate); two branches concatenated
    on channels; max/average pooling. An optional head pools or flattens and ends in one or two
    ``nn.Linear``. Convs are dense, grouped or depthwise, with or without bias and padding.

    Parameters
    ----------
    max_steps : int
        Largest number of blocks (at least one).
    max_channels : int
        Largest channel count of a block.
    min_size, max_size : int
        Range of the input's height and width.
    head : bool, optional
        Force a linear head on (True) or off (False); drawn when None.
    multiple_outputs : bool
        Let the model return a tuple of several intermediate values.
    dtype : torch.dtype
        Of the parameters and the input.

    Returns
    -------
    hypothesis.strategies.SearchStrategy
        Of ``(model, x)``; ``print(model)`` shows the program.

    Examples
    --------
    >>> import torch
    >>> from hypothesis import given, settings
    >>> @settings(max_examples=5, database=None, deadline=None)
    ... @given(models(dtype=torch.float64))
    ... def check(case):
    ...     model, x = case
    ...     assert_equivalent(torch.fx.symbolic_trace(model), model, x)
    >>> check()
    """
    return _model_strategy(
        _MODEL_BLOCKS,
        max_steps=max_steps,
        max_channels=max_channels,
        min_size=min_size,
        max_size=max_size,
        head=head,
        multiple_outputs=multiple_outputs,
        dtype=dtype,
        rich=False,
    )


_MODEL_BLOCKS = (
    "conv",
    "conv",
    "residual",
    "projection",
    "shared",
    "conv_fn",
    "elementwise",
    "cat",
    "pool",
)
_GRAPH_BLOCKS = (
    *_MODEL_BLOCKS,
    "conv",
    "residual",
    "bottleneck",
    "squeeze_excite",
    "reshape",
    "shared_linear",
)


def graphs(
    *,
    max_steps: int = 8,
    max_channels: int = 8,
    min_size: int = 5,
    max_size: int = 12,
    head: bool | None = None,
    multiple_outputs: bool = True,
    dtype: torch.dtype = torch.float32,
) -> Any:
    """Strategy for random model DAGs, richer than :func:`models`: the graph fuzzer.

    Everything :func:`models` draws, plus: non-square kernels and per-axis strides, dilation,
    groups and uncentred padding; bottleneck residuals (1x1, kxk, 1x1) with identity or
    projection shortcuts; squeeze-excite gates (global pool, two 1x1 convs, sigmoid, multiply);
    reshapes (flatten/unflatten, transpose round trips); a linear layer called twice; residual
    adds spelled ``+``, ``torch.add`` and ``Tensor.add``; and more activation kinds
    (:data:`EXTRA_ACTIVATION_MODULES`, ``PReLU`` among them). By default a model may return
    several values.

    Parameters
    ----------
    See :func:`models`.

    Returns
    -------
    hypothesis.strategies.SearchStrategy
        Of ``(model, x)`` with ``model`` a :class:`GeneratedModel` in eval mode.

    Examples
    --------
    >>> import torch
    >>> from hypothesis import given, settings
    >>> @settings(max_examples=5, database=None, deadline=None)
    ... @given(graphs(dtype=torch.float64))
    ... def check(case):
    ...     model, x = case
    ...     assert_equivalent(torch.fx.symbolic_trace(model), model, x)
    >>> check()
    """
    return _model_strategy(
        _GRAPH_BLOCKS,
        max_steps=max_steps,
        max_channels=max_channels,
        min_size=min_size,
        max_size=max_size,
        head=head,
        multiple_outputs=multiple_outputs,
        dtype=dtype,
        rich=True,
    )


def _model_strategy(
    kinds: tuple[str, ...],
    *,
    max_steps: int,
    max_channels: int,
    min_size: int,
    max_size: int,
    head: bool | None,
    multiple_outputs: bool,
    dtype: torch.dtype,
    rich: bool,
) -> Any:
    st = _hypothesis()
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got max_steps={max_steps!r}")
    if not 1 <= min_size <= max_size:
        raise ValueError(f"need 1 <= min_size <= max_size, got {min_size}, {max_size}")
    dtype = _check_dtype(dtype)

    @st.composite
    def draw_model(draw: Any) -> tuple[GeneratedModel, torch.Tensor]:
        b = _Builder(draw, st, max_channels, rich=rich)
        c = draw(st.integers(1, max_channels))
        h = draw(st.integers(min_size, max_size))
        w = draw(st.integers(min_size, max_size))
        b.shapes.append((c, h, w))
        for _ in range(draw(st.integers(1, max_steps))):
            getattr(b, f"block_{draw(st.sampled_from(kinds))}")()
        outputs: list[int] = [-1]
        if multiple_outputs and len(b.shapes) > 2:
            extra = draw(st.lists(st.integers(1, len(b.shapes) - 2), max_size=2, unique=True))
            outputs = [*extra, -1]
        if head is True or (head is None and draw(st.booleans())):
            b.block_head()
        seed = draw(st.integers(0, 2**31 - 1))
        with _seeded(seed):
            modules = {name: make() for name, make in b.makers.items()}
            for m in modules.values():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    _randomise_bn(m)
            params = {
                name: nn.Parameter(torch.randn(shape) / math.sqrt(max(1, math.prod(shape[1:]))))
                for name, shape in b.params.items()
            }
            model = GeneratedModel(modules, b.steps, outputs, params).to(dtype).eval()
            x = torch.randn((b.batch, c, h, w), dtype=dtype)
        return model, x

    return draw_model()


class _Builder:
    """Draws the blocks of a :class:`GeneratedModel`, tracking every value's (C, H, W)."""

    def __init__(self, draw: Any, st: Any, max_channels: int, *, rich: bool = False) -> None:
        self.draw = draw
        self.st = st
        self.max_channels = max_channels
        self.rich = rich  # graphs(): per-axis geometry, more activations and spellings
        self.shapes: list[tuple[int, ...]] = []
        self.steps: list[Step] = []
        self.makers: dict[str, Any] = {}
        self.params: dict[str, tuple[int, ...]] = {}
        self.batch = draw(st.integers(1, 2))

    # -- bookkeeping
    def _name(self, stem: str) -> str:
        i = 0
        while f"{stem}{i}" in self.makers or f"{stem}{i}" in self.params:
            i += 1
        return f"{stem}{i}"

    def _emit(self, step: Step, shape: tuple[int, ...]) -> int:
        self.steps.append(step)
        self.shapes.append(shape)
        return len(self.shapes) - 1

    def _module(self, stem: str, make: Any, src: int, shape: tuple[int, ...]) -> int:
        name = self._name(stem)
        self.makers[name] = make
        return self._emit(Step("module", (src,), name), shape)

    @property
    def last(self) -> int:
        return len(self.shapes) - 1

    def _spatial_source(self) -> int | None:
        """The last value when it is a feature map (blocks only extend the last value)."""
        return self.last if len(self.shapes[self.last]) == 3 else None

    # -- pieces
    def conv(
        self,
        src: int,
        *,
        out: int | None = None,
        kernel: int | None = None,
        stride: int | None = None,
        centred: bool | None = None,
        dense: bool = False,
    ) -> int:
        draw, st = self.draw, self.st
        if self.rich and kernel is None and stride is None and centred is None:
            return self._free_conv(src, out=out, dense=dense)
        c, h, w = self.shapes[src]
        k = kernel if kernel is not None else draw(st.sampled_from((1, 1, 3, 3, 5)))
        d = 1 if k == 1 else draw(st.sampled_from((1, 1, 2)))
        span = d * (k - 1)
        is_centred = centred if centred is not None else draw(st.booleans())
        p = span // 2 if is_centred else 0
        while min(h, w) + 2 * p - span < 1:  # too small for this kernel: pad it
            p += 1
        s = stride if stride is not None else draw(st.sampled_from((1, 1, 2)))
        kind = "dense" if dense else draw(st.sampled_from(("dense", "dense", "grouped", "dw")))
        if kind == "dw":
            g, o = c, c * draw(st.integers(1, max(1, self.max_channels // c)))
        elif kind == "grouped":
            g = draw(st.sampled_from(_divisors(c)))
            o = g * draw(st.integers(1, max(1, self.max_channels // g)))
        else:
            g, o = 1, draw(st.integers(1, self.max_channels))
        if out is not None:
            g = math.gcd(g, out)
            o = out
        bias = draw(st.booleans())
        shape = (o, (h + 2 * p - span - 1) // s + 1, (w + 2 * p - span - 1) // s + 1)
        return self._module(
            "conv",
            lambda: nn.Conv2d(c, o, k, stride=s, padding=p, dilation=d, groups=g, bias=bias),
            src,
            shape,
        )

    def _groups(self, c: int, out: int | None, dense: bool) -> tuple[int, int]:
        draw, st = self.draw, self.st
        kind = "dense" if dense else draw(st.sampled_from(("dense", "dense", "grouped", "dw")))
        if kind == "dw":
            g, o = c, c * draw(st.integers(1, max(1, self.max_channels // c)))
        elif kind == "grouped":
            g = draw(st.sampled_from(_divisors(c)))
            o = g * draw(st.integers(1, max(1, self.max_channels // g)))
        else:
            g, o = 1, draw(st.integers(1, self.max_channels))
        if out is not None:
            g, o = math.gcd(g, out), out
        return g, o

    def _free_conv(self, src: int, *, out: int | None, dense: bool) -> int:
        """A conv with kernel, stride, dilation and padding drawn per axis (may be uncentred)."""
        draw, st = self.draw, self.st
        c, *spatial = self.shapes[src]
        kernel, stride, dilation, padding, size = [], [], [], [], []
        for n in spatial:
            k = draw(st.sampled_from((1, 1, 2, 3, 3, 5)))
            d = 1 if k == 1 else draw(st.sampled_from((1, 1, 2, 3)))
            span = d * (k - 1)
            p = draw(st.integers(0, span))  # 0 .. "full" padding, centred or not
            while n + 2 * p - span < 1:
                p += 1
            s = draw(st.sampled_from((1, 1, 2, 3)))
            kernel.append(k)
            dilation.append(d)
            padding.append(p)
            stride.append(s)
            size.append((n + 2 * p - span - 1) // s + 1)
        g, o = self._groups(c, out, dense)
        bias = draw(st.booleans())
        k_, s_, p_, d_ = tuple(kernel), tuple(stride), tuple(padding), tuple(dilation)
        return self._module(
            "conv",
            lambda: nn.Conv2d(c, o, k_, stride=s_, padding=p_, dilation=d_, groups=g, bias=bias),
            src,
            (o, *size),
        )

    def bn(self, src: int) -> int:
        eps = self.draw(self.st.sampled_from(_EPS))
        c = self.shapes[src][0]
        return self._module("bn", lambda: nn.BatchNorm2d(c, eps=eps), src, self.shapes[src])

    def act(self, src: int) -> int:
        spelling = self.draw(self.st.sampled_from(("module", "module", "relu", "relu_method")))
        if spelling == "module":
            if self.rich:
                choices = ACTIVATION_MODULES + EXTRA_ACTIVATION_MODULES
                make = choices[self.draw(self.st.integers(0, len(choices) - 1))]
                return self._module("act", make, src, self.shapes[src])
            i = self.draw(self.st.integers(0, len(ACTIVATION_MODULES) - 1))
            return self._module("act", lambda: _activation(i), src, self.shapes[src])
        return self._emit(Step(spelling, (src,)), self.shapes[src])

    def add(self, a: int, b: int) -> int:
        spelling = None
        if self.rich:
            spelling = self.draw(self.st.sampled_from((None, "torch.add", "method")))
        return self._emit(Step("add", (a, b), spelling), self.shapes[a])

    def unit(self, src: int, **kw: Any) -> int:
        v = self.conv(src, **kw)
        if self.draw(self.st.booleans()):
            v = self.bn(v)
        return v

    # -- blocks
    def block_conv(self) -> None:
        src = self._spatial_source()
        if src is None:
            return
        v = self.unit(src)
        if self.draw(self.st.booleans()):
            self.act(v)

    def block_residual(self) -> None:
        src = self._spatial_source()
        if src is None:
            return
        c = self.shapes[src][0]
        v = self.unit(
            src, out=c, kernel=self.draw(self.st.sampled_from((1, 3))), stride=1, centred=True
        )
        if self.draw(self.st.booleans()):
            v = self.act(v)
            v = self.unit(v, out=c, kernel=3, stride=1, centred=True)
        order = (src, v) if self.draw(self.st.booleans()) else (v, src)
        v = self.add(*order)
        if self.draw(self.st.booleans()):
            self.act(v)

    def block_projection(self) -> None:
        src = self._spatial_source()
        if src is None:
            return
        s = self.draw(self.st.sampled_from((1, 2)))
        o = self.draw(self.st.integers(1, self.max_channels))
        branch = self.unit(src, out=o, kernel=3, stride=s, centred=True)
        short = self.unit(src, out=o, kernel=1, stride=s, centred=True)
        v = self.add(branch, short)
        if self.draw(self.st.booleans()):
            self.act(v)

    def block_shared(self) -> None:
        src = self._spatial_source()
        if src is None:
            return
        c, h, w = self.shapes[src]
        name = self._name("shared")
        k = self.draw(self.st.sampled_from((1, 3)))
        bias = self.draw(self.st.booleans())
        self.makers[name] = lambda: nn.Conv2d(c, c, k, padding=k // 2, bias=bias)
        first = self._emit(Step("module", (src,), name), (c, h, w))
        mid = first
        if self.draw(self.st.booleans()):
            mid = self.bn(mid)  # BN after one call site only (pytorch issue 104593)
        if self.draw(self.st.booleans()):
            mid = self.act(mid)
        second = self._emit(Step("module", (mid,), name), (c, h, w))
        if self.draw(self.st.booleans()):
            self.bn(second)

    def block_conv_fn(self) -> None:
        src = self._spatial_source()
        if src is None:
            return
        c, h, w = self.shapes[src]
        o = self.draw(self.st.integers(1, self.max_channels))
        k = self.draw(self.st.sampled_from((1, 3)))
        p = k // 2 if self.draw(self.st.booleans()) or min(h, w) < k else 0
        weight = self._name("weight")
        self.params[weight] = (o, c, k, k)
        bias = None
        if self.draw(self.st.booleans()):
            bias = self._name("bias")
            self.params[bias] = (o,)
        shape = (o, h + 2 * p - k + 1, w + 2 * p - k + 1)
        v = self._emit(Step("conv_fn", (src,), (weight, bias, 1, p)), shape)
        if self.draw(self.st.booleans()):
            v = self.bn(v)

    def block_elementwise(self) -> None:
        src = self.last
        if self.draw(self.st.booleans()):
            factor = self.draw(self.st.sampled_from((0.5, -1.0, 2.0)))
            self._emit(Step("scale", (src,), factor), self.shapes[src])
        else:
            self._emit(Step("gate", (src,)), self.shapes[src])

    def block_cat(self) -> None:
        src = self._spatial_source()
        if src is None:
            return
        a = self.unit(src, stride=1, centred=True, kernel=self.draw(self.st.sampled_from((1, 3))))
        if self.draw(self.st.booleans()):
            b = src
        else:
            b = self.unit(src, stride=1, centred=True, kernel=1)
        self._emit(
            Step("cat", (a, b)), (self.shapes[a][0] + self.shapes[b][0], *self.shapes[a][1:])
        )

    def block_pool(self) -> None:
        src = self._spatial_source()
        if src is None:
            return
        c, h, w = self.shapes[src]
        if min(h, w) < 2:
            return
        op = self.draw(self.st.sampled_from(("max_pool", "avg_pool")))
        self._emit(Step(op, (src,)), (c, h // 2, w // 2))

    def block_bottleneck(self) -> None:
        """1x1 -> kxk (strided, maybe depthwise) -> 1x1, identity or projection shortcut."""
        src = self._spatial_source()
        if src is None:
            return
        draw, st = self.draw, self.st
        c = self.shapes[src][0]
        mid = draw(st.integers(1, self.max_channels))
        stride = draw(st.sampled_from((1, 1, 2)))
        v = self.unit(src, out=mid, kernel=1, stride=1, centred=True, dense=True)
        v = self.act(v)
        v = self.unit(v, out=mid, kernel=3, stride=stride, centred=True)
        if draw(st.booleans()):
            v = self.act(v)
        out = c if stride == 1 and draw(st.booleans()) else draw(st.integers(1, self.max_channels))
        v = self.unit(v, out=out, kernel=1, stride=1, centred=True, dense=True)
        if stride == 1 and out == c:
            short = src
        else:
            short = self.unit(src, out=out, kernel=1, stride=stride, centred=True, dense=True)
        v = self.add(v, short)
        if draw(st.booleans()):
            self.act(v)

    def block_squeeze_excite(self) -> None:
        """``x * sigmoid(conv(act(conv(pool(x)))))``: a multiplicative gate."""
        src = self._spatial_source()
        if src is None:
            return
        draw, st = self.draw, self.st
        c = self.shapes[src][0]
        pool = draw(st.sampled_from(("global_pool", "mean_pool")))
        g = self._emit(Step(pool, (src,)), (c, 1, 1))
        g = self.conv(
            g,
            out=draw(st.integers(1, self.max_channels)),
            kernel=1,
            stride=1,
            centred=True,
            dense=True,
        )
        g = self.act(g)
        g = self.conv(g, out=c, kernel=1, stride=1, centred=True, dense=True)
        if draw(st.booleans()):
            g = self._emit(Step("sigmoid", (g,)), (c, 1, 1))
        else:
            g = self._module("gate", nn.Hardsigmoid, g, (c, 1, 1))
        self._emit(Step("mul", (src, g) if draw(st.booleans()) else (g, src)), self.shapes[src])

    def block_reshape(self) -> None:
        src = self._spatial_source()
        if src is None:
            return
        c, h, w = self.shapes[src]
        if self.draw(self.st.booleans()):
            self._emit(Step("reshape", (src,), (h, w)), (c, h, w))
        else:
            self._emit(Step("transpose", (src,)), (c, h, w))

    def block_shared_linear(self) -> None:
        """One ``nn.Linear(f, f)`` called twice (on a pooled, flattened map if need be)."""
        src = self.last
        if len(self.shapes[src]) == 3:
            c = self.shapes[src][0]
            src = self._emit(Step("global_pool", (src,)), (c, 1, 1))
            src = self._emit(Step("flatten", (src,)), (c,))
        (features,) = self.shapes[src]
        name = self._name("shared_fc")
        bias = self.draw(self.st.booleans())
        self.makers[name] = lambda: nn.Linear(features, features, bias=bias)
        v = self._emit(Step("module", (src,), name), (features,))
        if self.draw(self.st.booleans()):
            v = self.act(v)
        self._emit(Step("module", (v,), name), (features,))

    def block_head(self) -> None:
        src = self.last
        if len(self.shapes[src]) == 3:
            c, h, w = self.shapes[src]
            if c * h * w > 256 or self.draw(self.st.booleans()):
                src = self._emit(Step("global_pool", (src,)), (c, 1, 1))
            src = self._emit(Step("flatten", (src,)), (math.prod(self.shapes[src]),))
        (features,) = self.shapes[src]
        hidden = self.draw(self.st.integers(1, 16))
        v = self._module("fc", lambda: nn.Linear(features, hidden), src, (hidden,))
        if self.draw(self.st.booleans()):
            if self.draw(self.st.booleans()):
                v = self.act(v)
            out = self.draw(self.st.integers(1, 10))
            self._module("fc", lambda: nn.Linear(hidden, out), v, (out,))
