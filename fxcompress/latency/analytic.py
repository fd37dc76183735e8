"""The analytic latency model of ``"flops"`` mode: a pure function of an :class:`OpSpec`.

``ms = macs / MACS_PER_MS + bytes / BYTES_PER_MS + OVERHEAD_MS``: compute, memory traffic and a
fixed launch cost. Its constants are part of a ``"flops"`` table's environment
(:func:`flops_model`), so changing them never mixes values of two models.
"""

from __future__ import annotations

from typing import Any

from fxcompress.errors import InvalidArgument
from fxcompress.latency.spec import OpSpec

__all__ = ["BYTES_PER_MS", "MACS_PER_MS", "OVERHEAD_MS", "analytic_ms", "flops_model"]

MACS_PER_MS: float = 2e7
"""Analytic model: multiply-accumulates per millisecond (20 GMAC/s, roughly a 2-core CPU)."""

BYTES_PER_MS: float = 5e6
"""Analytic model: bytes moved per millisecond (5 GB/s)."""

OVERHEAD_MS: float = 0.005
"""Analytic model: fixed cost of launching one op, in milliseconds."""


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


def flops_model() -> dict[str, Any]:
    """The model's constants, as a ``"flops"`` table records them in its environment.

    Examples
    --------
    >>> sorted(flops_model())
    ['bytes_per_ms', 'macs_per_ms', 'overhead_ms']
    """
    return {
        "bytes_per_ms": BYTES_PER_MS,
        "macs_per_ms": MACS_PER_MS,
        "overhead_ms": OVERHEAD_MS,
    }
