"""How the pipeline measures: whole networks timed in pairs, and its own stage seconds.

A *measurement* is any callable ``measure(original, result, inputs) -> (original_ms, result_ms)``
(:data:`Measure`). The default, :class:`PairedLatency`, times the two networks alternately on the
latency table's device (see :mod:`fxcompress.latency.timing`), so that their ratio survives a busy
machine. ``optimize(..., measure=...)`` and ``ClosedLoop(measure=...)`` take another one: a
timing in another runtime, or a stand-in in tests.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from fxcompress.latency.table import LatencyTable
from fxcompress.latency.timing import paired_timing

__all__ = ["Measure", "PairedLatency", "Stopwatch"]

logger = logging.getLogger("fxcompress")

#: ``measure(original, result, inputs) -> (original_ms, result_ms)``
Measure = Callable[[nn.Module, nn.Module, tuple[Any, ...]], tuple[float, float]]


class PairedLatency:
    """The default measurement: ``original`` and ``result`` timed alternately on ``table``'s
    device with its thread count.

    Parameters
    ----------
    table : LatencyTable
        Gives the device and the thread count.
    pairs : int
        Number of alternating timings.
    """

    def __init__(self, table: LatencyTable, pairs: int = 15) -> None:
        self.table = table
        self.pairs = pairs

    def __call__(
        self, original: nn.Module, result: nn.Module, inputs: tuple[Any, ...]
    ) -> tuple[float, float]:
        device = self.table.device
        sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        t = paired_timing(
            original, result, inputs, pairs=self.pairs, threads=self.table.threads, sync=sync
        )
        if t.spread > 0.1:
            logger.info("noisy latency measurement: per-pair ratios spread %.0f %%", 100 * t.spread)
        return t.a_ms, t.b_ms


class Stopwatch:
    """Seconds spent in each stage, in the order the stages first ran (a report's
    ``stage_seconds``).

    Examples
    --------
    >>> watch = Stopwatch()
    >>> with watch("plan"):
    ...     pass
    >>> list(watch.seconds)
    ['plan']
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - t0)

    def add(self, stage: str, seconds: float) -> None:
        """Add ``seconds`` to ``stage``."""
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
