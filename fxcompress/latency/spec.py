"""One op at one input shape: :class:`OpSpec`, the key of every latency entry.

An :class:`OpSpec` describes one op (a convolution, a linear layer, an activation or an addition,
optionally with an activation fused after it) at one fixed input shape, and knows its output
shape, multiply-accumulates, parameters and bytes moved (the inputs of the analytic model in
:mod:`fxcompress.latency.analytic`), and how to build a module computing it.

Invariants
----------
* An :class:`OpSpec` is immutable, hashable and canonical: defaults are filled in and aliases
  resolved at construction, so two specs describe the same op exactly when they are equal, and
  exactly when their :meth:`OpSpec.key` strings are equal. Invalid specs (a shape that does not fit
  the kind, an output with a non-positive size, groups that do not divide the channels, an unknown
  activation or dtype, ...) raise :class:`~fxcompress.errors.InvalidArgument` at construction.
* :meth:`OpSpec.build` is deterministic and never touches the global RNG: the weights and the input
  come from a local :class:`torch.Generator` seeded from the spec's key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fxcompress.errors import InvalidArgument

__all__ = ["ACTIVATIONS", "KINDS", "OpSpec", "as_int"]

KINDS: tuple[str, ...] = ("conv", "linear", "act", "add")
"""The op kinds an :class:`OpSpec` can describe."""

ACTIVATIONS: tuple[str, ...] = (
    "relu",
    "relu6",
    "hardswish",
    "hardsigmoid",
    "silu",
    "gelu",
    "sigmoid",
    "tanh",
    "leaky_relu",
    "elu",
    "mish",
    "prelu",
    "hardtanh",
)
"""Activation names an :class:`OpSpec` accepts. ``leaky_relu`` has slope 0.01, ``elu`` alpha 1,
``gelu`` is the exact (erf) form, ``prelu`` has a single learnable slope and ``hardtanh`` clamps to
[-1, 1]: constant arguments do not change an activation's cost."""

_FLOAT_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64"})


# --------------------------------------------------------------------------------------------
# argument checking


def as_int(value: object, name: str) -> int:
    """``value`` as an int (anything with ``__index__`` but a bool), else an InvalidArgument.

    Examples
    --------
    >>> as_int(3, "groups")
    3
    """
    if isinstance(value, bool):
        raise InvalidArgument(f"{name} must be an int, got {value!r} of type bool")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise InvalidArgument(
            f"{name} must be an int, got {value!r} of type {type(value).__name__}"
        ) from None


def _or_default(value: object, default: object) -> object:
    """``default`` for an empty tuple or list (an unset conv field), else ``value``."""
    return default if isinstance(value, (tuple, list)) and not value else value


def _int_tuple(value: object, name: str, length: int | None = None) -> tuple[int, ...]:
    """An int, or a sequence of ints, as a tuple; a lone int is repeated ``length`` times."""
    if length is not None and not isinstance(value, (Sequence, bool)):
        with contextlib.suppress(TypeError):
            return (operator.index(value),) * length  # type: ignore[call-overload]
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise InvalidArgument(
            f"{name} must be a tuple of ints, got {value!r} of type {type(value).__name__}"
        )
    items = tuple(as_int(v, f"{name}[{i}]") for i, v in enumerate(value))
    if length is not None and len(items) != length:
        raise InvalidArgument(f"{name} must have {length} entries, got {value!r}")
    return items


# --------------------------------------------------------------------------------------------
# OpSpec


