"""Latency of single ops, measured on a device or estimated analytically, with an on-disk cache.

An :class:`OpSpec` describes one op (a convolution, a linear layer, an activation or an addition,
optionally with an activation fused after it) at one fixed input shape. A :class:`LatencyTable`
maps op specs to latencies in float milliseconds: in ``"measure"`` mode it times the op on the
table's device, in ``"flops"`` mode it applies the analytic model of :func:`analytic_ms`. Values are
kept in memory and, when the table has a ``cache_dir``, in a JSON file there, so that a later table
with the same environment reuses them instead of measuring again.

Invariants
----------
* An :class:`OpSpec` is immutable, hashable and canonical: defaults are filled in and aliases
  resolved at construction, so two specs describe the same op exactly when they are equal, and
  exactly when their :meth:`OpSpec.key` strings are equal. Invalid specs (a shape that does not fit
  the kind, an output with a non-positive size, groups that do not divide the channels, an unknown
  activation or dtype, ...) raise :class:`~fxcompress.errors.InvalidArgument` at construction.
* :meth:`OpSpec.build` is deterministic and never touches the global RNG: the weights and the input
  come from a local :class:`torch.Generator` seeded from the spec's key.
* A table holds at most one value per op key and never replaces one it holds: an op is measured
  at most once per table, and which ops get measured depends only on the requests made and on the
  cache's contents, never on timing.
* A table only ever uses cache entries written under an identical environment (device, device
  name, threads, torch version, mode, cache format, and in ``"flops"`` mode the model's constants).
  A cache file that is unreadable, malformed or from another environment is ignored with a logged
  warning, and replaced on the next save; invalid single entries are dropped.
* Cache files are written atomically (a temporary file in the same directory, then
  :func:`os.replace`), so readers see either the old or the new file, never a partial one. Each
  write first re-reads the file and keeps the entries other writers added since; only writes
  racing within that short window can drop each other's new entries, which are then measured
  again later. Files are not fsynced: after a power cut a damaged file is just rebuilt.
* Measuring leaves global state as it found it: torch's intra-op thread count is restored, and so
  are the train/eval flags of a module given to :meth:`LatencyTable.measure_module`.
* Files are JSON only; nothing is ever pickled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import operator
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from fxcompress.errors import InvalidArgument
from fxcompress.latency.timing import QUANTILE, quantile
from fxcompress.progress import bar as progress_bar

__all__ = [
    "ACTIVATIONS",
    "BYTES_PER_MS",
    "CACHE_FORMAT",
    "KINDS",
    "MACS_PER_MS",
    "OVERHEAD_MS",
    "LatencyTable",
    "OpSpec",
    "analytic_ms",
]

logger = logging.getLogger("fxcompress.latency")

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

MACS_PER_MS: float = 2e7
"""Analytic model: multiply-accumulates per millisecond (20 GMAC/s, roughly a 2-core CPU)."""

BYTES_PER_MS: float = 5e6
"""Analytic model: bytes moved per millisecond (5 GB/s)."""

OVERHEAD_MS: float = 0.005
"""Analytic model: fixed cost of launching one op, in milliseconds."""

CACHE_FORMAT: int = 2  # 2: entries are a low quantile of the runs, not their median
"""Version of the cache file layout; part of the environment, so a new version starts afresh."""

_FLOAT_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64"})
_MIN_RUN_MS = 0.25  # each timed run loops over enough calls to last at least this long
_MAX_INNER = 10_000  # upper bound of calls per timed run
_MAX_WARMUP_S = 0.3  # warm-up stops early (after one call) once it has taken this long
_MAX_OP_S = 1.5  # timed runs stop early once they have taken this long ...
_MIN_REPEATS = 5  # ... and there are at least this many of them
_SAVE_EVERY = 8  # LatencyTable.many saves to the cache after this many new values


# --------------------------------------------------------------------------------------------
# argument checking


def _int(value: object, name: str) -> int:
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
    items = tuple(_int(v, f"{name}[{i}]") for i, v in enumerate(value))
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
        set_(self, "out_channels", _int(self.out_channels, "out_channels"))
        set_(self, "groups", _int(self.groups, "groups"))
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


def analytic_ms(op: OpSpec) -> float:
    """The ``"flops"`` model: ``macs / MACS_PER_MS + bytes / BYTES_PER_MS + OVERHEAD_MS``.

    A pure function of the spec, in milliseconds; see :data:`MACS_PER_MS`,
    :data:`BYTES_PER_MS` and :data:`OVERHEAD_MS`.

    Examples
    --------
    >>> op = OpSpec("conv", (1, 3, 8, 8), out_channels=8, kernel_size=3, padding=1)
    >>> round(analytic_ms(op), 7)  # 13824 MACs, 3712 bytes
    0.0064336
    """
    if not isinstance(op, OpSpec):
        raise InvalidArgument(f"expected an OpSpec, got {op!r} of type {type(op).__name__}")
    return op.macs() / MACS_PER_MS + op.bytes_moved() / BYTES_PER_MS + OVERHEAD_MS


# --------------------------------------------------------------------------------------------
# timing


def _time_forward(
    module: nn.Module,
    inputs: tuple[Any, ...],
    *,
    repeats: int,
    warmup: int,
    sync: Callable[[], None],
) -> float:
    """Low-quantile milliseconds of one ``module(*inputs)`` under :func:`torch.inference_mode`.

    After ``warmup`` calls, the fastest of three single calls sets how many calls each timed run
    loops over (enough to last :data:`_MIN_RUN_MS`); the result is the :data:`QUANTILE` quantile
    (not the median: load from other processes only ever slows a run down, so a low quantile
    stays consistent between entries timed on a quiet and on a busy machine) over ``repeats``
    runs of the run's time divided by its number of calls. Slow ops stop early: warm-up after
    :data:`_MAX_WARMUP_S`, timed runs after :data:`_MAX_OP_S` once there are
    :data:`_MIN_REPEATS` of them, so a table at batch 32 does not cost ``repeats`` full calls of
    every op.
    """
    clock = time.perf_counter
    with torch.inference_mode():
        began = clock()
        for _ in range(warmup):
            module(*inputs)
            sync()
            if clock() - began > _MAX_WARMUP_S:
                break  # a slow op is warm after one call; more would only cost time
        single = math.inf
        for _ in range(3):
            start = clock()
            module(*inputs)
            sync()
            single = min(single, clock() - start)
        inner = min(_MAX_INNER, max(1, math.ceil(_MIN_RUN_MS / 1e3 / max(single, 1e-9))))
        samples: list[float] = []
        began = clock()
        for _ in range(repeats):
            start = clock()
            for _ in range(inner):
                module(*inputs)
            sync()
            samples.append((clock() - start) / inner)
            if len(samples) >= _MIN_REPEATS and clock() - began > _MAX_OP_S:
                break  # slow ops (large batches): a few runs already pin a low quantile down
    return max(quantile(samples, QUANTILE) * 1e3, 1e-9)


# --------------------------------------------------------------------------------------------
# cache files


def _read_cache(
    path: Path, env: Mapping[str, Any] | None
) -> tuple[dict[str, Any] | None, dict[str, float], str | None]:
    """The environment and entries of the cache file at ``path`` and, if something is wrong, why.

    The environment is None when the file is missing or is not a cache file at all. With ``env``
    given, a file from another environment yields no entries. Never raises for bad content.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, {}, None
    except (OSError, UnicodeDecodeError) as exc:
        return None, {}, f"cannot be read ({exc})"
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        # JSONDecodeError, but also integers longer than Python's digit limit (ValueError) and
        # nesting deeper than the recursion limit (RecursionError): never crash on a bad file
        return None, {}, f"is not valid JSON ({type(exc).__name__}: {str(exc)[:100]})"
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
        return None, {}, f"is not a latency file of format {CACHE_FORMAT}"
    stored_env, stored = data.get("env"), data.get("entries")
    if not isinstance(stored_env, dict) or not isinstance(stored, dict):
        return None, {}, "lacks an 'env' or 'entries' object"
    if env is not None and stored_env != env:
        differ = sorted(k for k in set(env) | set(stored_env) if env.get(k) != stored_env.get(k))
        detail = ", ".join(f"{k}: {stored_env.get(k)!r} != {env.get(k)!r}" for k in differ)
        return stored_env, {}, f"was written in another environment ({detail})"
    entries: dict[str, float] = {}
    for key, value in stored.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value)
            if math.isfinite(value) and value > 0:
                entries[key] = value
    dropped = len(stored) - len(entries)
    return stored_env, entries, (f"has {dropped} invalid entries, dropped" if dropped else None)


