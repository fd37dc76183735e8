"""Pieces every strategy draws with: activation choices, BatchNorm specs, seeding, dtype checks.

:func:`hypothesis_strategies` imports hypothesis only when a strategy is built, so
:func:`fxcompress.testing.assert_equivalent` works without it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "ACTIVATION_MODULES",
    "BATCHNORM_MODULES",
    "BN_EPS",
    "CONV_MODULES",
    "EXTRA_ACTIVATION_MODULES",
    "BNSpec",
    "activation_module",
    "check_dtype",
    "divisors",
    "hypothesis_strategies",
    "randomise_bn",
    "seeded",
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


def hypothesis_strategies() -> Any:
    """``hypothesis.strategies``, or an ImportError that says how to install hypothesis."""
    try:
        from hypothesis import strategies as st
    except ImportError as exc:  # pragma: no cover - exercised only without hypothesis
        raise ImportError(
            "fxcompress.testing strategies need hypothesis: pip install hypothesis"
        ) from exc
    return st


CONV_MODULES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BATCHNORM_MODULES = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
BN_EPS = (1e-5, 1e-3, 0.1)


@dataclass(frozen=True)
class BNSpec:
    """A BatchNorm to draw after a layer: its ``eps``, whether it is affine, its size and rank."""

    eps: float
    affine: bool
    features: int | None = None  # default: the conv's output channels
    dims: int | None = None  # BatchNorm{dims}d; default: the conv's


def randomise_bn(bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Non-trivial running statistics and affine parameters (uses the current torch RNG)."""
    with torch.no_grad():
        c = bn.num_features
        bn.running_mean.copy_(torch.randn(c) * 0.5)
        bn.running_var.copy_(torch.rand(c) * 1.9 + 0.1)
        if bn.affine:
            bn.weight.copy_(torch.randn(c) * 0.5 + 1.0)
            bn.bias.copy_(torch.randn(c) * 0.5)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with the torch RNG seeded by ``seed``; the caller's RNG state is restored."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def activation_module(index: int) -> nn.Module:
    """A new module of :data:`ACTIVATION_MODULES` ``[index]``."""
    return ACTIVATION_MODULES[index]()


def divisors(n: int) -> list[int]:
    """The divisors of ``n`` in increasing order (group counts for ``n`` channels)."""
    return [d for d in range(1, n + 1) if n % d == 0]


def check_dtype(dtype: Any) -> torch.dtype:
    """``dtype`` if it is a floating torch dtype, else a ValueError."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got dtype={dtype!r}")
    return dtype