@dataclass(frozen=True)
class OpSpec:
    """One op to time, at a fixed input shape. JSON-able, hashable and canonical.

    Parameters
    ----------
    kind : str
        ``"conv"`` (1-, 2- or 3-d convolution), ``"linear"``, ``"act"`` (the activation alone) or
        ``"add"`` (elementwise sum of two tensors of ``input_shape``).
    input_shape : tuple of int
        Full input shape including the batch: ``(N, C, *spatial)`` for a convolution,
        ``(*leading, in_features)`` for a linear layer, anything for ``"act"`` and ``"add"``.
    dtype : str
        Floating-point torch dtype name without ``"torch."``; aliases such as ``"float"`` and
        ``"half"`` are resolved to ``"float32"`` and ``"float16"``.
    out_channels : int
        Output channels of a convolution, output features of a linear layer; 0 otherwise.
    kernel_size, stride, padding, dilation : tuple of int
        Convolution geometry, one entry per spatial dimension; an int is repeated. ``stride``,
        ``padding`` and ``dilation`` default to 1, 0 and 1. A negative padding crops that many
        elements from both ends of the dimension before the convolution. Empty for other kinds.
    groups : int
        Convolution groups; must divide the input and the output channels. 1 for other kinds.
    bias : bool
        Whether a convolution or linear layer has a bias. Must stay True for other kinds.
    activation : str or None
        Activation applied after the op (one of :data:`ACTIVATIONS`); required for ``"act"``.

    Raises
    ------
    InvalidArgument
        If a field has a bad type or value, or the fields do not describe a valid op.

    Examples
    --------
    >>> op = OpSpec("conv", (1, 3, 8, 8), out_channels=8, kernel_size=3, padding=1)
    >>> op.stride, op.output_shape(), op.macs()
    ((1, 1), (1, 8, 8, 8), 13824)
    >>> OpSpec.from_dict(op.to_dict()) == op
    True
    """

    kind: str
    input_shape: tuple[int, ...]
    dtype: str = "float32"
    out_channels: int = 0
    kernel_size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    bias: bool = True
    activation: str | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if not isinstance(self.kind, str) or self.kind not in KINDS:
            raise InvalidArgument(f"kind must be one of {KINDS}, got {self.kind!r}")
        shape = _int_tuple(self.input_shape, "input_shape")
        if not shape or any(d < 1 for d in shape):
            raise InvalidArgument(
                f"input_shape must be a non-empty tuple of positive ints, got {self.input_shape!r}"
            )
        set_(self, "input_shape", shape)
        set_(self, "dtype", _canonical_dtype(self.dtype))
        if self.activation is not None and (
            not isinstance(self.activation, str) or self.activation not in ACTIVATIONS
        ):
            raise InvalidArgument(
                f"activation must be None or one of {ACTIVATIONS}, got {self.activation!r}"
            )
        if self.kind == "act" and self.activation is None:
            raise InvalidArgument("an OpSpec of kind 'act' needs an activation, got None")
        if not isinstance(self.bias, bool):
            raise InvalidArgument(
                f"bias must be a bool, got {self.bias!r} of type {type(self.bias).__name__}"
            )
        set_(self, "out_channels", as_int(self.out_channels, "out_channels"))
        set_(self, "groups", as_int(self.groups, "groups"))
        if self.kind == "conv":
            self._check_conv()
            return
        for name in ("kernel_size", "stride", "padding", "dilation"):
            value = _int_tuple(getattr(self, name), name)
            if value:
                raise InvalidArgument(f"{name} must be () for kind {self.kind!r}, got {value!r}")
            set_(self, name, ())
        if self.groups != 1:
            raise InvalidArgument(f"groups must be 1 for kind {self.kind!r}, got {self.groups!r}")
        if self.kind == "linear":
            if self.out_channels < 1:
                raise InvalidArgument(
                    f"out_channels of a linear op must be >= 1, got {self.out_channels!r}"
                )
            return
        if self.out_channels != 0:
            raise InvalidArgument(
                f"out_channels must be 0 for kind {self.kind!r}, got {self.out_channels!r}"
            )
        if not self.bias:
            raise InvalidArgument(f"bias must stay True for kind {self.kind!r}, got False")

    def _check_conv(self) -> None:
        set_ = object.__setattr__
        shape = self.input_shape
        if not 3 <= len(shape) <= 5:
            raise InvalidArgument(
                f"input_shape of a conv must be (N, C, *spatial) with 1-3 spatial dims, "
                f"got {shape!r}"
            )
        nd = len(shape) - 2
        if _or_default(self.kernel_size, None) is None:
            raise InvalidArgument("kernel_size of a conv is required, got ()")
        kernel = _int_tuple(self.kernel_size, "kernel_size", nd)
        stride = _int_tuple(_or_default(self.stride, 1), "stride", nd)
        padding = _int_tuple(_or_default(self.padding, 0), "padding", nd)
        dilation = _int_tuple(_or_default(self.dilation, 1), "dilation", nd)
        for name, values in (("kernel_size", kernel), ("stride", stride), ("dilation", dilation)):
            if any(v < 1 for v in values):
                raise InvalidArgument(f"{name} entries must be >= 1, got {values!r}")
        if self.out_channels < 1:
            raise InvalidArgument(f"out_channels of a conv must be >= 1, got {self.out_channels!r}")
        if self.groups < 1 or shape[1] % self.groups or self.out_channels % self.groups:
            raise InvalidArgument(
                f"groups={self.groups!r} must be >= 1 and divide in_channels={shape[1]} and "
                f"out_channels={self.out_channels}"
            )
        for name, value in (
            ("kernel_size", kernel),
            ("stride", stride),
            ("padding", padding),
            ("dilation", dilation),
        ):
            set_(self, name, value)
        out = self._conv_spatial()
        if any(o < 1 for o in out):
            raise InvalidArgument(
                f"conv output would have spatial size {out!r} for input {shape!r}, "
                f"kernel_size={kernel!r}, stride={stride!r}, padding={padding!r}, "
                f"dilation={dilation!r}"
            )

    def _conv_spatial(self) -> tuple[int, ...]:
        return tuple(
            (size + 2 * p - d * (k - 1) - 1) // s + 1
            for size, k, s, p, d in zip(
                self.input_shape[2:], self.kernel_size, self.stride, self.padding, self.dilation
            )
        )

    # ---- serialisation

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-able dict (tuples become lists).

        Examples
        --------
        >>> OpSpec("act", (2, 4), activation="relu").to_dict()["input_shape"]
        [2, 4]
        """
        return {
            f.name: list(v) if isinstance(v, tuple) else v
            for f in dataclasses.fields(self)
            for v in (getattr(self, f.name),)
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OpSpec:
        """Rebuild a spec from :meth:`to_dict` output (lists are accepted for tuples).

        Raises
        ------
        InvalidArgument
            If ``data`` is not a mapping, has unknown or missing fields, or describes a bad op.

        Examples
        --------
        >>> OpSpec.from_dict({"kind": "add", "input_shape": [1, 8]}).input_shape
        (1, 8)
        """
        if not isinstance(data, Mapping):
            raise InvalidArgument(
                f"OpSpec.from_dict needs a mapping, got {data!r} of type {type(data).__name__}"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names, key=str)
        if unknown:
            raise InvalidArgument(f"unknown OpSpec fields {unknown!r} in {dict(data)!r}")
        missing = [n for n in ("kind", "input_shape") if n not in data]
        if missing:
            raise InvalidArgument(f"missing OpSpec fields {missing!r} in {dict(data)!r}")
        return cls(**data)

    def key(self) -> str:
        """Canonical JSON string of the spec (sorted keys, no spaces): the op's cache key.

        Examples
        --------
        >>> OpSpec("act", (2, 4), activation="relu").key()[:45]
        '{"activation":"relu","bias":true,"dilation":['
        """
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    # ---- cost model

    def output_shape(self) -> tuple[int, ...]:
        """Shape of the op's output.

        Examples
        --------
        >>> OpSpec("linear", (4, 10, 32), out_channels=16).output_shape()
        (4, 10, 16)
        """
        if self.kind == "conv":
            return (self.input_shape[0], self.out_channels, *self._conv_spatial())
        if self.kind == "linear":
            return (*self.input_shape[:-1], self.out_channels)
        return self.input_shape

    def macs(self) -> int:
        """Multiply-accumulates of the op (biases and activations count zero).

        A convolution costs ``N * C_out * prod(out spatial) * C_in / groups * prod(kernel)``, a
        linear layer ``prod(leading dims) * in_features * out_features``; ``"act"`` and ``"add"``
        cost 0.

        Examples
        --------
        >>> OpSpec("linear", (4, 32), out_channels=16).macs()
        2048
        """
        if self.kind == "conv":
            per_output = self.input_shape[1] // self.groups * math.prod(self.kernel_size)
            return math.prod(self.output_shape()) * per_output
        if self.kind == "linear":
            return math.prod(self.input_shape) * self.out_channels
        return 0

    def num_params(self) -> int:
        """Number of weights of the op (including the bias and a ``prelu`` slope).

        Examples
        --------
        >>> OpSpec("conv", (1, 4, 8, 8), out_channels=8, kernel_size=3, groups=2).num_params()
        152
        """
        count = 0
        if self.kind == "conv":
            count = self.out_channels * (self.input_shape[1] // self.groups)
            count *= math.prod(self.kernel_size)
        elif self.kind == "linear":
            count = self.input_shape[-1] * self.out_channels
        if self.kind in ("conv", "linear") and self.bias:
            count += self.out_channels
        if self.activation == "prelu":
            count += 1
        return count

    def bytes_moved(self) -> int:
        """Bytes read and written: inputs (two of them for ``"add"``), output and weights.

        Examples
        --------
        >>> OpSpec("add", (1, 8)).bytes_moved()  # (8 + 8 + 8) float32 elements
        96
        """
        inputs = math.prod(self.input_shape) * (2 if self.kind == "add" else 1)
        elements = inputs + math.prod(self.output_shape()) + self.num_params()
        return elements * getattr(torch, self.dtype).itemsize

    # ---- module

    def build(self) -> tuple[nn.Module, torch.Tensor]:
        """A module computing the op, in eval mode, and an input tensor for it, on the CPU.

        Weights and input are drawn from a local :class:`torch.Generator` seeded from
        :meth:`key`, so the result is deterministic and the global RNG is left untouched.

        Examples
        --------
        >>> op = OpSpec("conv", (1, 3, 9, 9), out_channels=4, kernel_size=3, padding=(-1, 1))
        >>> module, x = op.build()
        >>> tuple(module(x).shape) == op.output_shape() == (1, 4, 5, 9)
        True
        """
        seed = int(hashlib.sha256(self.key().encode()).hexdigest()[:15], 16)
        gen = torch.Generator().manual_seed(seed)
        act = _make_activation(self.activation) if self.activation else nn.Identity()
        module: nn.Module
        if self.kind == "conv":
            module = _ConvOp(self, gen, act)
        elif self.kind == "linear":
            linear = nn.utils.skip_init(
                nn.Linear, self.input_shape[-1], self.out_channels, bias=self.bias
            )
            _init_params(linear, gen, fan_in=self.input_shape[-1])
            module = nn.Sequential(linear, act)
        elif self.kind == "act":
            module = act
        else:
            module = _AddOp(torch.randn(self.input_shape, generator=gen), act)
        x = torch.randn(self.input_shape, generator=gen)
        dtype = getattr(torch, self.dtype)
        return module.to(dtype).eval(), x.to(dtype)


def _canonical_dtype(name: object) -> str:
    if isinstance(name, torch.dtype):
        name = str(name)
    if not isinstance(name, str):
        raise InvalidArgument(
            f"dtype must be a torch dtype name, got {name!r} of type {type(name).__name__}"
        )
    value = getattr(torch, name.removeprefix("torch."), None)
    canonical = str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else None
    if canonical not in _FLOAT_DTYPES:
        raise InvalidArgument(
            f"dtype must name one of {sorted(_FLOAT_DTYPES)} (or an alias), got {name!r}"
        )
    return canonical


def _make_activation(name: str) -> nn.Module:
    factories: dict[str, Callable[[], nn.Module]] = {
        "relu": nn.ReLU,
        "relu6": nn.ReLU6,
        "hardswish": nn.Hardswish,
        "hardsigmoid": nn.Hardsigmoid,
        "silu": nn.SiLU,
        "gelu": nn.GELU,
        "sigmoid": nn.Sigmoid,
        "tanh": nn.Tanh,
        "leaky_relu": lambda: nn.LeakyReLU(0.01),
        "elu": lambda: nn.ELU(1.0),
        "mish": nn.Mish,
        "prelu": lambda: nn.PReLU(num_parameters=1, init=0.25),
        "hardtanh": nn.Hardtanh,
    }
    return factories[name]()


def _init_params(module: nn.Module, gen: torch.Generator, *, fan_in: int) -> None:
    """Fill the parameters of an uninitialised layer uniformly in +-1/sqrt(fan_in) from ``gen``."""
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.rand(param.shape, generator=gen) * (2 * bound) - bound)


class _ConvOp(nn.Module):
    """Optional crop (for negative padding), convolution, activation."""

    def __init__(self, op: OpSpec, gen: torch.Generator, act: nn.Module) -> None:
        super().__init__()
        conv_cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[len(op.kernel_size) - 1]
        self.conv = nn.utils.skip_init(
            conv_cls,
            op.input_shape[1],
            op.out_channels,
            op.kernel_size,
            stride=op.stride,
            padding=tuple(max(p, 0) for p in op.padding),
            dilation=op.dilation,
            groups=op.groups,
            bias=op.bias,
        )
        fan_in = op.input_shape[1] // op.groups * math.prod(op.kernel_size)
        _init_params(self.conv, gen, fan_in=fan_in)
        crops = [
            slice(-p, size + p) if p < 0 else slice(None)
            for size, p in zip(op.input_shape[2:], op.padding)
        ]
        self.crop: tuple[slice, ...] | None = (
            (slice(None), slice(None), *crops) if min(op.padding) < 0 else None
        )
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.crop is not None:
            x = x[self.crop]
        return self.act(self.conv(x))


class _AddOp(nn.Module):
    """``act(x + other)`` with ``other`` a fixed buffer of the input's shape."""

    def __init__(self, other: torch.Tensor, act: nn.Module) -> None:
        super().__init__()
        self.register_buffer("other", other)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.other)
