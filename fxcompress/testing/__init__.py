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

Hostile models are opt-in: ``hooks=True`` registers deterministic forward hooks (:class:`Hook`) on
convolutions, activations, ``nn.Identity`` / ``nn.Dropout`` and other modules, ``inplace=True``
lets the model write its input and intermediate values in place (values that are read again
later), and ``unbatched=True`` lets the input lack the batch axis (a ``(C, L)`` or ``(C, H, W)``
tensor; a BatchNorm then normalises the first spatial axis, which torch reads as channels).
:func:`graphs` also draws, by default, residual forks at prunable units, BatchNorms that follow
no convolution and sums of three or more branches (RepVGG-like blocks).

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

from fxcompress.graph.util import clone_tensors, compare_outputs
from fxcompress.graph.util import default_rtol as _default_rtol

__all__ = [
    "ACTIVATION_MODULES",
    "HOOK_KINDS",
    "INPLACE_OPS",
    "GeneratedModel",
    "Hook",
    "InplaceOp",
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
    features: int | None = None  # default: the conv's output channels
    dims: int | None = None  # BatchNorm{dims}d; default: the conv's


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
# Hostile pieces: hooks and in-place writes
# --------------------------------------------------------------------------------------------

#: Kinds of :class:`Hook`.
HOOK_KINDS = ("output", "output_inplace", "observe", "input")


@dataclass(frozen=True)
class Hook:
    """A deterministic hook that the strategies register on a module of a hostile model.

    ``kind`` is one of

    - ``"output"``: a forward hook that returns ``output * scale + shift`` (replaces the output);
    - ``"output_inplace"``: a forward hook that multiplies the output by ``scale`` in place and
      returns None;
    - ``"observe"``: a forward hook that returns None and writes nothing (the function is
      unchanged, but the module has a hook);
    - ``"input"``: a forward pre-hook that replaces the first input by ``input * scale + shift``.

    Hooks are plain frozen dataclasses, so models carrying them can be deep-copied and pickled.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> relu = nn.ReLU()
    >>> _ = Hook("output", 2.0, 1.0).register(relu)
    >>> relu(torch.tensor([-1.0, 3.0]))
    tensor([1., 7.])
    >>> Hook("input", -1.0).describe()
    'pre-hook: input * -1.0'
    """

    kind: str
    scale: float = 1.0
    shift: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in HOOK_KINDS:
            raise ValueError(f"Hook kind must be one of {HOOK_KINDS}, got kind={self.kind!r}")

    def __call__(self, module: nn.Module, args: tuple[Any, ...], *output: Any) -> Any:
        if self.kind == "input":
            return (args[0] * self.scale + self.shift, *args[1:])
        (out,) = output
        if self.kind == "output":
            return out * self.scale + self.shift
        if self.kind == "output_inplace":
            out.mul_(self.scale)
        return None

    def register(self, module: nn.Module) -> Any:
        """Register on ``module`` (a pre-hook for ``"input"``); returns the removable handle."""
        if self.kind == "input":
            return module.register_forward_pre_hook(self)
        return module.register_forward_hook(self)

    def describe(self) -> str:
        """One line for :meth:`GeneratedModel.program`."""
        if self.kind == "input":
            return f"pre-hook: input * {self.scale}" + (f" + {self.shift}" if self.shift else "")
        if self.kind == "output":
            return f"hook: output * {self.scale}" + (f" + {self.shift}" if self.shift else "")
        if self.kind == "output_inplace":
            return f"hook: output.mul_({self.scale})"
        return "hook: observe"


#: In-place tensor methods the strategies call (method name, argument or None).
INPLACE_OPS: tuple[tuple[str, float | None], ...] = (
    ("mul_", 2.0),
    ("mul_", -0.5),
    ("add_", 1.0),
    ("relu_", None),
)


class InplaceOp(nn.Module):
    """``x.<method>_(value)``: writes its input in place and returns it (a hostile layer).

    Placed first in a :func:`conv_chains` / :func:`linear_chains` model it writes the caller's
    input tensor.

    Examples
    --------
    >>> import torch
    >>> x = torch.ones(2)
    >>> InplaceOp("mul_", 3.0)(x) is x, x
    (True, tensor([3., 3.]))
    """

    def __init__(self, method: str, value: float | None = None) -> None:
        super().__init__()
        takes_value = {"mul_": True, "add_": True, "relu_": False}
        if method not in takes_value:
            raise ValueError(f"method must be 'mul_', 'add_' or 'relu_', got method={method!r}")
        if takes_value[method] != (value is not None):
            need = "a number" if takes_value[method] else "None"
            raise ValueError(f"{method} needs value={need}, got value={value!r}")
        self.method = method
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.value is None:
            return getattr(x, self.method)()
        return getattr(x, self.method)(self.value)

    def extra_repr(self) -> str:
        return f"{self.method}({'' if self.value is None else self.value})"


def _hook_strategy(st: Any) -> Any:
    """A :class:`Hook` with its constants drawn from small fixed sets."""
    return st.builds(
        Hook,
        st.sampled_from(("output", "output", "output_inplace", "observe", "input")),
        st.sampled_from((0.5, -1.0, 2.0)),
        st.sampled_from((0.0, 0.25, -1.0)),
    )


def _register(model: nn.Module, hooks: dict[str, Sequence[Hook]]) -> None:
    for name, specs in hooks.items():
        module = model.get_submodule(name)
        for hook in specs:
            hook.register(module)


# --------------------------------------------------------------------------------------------
# Conv chains
# --------------------------------------------------------------------------------------------


def _conv_spec(
    channels: int,
    out: int,
    geometry: tuple[tuple[int, ...], ...],
    groups: int,
    bn: Any,
    act: int | None,
    bias: bool,
) -> dict[str, Any]:
    """One conv of a drawn chain; ``geometry`` is (kernel, stride, dilation, padding)."""
    kernel, stride, dilation, padding = geometry
    return {
        "in": channels,
        "out": out,
        "kernel": kernel,
        "stride": stride,
        "dilation": dilation,
        "padding": padding,
        "groups": groups,
        "bias": bias,
        "bn": bn,
        "act": act,
    }


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
    hooks: bool = False,
    inplace: bool = False,
    unbatched: bool = False,
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
        Largest channel count (an unbatched chain may exceed it, see ``unbatched``).
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
        Largest input size per axis (default 40, 160 and 12 for 2-D, 1-D and 3-D; 12, 24 and 8
        for an unbatched input); kernels, dilations and strides are drawn within it.
    hooks : bool
        Let a module of the chain carry a forward hook or pre-hook (:class:`Hook`), which may
        change what the module returns. Off by default.
    inplace : bool
        Let an :class:`InplaceOp` (``x.mul_(2.0)``, ``x.relu_()``, ...) sit before a conv; before
        the first one it writes the caller's input. Off by default.
    unbatched : bool
        Let the input have no batch axis: ``(C, *spatial)``, which torch's convolutions accept.
        A BatchNorm after a conv then sees ``(C, *spatial)`` as ``(N, C', ...)`` and normalises
        the first spatial axis: it is a ``BatchNorm{ndim-1}d`` (``BatchNorm1d`` for 1-D) over
        that axis's extent, and at times the conv's channel count is drawn equal to that extent,
        so that the BatchNorm looks like a per-channel one but is not. Off by default.

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
    unbatched_extent = max_extent if max_extent is not None else {1: 24, 2: 12, 3: 8}[ndim]

    def draw_channels(draw: Any, channels: int) -> tuple[int, int]:
        kind = draw(st.sampled_from(("dense", "grouped", "depthwise"))) if groups else "dense"
        if kind == "depthwise":
            return channels, channels * draw(st.integers(1, max(1, max_channels // channels)))
        if kind == "grouped":
            g = draw(st.sampled_from(_divisors(channels)))
            return g, g * draw(st.integers(1, max(1, max_channels // g)))
        return 1, draw(st.integers(1, max_channels))

    def draw_extras(draw: Any, specs: list[dict[str, Any]]) -> dict[str, tuple[Hook, ...]]:
        """In-place ops before convs and hooks on modules (only with the opt-in flags)."""
        for spec in specs:
            spec["inplace"] = None
            if inplace and draw(st.integers(0, 2)) == 0:
                spec["inplace"] = draw(st.sampled_from(INPLACE_OPS))
        drawn: dict[str, tuple[Hook, ...]] = {}
        if hooks:
            for i in range(_chain_length(specs)):
                if draw(st.integers(0, 2)) == 0:
                    drawn[str(i)] = (draw(_hook_strategy(st)),)
        return drawn

    @st.composite
    def draw_chain(draw: Any) -> tuple[nn.Sequential, torch.Tensor]:
        n = draw(st.integers(min_convs, max_convs))
        c_in = draw(st.integers(1, max_channels))
        if unbatched and draw(st.booleans()):
            specs, size = draw_unbatched(draw, n, c_in)
            chain_hooks = draw_extras(draw, specs)
            seed = draw(st.integers(0, 2**31 - 1))
            return _build_chain(ndim, specs, (c_in, *size), dtype, seed, chain_hooks)
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
            g, out = draw_channels(draw, channels)
            bn = None
            if batchnorm and draw(st.booleans()):
                bn = _BNSpec(draw(st.sampled_from(_EPS)), draw(st.booleans()))
            act = None
            if activations and i < n - 1 and draw(st.booleans()):
                act = draw(st.integers(0, len(ACTIVATION_MODULES) - 1))
            geometry = (tuple(kernel), tuple(stride), tuple(dil), tuple(pad))
            specs.append(_conv_spec(channels, out, geometry, g, bn, act, draw(st.booleans())))
            channels = out
        # input size: enough for the receptive field, plus a few positions to exercise strides
        size = []
        for ax in range(ndim):
            need = max(1, rf[ax] - 2 * first_pad[ax])
            # keep the padded intermediate maps non-empty with "all" padding as well
            size.append(min(max(need, 1) + draw(st.integers(0, 3)), max(extent, need)))
        batch = draw(st.integers(1, 2))
        chain_hooks = draw_extras(draw, specs)
        seed = draw(st.integers(0, 2**31 - 1))
        return _build_chain(ndim, specs, (batch, c_in, *size), dtype, seed, chain_hooks)

    def draw_unbatched(draw: Any, n: int, c_in: int) -> tuple[list[dict[str, Any]], list[int]]:
        """Layers for a ``(C, *spatial)`` input, tracking each map's exact extent."""
        size = [draw(st.integers(1, unbatched_extent)) for _ in range(ndim)]
        current = list(size)
        channels = c_in
        specs: list[dict[str, Any]] = []
        for i in range(n):
            kernel, stride, dil, pad = [], [], [], []
            for ax in range(ndim):
                d = draw(st.integers(1, max_dilation))
                k = draw(st.integers(1, max_kernel))
                may_pad = padding == "all" or (padding == "first" and i == 0)
                p = draw(st.integers(0, d * (k - 1))) if may_pad else 0
                while current[ax] + 2 * p - d * (k - 1) < 1:  # the kernel must fit the map
                    k -= 1
                    p = min(p, d * (k - 1))
                s = draw(st.integers(1, max_stride))
                current[ax] = (current[ax] + 2 * p - d * (k - 1) - 1) // s + 1
                kernel.append(k)
                stride.append(s)
                dil.append(d)
                pad.append(p)
            g, out = draw_channels(draw, channels)
            bn = None
            if batchnorm and draw(st.booleans()):
                # torch reads (C, L, ...) as (N, C', ...): the BN normalises the first spatial
                # axis; drawing C == L at times makes it look like a per-channel BN
                features = current[0]
                if features <= 2 * max_channels and draw(st.booleans()):
                    out = features
                    g = math.gcd(g, out)
                dims = max(1, ndim - 1)
                bn = _BNSpec(draw(st.sampled_from(_EPS)), draw(st.booleans()), features, dims)
            act = None
            if activations and i < n - 1 and draw(st.booleans()):
                act = draw(st.integers(0, len(ACTIVATION_MODULES) - 1))
            geometry = (tuple(kernel), tuple(stride), tuple(dil), tuple(pad))
            specs.append(_conv_spec(channels, out, geometry, g, bn, act, draw(st.booleans())))
            channels = out
        return specs, size

    return draw_chain()


def _chain_length(specs: list[dict[str, Any]]) -> int:
    """Number of modules :func:`_build_chain` makes from ``specs``."""
    return sum(
        1 + (s.get("inplace") is not None) + (s["bn"] is not None) + (s["act"] is not None)
        for s in specs
    )


def _build_chain(
    ndim: int,
    specs: list[dict[str, Any]],
    input_shape: tuple[int, ...],
    dtype: torch.dtype,
    seed: int,
    hooks: dict[str, tuple[Hook, ...]] | None = None,
) -> tuple[nn.Sequential, torch.Tensor]:
    with _seeded(seed):
        layers: list[nn.Module] = []
        for s in specs:
            if s.get("inplace") is not None:
                layers.append(InplaceOp(*s["inplace"]))
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
                spec = s["bn"]
                features = spec.features if spec.features is not None else s["out"]
                bn = _BN[spec.dims or ndim](features, eps=spec.eps, affine=spec.affine)
                _randomise_bn(bn)
                layers.append(bn)
            if s["act"] is not None:
                layers.append(_activation(s["act"]))
        model = nn.Sequential(*layers).to(dtype).eval()
        _register(model, hooks or {})
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
    hooks: bool = False,
    inplace: bool = False,
    unbatched: bool = False,
) -> Any:
    """Strategy for ``(nn.Sequential of nn.Linear, input)`` pairs.

    Feature sizes are drawn in 1..``max_features``; biases are on or off; an eval-mode
    ``BatchNorm1d`` with random statistics may follow a layer and an activation may sit between
    two layers. The input is ``(batch, d_in)``, or ``(batch, length, d_in)`` when ``sequence``
    allows it and the chain has no BatchNorm (``BatchNorm1d`` normalises axis 1).

    Parameters
    ----------
    min_layers, max_layers : int
        Number of ``nn.Linear`` layers.
    max_features : int
        Largest feature count.
    batchnorm : bool
        Allow a ``BatchNorm1d`` after each layer.
    activations : bool
        Allow an activation (from :data:`ACTIVATION_MODULES`) between layers.
    sequence : bool
        Allow a ``(batch, length, d_in)`` input (chains without BatchNorm).
    dtype : torch.dtype
        Of the parameters and the input.
    hooks : bool
        Let a module of the chain carry a forward hook or pre-hook (:class:`Hook`). Off by
        default.
    inplace : bool
        Let an :class:`InplaceOp` sit before a layer (before the first one it writes the
        caller's input). Off by default.
    unbatched : bool
        Let the input be a single ``(d_in,)`` vector (chains without BatchNorm, which needs a
        batch axis). Off by default.

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
        if unbatched and all(b is None for b in bns) and draw(st.booleans()):
            lead = ()
        writes = [
            draw(st.sampled_from(INPLACE_OPS)) if inplace and draw(st.integers(0, 2)) == 0 else None
            for _ in range(n)
        ]
        length = n + sum(b is not None for b in bns) + sum(a is not None for a in acts)
        length += sum(w is not None for w in writes)
        drawn_hooks = {
            str(i): (draw(_hook_strategy(st)),)
            for i in range(length)
            if hooks and draw(st.integers(0, 2)) == 0
        }
        seed = draw(st.integers(0, 2**31 - 1))
        with _seeded(seed):
            layers: list[nn.Module] = []
            for i in range(n):
                if writes[i] is not None:
                    layers.append(InplaceOp(*writes[i]))
                layers.append(nn.Linear(sizes[i], sizes[i + 1], bias=bias[i]))
                if bns[i] is not None:
                    bn = nn.BatchNorm1d(sizes[i + 1], eps=bns[i].eps, affine=bns[i].affine)
                    _randomise_bn(bn)
                    layers.append(bn)
                if acts[i] is not None:
                    layers.append(_activation(acts[i]))
            model = nn.Sequential(*layers).to(dtype).eval()
            _register(model, drawn_hooks)
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
    axes and unflatten them to ``arg``), ``"transpose"`` (swap the spatial axes and back),
    ``"mean_pool"`` (``x.mean((2, 3), keepdim=True)``) or ``"inplace"`` (``x.<method>(value)``
    with ``arg = (method, value)`` from :data:`INPLACE_OPS`: writes ``values[i]`` in place and
    appends the same tensor). ``"add"`` is spelled ``a + b`` unless ``arg`` is ``"torch.add"``
    or ``"method"`` (``a.add(b)``).
    """

    op: str
    inputs: tuple[int, ...]
    arg: Any = None


class GeneratedModel(nn.Module):
    """A model that runs a fixed list of :class:`Step` (traceable by ``torch.fx``).

    ``forward(x)`` starts with ``values = [x]``, appends the result of every step and returns
    the values listed in ``outputs`` (one tensor, or a tuple when several).

    Parameters
    ----------
    modules : dict of str to nn.Module
        Submodules, called by ``"module"`` steps.
    steps : sequence of Step
        The program.
    outputs : sequence of int
        Indices into ``values`` (negative ones count from the end).
    params : dict of str to nn.Parameter, optional
        Parameters of ``"conv_fn"`` steps.
    hooks : dict of str to sequence of Hook, optional
        Hooks registered on the named submodules (shown by :meth:`program`).
    unbatched : bool
        The input has no batch axis (``(C, H, W)``): concatenation, flattening and the spatial
        reductions use negative axes.

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
        hooks: dict[str, Sequence[Hook]] | None = None,
        unbatched: bool = False,
    ) -> None:
        super().__init__()
        for name, module in modules.items():
            self.add_module(name, module)
        for name, param in (params or {}).items():
            self.register_parameter(name, param)
        self.steps = tuple(steps)
        n = len(self.steps) + 1
        self.outputs = tuple(o % n for o in outputs)
        self.unbatched = unbatched
        self.hook_specs = {name: tuple(specs) for name, specs in (hooks or {}).items() if specs}
        _register(self, self.hook_specs)

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
        if op == "inplace":
            method, value = step.arg
            if value is None:
                return getattr(args[0], method)()
            return getattr(args[0], method)(value)
        if op == "reshape":
            if self.unbatched:
                return args[0].flatten(-2).unflatten(-1, step.arg)
            return args[0].flatten(2).unflatten(2, step.arg)
        if op == "transpose":
            return args[0].transpose(-1, -2).contiguous().transpose(-1, -2)
        if op == "mean_pool":
            if self.unbatched:
                return args[0].mean((-2, -1), keepdim=True)
            return args[0].mean((2, 3), keepdim=True)
        if op == "cat":
            return torch.cat(args, dim=-3 if self.unbatched else 1)
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
            return torch.flatten(args[0], -3 if self.unbatched else 1)
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
                "inplace": lambda s=s, a=a: (
                    f"{a[0]}.{s.arg[0]}({'' if s.arg[1] is None else s.arg[1]})"
                ),
            }.get(s.op, lambda s=s, a=a: f"{s.op}({a[0]})")()
            if s.op == "module" and s.arg in self.hook_specs:
                body += "  # " + "; ".join(h.describe() for h in self.hook_specs[s.arg])
            lines.append(f"v{i} = {body}")
        lines.append("return " + ", ".join(f"v{o}" for o in self.outputs))
        if self.unbatched:
            lines.insert(0, "# v0 has no batch axis: (C, H, W)")
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
    hooks: bool = False,
    inplace: bool = False,
    unbatched: bool = False,
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
    hooks : bool
        Let modules carry a forward hook or pre-hook (:class:`Hook`; one in three modules on
        average), and add ``nn.Identity`` / ``nn.Dropout`` blocks to hook. A hook may change
        what its module returns, so a rewrite that drops or moves it changes the function.
        Off by default.
    inplace : bool
        Add blocks that write a value in place (``x.mul_(2.0)``, ``x.relu_()``, ...): the last
        value (the chain goes on from the written tensor), the input of a layer between that
        layer and the next one (``a = conv1(v); v.mul_(2); b = conv2(a)``), or an earlier value
        or the model's input, which may be read again later (``b + v``). The model then writes
        the caller's input at times. Off by default.
    unbatched : bool
        Let the input have no batch axis, ``(C, H, W)`` (drawn per example). BatchNorms then
        see ``(C, H, W)`` as ``(N, C', L)``: they are ``BatchNorm1d`` over ``H``, and at times
        the conv before one has ``H`` output channels, so that it looks per-channel but is not.
        Off by default.

    Returns
    -------
    hypothesis.strategies.SearchStrategy
        Of ``(model, x)``; ``print(model)`` shows the program (with its hooks).

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
        hooks=hooks,
        inplace=inplace,
        unbatched=unbatched,
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
    "fork_residual",
    "multi_branch",
    "bn_only",
    "identity",
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
    hooks: bool = False,
    inplace: bool = False,
    unbatched: bool = False,
) -> Any:
    """Strategy for random model DAGs, richer than :func:`models`: the graph fuzzer.

    Everything :func:`models` draws, plus: non-square kernels and per-axis strides, dilation,
    groups and uncentred padding; bottleneck residuals (1x1, kxk, 1x1) with identity or
    projection shortcuts; squeeze-excite gates (global pool, two 1x1 convs, sigmoid, multiply);
    reshapes (flatten/unflatten, transpose round trips); a linear layer called twice (with a
    residual around it at times); residual adds spelled ``+``, ``torch.add`` and ``Tensor.add``;
    more activation kinds (:data:`EXTRA_ACTIVATION_MODULES`, ``PReLU`` among them); residual
    forks at a prunable unit
    (``h = act(bn(conv(x))); out = f(conv(h)) + h``, the branch a 1x1 or 3x3 conv, the shortcut
    ``h`` itself or a 1x1 projection of it, at times a padded conv after the sum); BatchNorms
    that follow no convolution (on an activation, a sum, a pooled map or the input); sums of
    three or four branches (RepVGG-like ``bn(conv3x3(x)) + bn(conv1x1(x)) + bn(x)``, with
    identity and BatchNorm-only branches); and ``nn.Identity`` / ``nn.Dropout`` modules. By
    default a model may return several values.

    Parameters
    ----------
    See :func:`models` (``hooks``, ``inplace`` and ``unbatched`` as there, off by default).

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
        hooks=hooks,
        inplace=inplace,
        unbatched=unbatched,
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
    hooks: bool = False,
    inplace: bool = False,
    unbatched: bool = False,
) -> Any:
    st = _hypothesis()
    if inplace:
        kinds = (*kinds, "inplace", "inplace")
    if hooks:
        kinds = (*kinds, "identity", "identity")  # hook targets canonicalization removes
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got max_steps={max_steps!r}")
    if not 1 <= min_size <= max_size:
        raise ValueError(f"need 1 <= min_size <= max_size, got {min_size}, {max_size}")
    dtype = _check_dtype(dtype)

    @st.composite
    def draw_model(draw: Any) -> tuple[GeneratedModel, torch.Tensor]:
        b = _Builder(
            draw, st, max_channels, rich=rich, hooks=hooks, inplace=inplace, unbatched=unbatched
        )
        c = draw(st.integers(1, max_channels))
        h = draw(st.integers(min_size, max_size))
        w = draw(st.integers(min_size, max_size))
        b.shapes.append((c, h, w))
        for _ in range(draw(st.integers(1, max_steps))):
            getattr(b, f"block_{draw(st.sampled_from(kinds))}")()
        extra: list[int] = []
        if multiple_outputs and len(b.shapes) > 2:
            extra = draw(st.lists(st.integers(1, len(b.shapes) - 2), max_size=2, unique=True))
        if head is True or (head is None and draw(st.booleans())):
            b.block_head()
        outputs = [*extra, b.last]
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
            model = GeneratedModel(
                modules, b.steps, outputs, params, hooks=b.hooks, unbatched=b.unbatched
            )
            model = model.to(dtype).eval()
            lead = () if b.unbatched else (b.batch,)
            x = torch.randn((*lead, c, h, w), dtype=dtype)
        return model, x

    return draw_model()


class _Builder:
    """Draws the blocks of a :class:`GeneratedModel`, tracking every value's (C, H, W)."""

    def __init__(
        self,
        draw: Any,
        st: Any,
        max_channels: int,
        *,
        rich: bool = False,
        hooks: bool = False,
        inplace: bool = False,
        unbatched: bool = False,
    ) -> None:
        self.draw = draw
        self.st = st
        self.max_channels = max_channels
        self.rich = rich  # graphs(): per-axis geometry, more activations and spellings
        self.shapes: list[tuple[int, ...]] = []
        self.steps: list[Step] = []
        self.makers: dict[str, Any] = {}
        self.params: dict[str, tuple[int, ...]] = {}
        self.hooks: dict[str, list[Hook]] = {}
        self.allow_hooks = hooks
        self.inplace = inplace
        self.batch = draw(st.integers(1, 2))
        self.unbatched = unbatched and draw(st.booleans())
        self._last = 0  # the value blocks extend (a side-effect write does not move it)

    # -- bookkeeping
    def _name(self, stem: str) -> str:
        i = 0
        while f"{stem}{i}" in self.makers or f"{stem}{i}" in self.params:
            i += 1
        return f"{stem}{i}"

    def _emit(self, step: Step, shape: tuple[int, ...], *, advance: bool = True) -> int:
        self.steps.append(step)
        self.shapes.append(shape)
        if advance:
            self._last = len(self.shapes) - 1
        return len(self.shapes) - 1

    def _maybe_hook(self, name: str) -> None:
        """With ``hooks``, one module in three gets a :class:`Hook`."""
        if self.allow_hooks and self.draw(self.st.integers(0, 2)) == 0:
            self.hooks[name] = [self.draw(_hook_strategy(self.st))]

    def _module(self, stem: str, make: Any, src: int, shape: tuple[int, ...]) -> int:
        name = self._name(stem)
        self.makers[name] = make
        self._maybe_hook(name)
        return self._emit(Step("module", (src,), name), shape)

    @property
    def last(self) -> int:
        return self._last

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
        if self.unbatched:
            # torch reads an unbatched (C, H, W) map as (N, C', L): the BN normalises H
            h = self.shapes[src][1]
            return self._module("bn", lambda: nn.BatchNorm1d(h, eps=eps), src, self.shapes[src])
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
        if self.unbatched and not kw and self.draw(self.st.integers(0, 2)) == 0:
            h = self.shapes[src][1]
            if h <= self.max_channels:
                # C_out == H: the BatchNorm1d(H) after it looks like a per-channel BN
                return self.bn(self.conv(src, out=h, stride=1, centred=True))
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
        self._maybe_hook(name)
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
        """One ``nn.Linear(f, f)`` called twice (on a pooled, flattened map if need be), at times
        with a residual add around it."""
        src = self.last
        if len(self.shapes[src]) == 3:
            c = self.shapes[src][0]
            src = self._emit(Step("global_pool", (src,)), (c, 1, 1))
            src = self._emit(Step("flatten", (src,)), (c,))
        (features,) = self.shapes[src]
        name = self._name("shared_fc")
        bias = self.draw(self.st.booleans())
        self.makers[name] = lambda: nn.Linear(features, features, bias=bias)
        self._maybe_hook(name)
        v = self._emit(Step("module", (src,), name), (features,))
        if self.draw(self.st.booleans()):
            v = self.act(v)
        v = self._emit(Step("module", (v,), name), (features,))
        if self.draw(self.st.booleans()):
            self.add(v, src)  # a residual over features (1-D values with an unbatched input)

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
            if self.inplace and self.draw(self.st.booleans()):
                self._write(src, advance=False)  # the first layer's input, between the layers
            out = self.draw(self.st.integers(1, 10))
            self._module("fc", lambda: nn.Linear(hidden, out), v, (out,))

    # -- hostile and structural blocks of graphs() (and the opt-in flags)
    def _write(self, src: int, *, advance: bool) -> int:
        """``values[src].<op>_(...)``: an in-place write; returns the (aliasing) new value."""
        op = self.draw(self.st.sampled_from(INPLACE_OPS))
        return self._emit(Step("inplace", (src,), op), self.shapes[src], advance=advance)

    def block_inplace(self) -> None:
        """An in-place write: of the last value, between two layers, or of an earlier value."""
        draw, st = self.draw, self.st
        kind = draw(st.sampled_from(("last", "between", "earlier")))
        src = self.last
        if kind == "last" or len(self.shapes[src]) != 3:
            self._write(src, advance=True)  # the chain goes on from the written tensor
            return
        if kind == "between":
            # a = unit(v); v.op_(); b = unit(a) [+ v]: v's layer run has a write in between
            a = self.unit(src, stride=1, centred=True, kernel=draw(st.sampled_from((1, 3))))
            self._write(src, advance=False)
            b = self.unit(a, stride=1, centred=True, kernel=draw(st.sampled_from((1, 3))))
            if self.shapes[b] == self.shapes[src] and draw(st.booleans()):
                self.add(b, src)  # the written value is read again
            return
        # an earlier value (the model's input, at times): written now, maybe read again later
        j = 0 if draw(st.booleans()) else draw(st.integers(0, src))
        self._write(j, advance=False)
        if j != src and self.shapes[j] == self.shapes[src] and draw(st.booleans()):
            self.add(src, j)

    def block_identity(self) -> None:
        """``nn.Identity`` or an eval-mode ``nn.Dropout`` (hook targets that canonicalization
        would otherwise remove)."""
        src = self.last
        kind = self.draw(self.st.sampled_from(("identity", "dropout", "dropout2d")))
        if kind == "dropout2d" and (self.unbatched or len(self.shapes[src]) != 3):
            kind = "dropout"
        make = {"identity": nn.Identity, "dropout": lambda: nn.Dropout(0.5)}.get(
            kind, lambda: nn.Dropout2d(0.25)
        )
        self._module("drop" if kind != "identity" else "id", make, src, self.shapes[src])

    def block_bn_only(self) -> None:
        """A BatchNorm that follows no convolution (after an activation, a sum, a pool or on
        the input itself)."""
        src = self._spatial_source()
        if src is None:
            return
        if self.draw(self.st.booleans()):
            src = self.act(src)
        self.bn(src)

    def block_fork_residual(self) -> None:
        """``h = act([bn](conv(x))); out = [f](conv(h)) + h``: a prunable unit (C_in == C_out,
        stride 1) whose activation forks into the next residual; the branch is a 1x1 or 3x3
        conv, the shortcut ``h`` or a 1x1 projection of it; at times a padded conv follows."""
        src = self._spatial_source()
        if src is None:
            return
        draw, st = self.draw, self.st
        c = self.shapes[src][0]
        h = self.conv(src, out=c, kernel=draw(st.sampled_from((1, 3))), stride=1, centred=True)
        if draw(st.integers(0, 3)) > 0:
            h = self.bn(h)
        h = self.act(h)
        variant = draw(st.sampled_from(("identity", "identity", "projection")))
        out = c if variant == "identity" else draw(st.integers(1, self.max_channels))
        v = self.unit(h, out=out, kernel=draw(st.sampled_from((1, 3))), stride=1, centred=True)
        if draw(st.booleans()):
            v = self.act(v)
        short = h
        if variant == "projection":
            short = self.unit(h, out=out, kernel=1, stride=1, centred=True, dense=True)
        v = self.add(*((v, short) if draw(st.booleans()) else (short, v)))
        if draw(st.booleans()):
            v = self.act(v)
        if draw(st.booleans()):
            self.unit(v, kernel=3, stride=1, centred=True)  # a padded conv after the sum

    def block_multi_branch(self) -> None:
        """A sum of three or four branches of one input (RepVGG / MobileOne training form):
        kxk conv (+BN), 1x1 conv (+BN), BatchNorm alone, identity."""
        src = self._spatial_source()
        if src is None:
            return
        draw, st = self.draw, self.st
        c = self.shapes[src][0]
        stride = draw(st.sampled_from((1, 1, 2)))
        same = stride == 1 and draw(st.integers(0, 3)) > 0
        out = c if same else draw(st.integers(1, self.max_channels))
        kinds = ("kxk", "1x1", "bn", "identity") if same else ("kxk", "1x1")
        n = draw(st.integers(3, 4))
        branches = [draw(st.sampled_from(kinds)) for _ in range(n)]
        values = []
        for kind in branches:
            if kind in ("kxk", "1x1"):
                k = draw(st.sampled_from((3, 3, 5))) if kind == "kxk" else 1
                v = self.conv(src, out=out, kernel=k, stride=stride, centred=True)
                if draw(st.integers(0, 3)) > 0:
                    v = self.bn(v)
                values.append(v)
            elif kind == "bn":
                values.append(self.bn(src))
            else:
                values.append(src)
        total = values[0]
        for v in values[1:]:
            total = self.add(total, v)
        if draw(st.booleans()):
            self.act(total)
