"""Timing one module on one device: :class:`ForwardTimer` and the device checks it relies on.

A :class:`~fxcompress.latency.table.LatencyTable` in ``"measure"`` mode hands each op's module to
its *timer*, any callable with the signature of :meth:`ForwardTimer.__call__`; the default is a
:class:`ForwardTimer` with the limits below. Passing another timer (``LatencyTable(timer=...)``) is
how tests inject timings, and where other runtimes will plug in.

Invariants
----------
* A timer returns positive finite milliseconds per call of ``module(*inputs)``.
* :class:`ForwardTimer` runs the module under :func:`torch.inference_mode`, calls ``sync`` after
  each timed run, and bounds the time it spends on a slow op (see its fields).
"""

from __future__ import annotations

import contextlib
import functools
import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from fxcompress.errors import InvalidArgument
from fxcompress.latency.timing import QUANTILE, quantile

__all__ = ["ForwardTimer", "Timer", "check_device", "cpu_name", "sync_device"]


class Timer(Protocol):
    """What a table calls to time one module: milliseconds per ``module(*inputs)``."""

    def __call__(
        self,
        module: nn.Module,
        inputs: tuple[Any, ...],
        *,
        repeats: int,
        warmup: int,
        sync: Callable[[], None],
    ) -> float: ...


@dataclass(frozen=True)
class ForwardTimer:
    """Low-quantile milliseconds of one ``module(*inputs)`` under :func:`torch.inference_mode`.

    After ``warmup`` calls, the fastest of three single calls sets how many calls each timed run
    loops over (enough to last ``min_run_ms``); the result is the
    :data:`~fxcompress.latency.timing.QUANTILE` quantile (not the median: load from other
    processes only ever slows a run down, so a low quantile stays consistent between entries timed
    on a quiet and on a busy machine) over ``repeats`` runs of the run's time divided by its
    number of calls. Slow ops stop early: warm-up after ``max_warmup_s``, timed runs after
    ``max_op_s`` once there are ``min_repeats`` of them, so a table at batch 32 does not cost
    ``repeats`` full calls of every op.

    Attributes
    ----------
    min_run_ms : float
        Each timed run loops over enough calls to last at least this long.
    max_inner : int
        Upper bound of calls per timed run.
    max_warmup_s : float
        Warm-up stops early (after one call) once it has taken this long.
    max_op_s : float
        Timed runs stop early once they have taken this long ...
    min_repeats : int
        ... and there are at least this many of them.

    Examples
    --------
    >>> ms = ForwardTimer()(nn.ReLU(), (torch.zeros(4),), repeats=2, warmup=0, sync=lambda: None)
    >>> ms > 0
    True
    """

    min_run_ms: float = 0.25
    max_inner: int = 10_000
    max_warmup_s: float = 0.3
    max_op_s: float = 1.5
    min_repeats: int = 5

    def __call__(
        self,
        module: nn.Module,
        inputs: tuple[Any, ...],
        *,
        repeats: int,
        warmup: int,
        sync: Callable[[], None],
    ) -> float:
        """Time ``module(*inputs)``: ``warmup`` untimed calls, then up to ``repeats`` runs."""
        clock = time.perf_counter
        with torch.inference_mode():
            began = clock()
            for _ in range(warmup):
                module(*inputs)
                sync()
                if clock() - began > self.max_warmup_s:
                    break  # a slow op is warm after one call; more would only cost time
            single = math.inf
            for _ in range(3):
                start = clock()
                module(*inputs)
                sync()
                single = min(single, clock() - start)
            calls = math.ceil(self.min_run_ms / 1e3 / max(single, 1e-9))
            inner = min(self.max_inner, max(1, calls))
            samples: list[float] = []
            began = clock()
            for _ in range(repeats):
                start = clock()
                for _ in range(inner):
                    module(*inputs)
                sync()
                samples.append((clock() - start) / inner)
                if len(samples) >= self.min_repeats and clock() - began > self.max_op_s:
                    break  # slow ops (large batches): a few runs already pin a low quantile down
        return max(quantile(samples, QUANTILE) * 1e3, 1e-9)


def sync_device(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (CUDA, MPS); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def check_device(device: object, *, need_available: bool) -> torch.device:
    """``device`` as a :class:`torch.device` (cpu, cuda or mps), an index filled in for CUDA.

    Raises
    ------
    InvalidArgument
        If ``device`` is not a device, or (with ``need_available``) is not available here.

    Examples
    --------
    >>> check_device("cpu", need_available=True)
    device(type='cpu')
    """
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
def cpu_name() -> str | None:
    """The CPU model (from /proc/cpuinfo on Linux), else the platform's processor or machine."""
    with contextlib.suppress(OSError, UnicodeDecodeError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            name, _, value = line.partition(":")
            if name.strip() in ("model name", "Model", "Hardware") and value.strip():
                return value.strip()
    return platform.processor() or platform.machine() or None