def _atomic_write_json(path: Path, payload: Mapping[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(payload, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------------------------
# LatencyTable


class LatencyTable:
    """Latency of ops on a device, in float milliseconds, with an optional on-disk cache.

    Parameters
    ----------
    mode : {"measure", "flops"}
        ``"measure"`` times each op on ``device``; ``"flops"`` uses :func:`analytic_ms` and
        never times anything.
    device : str or torch.device
        ``"cpu"``, ``"cuda[:i]"`` or ``"mps"``. In ``"measure"`` mode it must be available.
    threads : int, optional
        Torch intra-op threads while measuring (restored afterwards); default: torch's current
        setting at construction.
    cache_dir : path-like, optional
        Directory of the persistent cache; the file is ``latency-<hash of env>.json`` there. It is
        read at construction and written after new values (created if missing). Ignored in
        ``"flops"`` mode, whose values cost less to compute than to cache.
    repeats : int
        Timed runs per op (at most: a slow op stops after about 1.5 s once it has 5 runs); a low
        quantile of them is kept. At least 1.
    warmup : int
        Untimed calls before timing (at most: a slow op stops warming up after about 0.3 s).
        At least 0.
    progress : bool, optional
        Show progress in :meth:`many`: a bar on a terminal, a logged line elsewhere (see
        :mod:`fxcompress.progress`); ``False`` turns it off.

    Raises
    ------
    InvalidArgument
        If an argument has a bad type or value, or the device is unavailable for measuring.

    Examples
    --------
    >>> table = LatencyTable(mode="flops")
    >>> op = OpSpec("linear", (1, 64), out_channels=64)
    >>> ms = table(op)
    >>> ms == analytic_ms(op) and table.entries[op.key()] == ms
    True
    >>> measured = LatencyTable(repeats=2, warmup=0)(op)
    >>> measured > 0
    True
    """

    def __init__(
        self,
        *,
        mode: str = "measure",
        device: str | torch.device = "cpu",
        threads: int | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        repeats: int = 30,
        warmup: int = 5,
        progress: bool | None = None,
    ) -> None:
        if not isinstance(mode, str) or mode not in ("measure", "flops"):
            raise InvalidArgument(
                f"mode must be 'measure' or 'flops', got {mode!r} of type {type(mode).__name__}"
            )
        self._mode = mode
        self._device = _check_device(device, need_available=mode == "measure")
        if threads is None:
            threads = torch.get_num_threads()
        self._threads = _int(threads, "threads")
        if self._threads < 1:
            raise InvalidArgument(f"threads must be >= 1, got {threads!r}")
        self._repeats = _int(repeats, "repeats")
        if self._repeats < 1:
            raise InvalidArgument(f"repeats must be >= 1, got {repeats!r}")
        self._warmup = _int(warmup, "warmup")
        if self._warmup < 0:
            raise InvalidArgument(f"warmup must be >= 0, got {warmup!r}")
        if progress is not None and not isinstance(progress, bool):
            raise InvalidArgument(
                f"progress must be a bool or None, got {progress!r} of type "
                f"{type(progress).__name__}"
            )
        self._progress = progress
        self._env = self._make_env()
        self._entries: dict[str, float] = {}
        self._cache_path: Path | None = None
        if cache_dir is not None:
            if not isinstance(cache_dir, (str, os.PathLike)):
                raise InvalidArgument(
                    f"cache_dir must be a path, got {cache_dir!r} of type "
                    f"{type(cache_dir).__name__}"
                )
            directory = Path(cache_dir)
            if directory.exists() and not directory.is_dir():
                raise InvalidArgument(f"cache_dir {str(directory)!r} exists and is not a directory")
            digest = hashlib.sha256(
                json.dumps(self._env, sort_keys=True, separators=(",", ":")).encode()
            ).hexdigest()[:16]
            if mode == "flops":
                logger.debug("mode 'flops' computes values afresh, ignoring cache_dir")
                return
            self._cache_path = directory / f"latency-{digest}.json"
            _, entries, problem = _read_cache(self._cache_path, self._env)
            if problem:
                logger.warning("latency cache %s %s", self._cache_path, problem)
            self._entries.update(entries)
            logger.debug("loaded %d latency entries from %s", len(entries), self._cache_path)

    def _make_env(self) -> dict[str, Any]:
        device = self._device
        device_name: str | None = None  # the analytic model is the same everywhere
        if self._mode == "measure" and device.type == "cuda":
            device_name = torch.cuda.get_device_name(device)
        elif self._mode == "measure" and device.type == "cpu":
            device_name = _cpu_name()
        env: dict[str, Any] = {
            "device": str(device),
            "device_name": device_name,
            "format": CACHE_FORMAT,
            "mode": self._mode,
            "threads": self._threads,
            "torch": torch.__version__,
        }
        if self._mode == "flops":
            env["flops_model"] = {
                "bytes_per_ms": BYTES_PER_MS,
                "macs_per_ms": MACS_PER_MS,
                "overhead_ms": OVERHEAD_MS,
            }
        return env

    # ---- properties

    @property
    def mode(self) -> str:
        """``"measure"`` or ``"flops"``."""
        return self._mode

    @property
    def device(self) -> torch.device:
        """The device ops are timed on."""
        return self._device

    @property
    def threads(self) -> int:
        """Torch intra-op threads used while measuring."""
        return self._threads

    @property
    def env(self) -> dict[str, Any]:
        """The environment the values belong to (a copy); cache files must match it exactly."""
        return json.loads(json.dumps(self._env))

    @property
    def cache_path(self) -> Path | None:
        """The cache file of this table, or None without a ``cache_dir`` or in ``"flops"`` mode."""
        return self._cache_path

    @property
    def entries(self) -> Mapping[str, float]:
        """Read-only live view of the values held, keyed by :meth:`OpSpec.key`."""
        return MappingProxyType(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, op: object) -> bool:
        return isinstance(op, OpSpec) and op.key() in self._entries

    def __repr__(self) -> str:
        return (
            f"LatencyTable(mode={self._mode!r}, device={str(self._device)!r}, "
            f"threads={self._threads}, entries={len(self._entries)}, "
            f"cache_path={str(self._cache_path) if self._cache_path else None!r})"
        )

    # ---- lookups

    def __call__(self, op: OpSpec) -> float:
        """Latency of ``op`` in ms: the held value, or a new one (then stored and cached).

        Raises
        ------
        InvalidArgument
            If ``op`` is not an :class:`OpSpec`.
        """
        key = _check_op(op).key()
        if key not in self._entries:
            self._entries[key] = self._compute(op)
            self._autosave()
        return self._entries[key]

    def many(self, ops: Iterable[OpSpec]) -> list[float]:
        """Latencies of ``ops``, in order, measuring each missing distinct op once.

        Missing ops are computed in order of first appearance, under a progress bar, and the
        cache is saved every few new values (and on the way out, also after an interruption), so
        an interrupted build resumes where it stopped.

        Examples
        --------
        >>> table = LatencyTable(mode="flops")
        >>> a, b = OpSpec("add", (1, 8)), OpSpec("act", (1, 8), activation="relu")
        >>> x, y, z = table.many([a, b, a])
        >>> x == z and len(table) == 2
        True
        """
        if isinstance(ops, OpSpec):
            raise InvalidArgument(f"many() needs an iterable of OpSpec, got the single op {ops!r}")
        specs = [_check_op(op) for op in ops]
        keys = [op.key() for op in specs]
        todo = {k: op for k, op in zip(keys, specs) if k not in self._entries}
        if todo:
            self._compute_many(todo)
        return [self._entries[k] for k in keys]

    def _compute_many(self, todo: Mapping[str, OpSpec]) -> None:
        unsaved = 0
        try:
            with progress_bar(total=len(todo), desc="latency", enabled=self._progress) as bar:
                for key, op in todo.items():
                    self._entries[key] = self._compute(op)
                    unsaved += 1
                    bar.update()
                    if unsaved >= _SAVE_EVERY:
                        self._autosave()
                        unsaved = 0
        finally:
            if unsaved:
                self._autosave()

    def _compute(self, op: OpSpec) -> float:
        if self._mode == "flops":
            return analytic_ms(op)
        module, x = op.build()
        module, x = module.to(self._device), x.to(self._device)
        ms = self._timed(module, (x,))
        logger.debug("measured %.6f ms for %s", ms, op.key())
        return ms

    def _timed(self, module: nn.Module, inputs: tuple[Any, ...]) -> float:
        previous = torch.get_num_threads()
        if previous != self._threads:
            torch.set_num_threads(self._threads)
        try:
            return float(
                _time_forward(
                    module, inputs, repeats=self._repeats, warmup=self._warmup, sync=self._sync
                )
            )
        finally:
            if torch.get_num_threads() != previous:
                torch.set_num_threads(previous)

    def _sync(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        elif self._device.type == "mps":
            torch.mps.synchronize()

    def measure_module(self, module: nn.Module, inputs: tuple[Any, ...] | torch.Tensor) -> float:
        """Low-quantile ms of ``module(*inputs)`` for whole networks; measured, never cached.

        This times the forward even in ``"flops"`` mode. The module and tensor inputs must
        already be on the table's device; the module runs in eval mode under
        :func:`torch.inference_mode`, and its train/eval flags are restored afterwards.

        Raises
        ------
        InvalidArgument
            If ``module`` is not a module, ``inputs`` not a tuple (a lone tensor is accepted),
            or a parameter or input tensor is on another device.

        Examples
        --------
        >>> table = LatencyTable(repeats=2, warmup=0)
        >>> table.measure_module(nn.Linear(4, 4), (torch.zeros(1, 4),)) > 0
        True
        """
        if not isinstance(module, nn.Module):
            raise InvalidArgument(
                f"module must be a torch.nn.Module, got {module!r} of type {type(module).__name__}"
            )
        if isinstance(inputs, torch.Tensor):
            inputs = (inputs,)
        if not isinstance(inputs, tuple):
            raise InvalidArgument(
                f"inputs must be a tuple of arguments, got {inputs!r} of type "
                f"{type(inputs).__name__}"
            )
        for name, tensor in _named_tensors(module, inputs):
            if not _same_device(tensor.device, self._device):
                raise InvalidArgument(
                    f"{name} is on {tensor.device}, but the table measures on {self._device}"
                )
        flags = {m: m.training for m in module.modules()}
        module.eval()
        try:
            return self._timed(module, inputs)
        finally:
            for m, training in flags.items():
                m.training = training

    # ---- persistence

    def save(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write the values to ``path`` (default: the cache file) as JSON, atomically.

        Entries already in the file under the same environment are merged in first (and taken
        into this table too), so tables sharing a cache directory do not lose each other's
        values. A file from another environment, or an unreadable one, is replaced.

        Returns
        -------
        pathlib.Path
            The file written.

        Raises
        ------
        InvalidArgument
            If ``path`` is None and the table has no ``cache_dir``.
        OSError
            If the file cannot be written.
        """
        if path is None:
            if self._cache_path is None:
                raise InvalidArgument(
                    "save() needs a path when the table has no cache file (no cache_dir, or mode "
                    f"'flops'), got path={path!r}"
                )
            target = self._cache_path
        elif isinstance(path, (str, os.PathLike)):
            target = Path(path)
        else:
            raise InvalidArgument(
                f"path must be a path or None, got {path!r} of type {type(path).__name__}"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        _, existing, problem = _read_cache(target, self._env)
        if problem:
            logger.info("latency file %s %s; it will be replaced", target, problem)
        for key, value in existing.items():
            self._entries.setdefault(key, value)
        payload = {
            "format": CACHE_FORMAT,
            "env": self._env,
            "entries": dict(sorted(self._entries.items())),
        }
        _atomic_write_json(target, payload)
        logger.debug("saved %d latency entries to %s", len(self._entries), target)
        return target

    def _autosave(self) -> None:
        if self._cache_path is None:
            return
        try:
            self.save()
        except OSError as exc:
            logger.warning("could not write latency cache %s: %s", self._cache_path, exc)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        repeats: int = 30,
        warmup: int = 5,
        progress: bool | None = None,
    ) -> LatencyTable:
        """A table with the mode, device, threads and entries of a file written by :meth:`save`.

        If the file's environment differs from the one the table gets here (another torch
        version or machine, say), a warning is logged and its entries are not used.

        Raises
        ------
        InvalidArgument
            If the file cannot be read or is not a latency file, or its device is unavailable.

        Examples
        --------
        >>> import tempfile
        >>> table = LatencyTable(mode="flops")
        >>> _ = table(OpSpec("add", (1, 8)))
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     loaded = LatencyTable.load(table.save(Path(tmp) / "table.json"))
        >>> dict(loaded.entries) == dict(table.entries)
        True
        """
        if not isinstance(path, (str, os.PathLike)):
            raise InvalidArgument(
                f"path must be a path, got {path!r} of type {type(path).__name__}"
            )
        path = Path(path)
        if not path.is_file():
            raise InvalidArgument(f"no latency file at {str(path)!r}")
        env, entries, problem = _read_cache(path, None)
        if env is None:
            raise InvalidArgument(f"{str(path)!r} {problem or 'is not a latency file'}")
        try:
            mode, device, threads = env["mode"], env["device"], env["threads"]
        except KeyError as exc:
            raise InvalidArgument(f"{str(path)!r} has no {exc} in its env") from None
        table = cls(
            mode=mode,
            device=device,
            threads=threads,
            cache_dir=cache_dir,
            repeats=repeats,
            warmup=warmup,
            progress=progress,
        )
        if env != table._env:
            _, _, mismatch = _read_cache(path, table._env)
            logger.warning("not using latency file %s: it %s", path, mismatch)
            return table
        if problem:
            logger.warning("latency file %s %s", path, problem)
        table._entries.update(entries)
        return table


def _check_op(op: object) -> OpSpec:
    if not isinstance(op, OpSpec):
        raise InvalidArgument(f"expected an OpSpec, got {op!r} of type {type(op).__name__}")
    return op


def _check_device(device: object, *, need_available: bool) -> torch.device:
    if not isinstance(device, (str, torch.device)):
        raise InvalidArgument(
            f"device must be a str or torch.device, got {device!r} of type {type(device).__name__}"
        )
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise InvalidArgument(f"device {device!r} is not a valid torch device: {exc}") from None
    if parsed.type not in ("cpu", "cuda", "mps"):
        raise InvalidArgument(f"device must be cpu, cuda or mps, got {device!r}")
    if parsed.type == "cpu":
        return torch.device("cpu")
    if not need_available:
        return parsed
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidArgument(f"device {device!r} requested but CUDA is not available")
        index = torch.cuda.current_device() if parsed.index is None else parsed.index
        if index >= torch.cuda.device_count():
            raise InvalidArgument(
                f"device {device!r}: only {torch.cuda.device_count()} CUDA devices are available"
            )
        return torch.device("cuda", index)
    if not torch.backends.mps.is_available():
        raise InvalidArgument(f"device {device!r} requested but MPS is not available")
    return torch.device("mps")


@functools.lru_cache(maxsize=1)
def _cpu_name() -> str | None:
    """The CPU model (from /proc/cpuinfo on Linux), else the platform's processor or machine."""
    with contextlib.suppress(OSError, UnicodeDecodeError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            name, _, value = line.partition(":")
            if name.strip() in ("model name", "Model", "Hardware") and value.strip():
                return value.strip()
    return platform.processor() or platform.machine() or None


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def _named_tensors(
    module: nn.Module, inputs: tuple[Any, ...]
) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in module.named_parameters():
        yield f"parameter {name!r}", tensor
    for name, tensor in module.named_buffers():
        yield f"buffer {name!r}", tensor
    for i, value in enumerate(inputs):
        if isinstance(value, torch.Tensor):
            yield f"inputs[{i}]", value
