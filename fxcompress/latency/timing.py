"""Paired timing of two whole networks, robust to a busy machine.

A latency *ratio* is what every budget is about, so the two networks are timed in alternation:
short timed runs of ``a`` and ``b`` interleave, and each side's time is a low quantile of its
runs. Load from other processes only ever makes a run slower, so a low quantile estimates the
uncontended time, and interleaving keeps slow drifts (thermal, frequency scaling) out of the
ratio.

The networks run on private copies of the inputs. A network that writes its inputs in place (seen
by their version counters after the warm-up) would make every later run see drifting values, so
then every timed call of both networks gets a fresh copy (the copy is timed too, equally on both
sides).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fxcompress.errors import InvalidArgument
from fxcompress.graph.util import clone_tensors

__all__ = ["QUANTILE", "PairedTiming", "paired_timing", "quantile"]

#: Each timed run loops over enough calls to last at least this long (milliseconds).
MIN_RUN_MS = 2.0
#: The quantile of the runs taken as each network's time.
QUANTILE = 0.2


@dataclass(frozen=True)
class PairedTiming:
    """Milliseconds per call of two networks timed in alternation.

    Attributes
    ----------
    a_ms, b_ms : float
        The :data:`QUANTILE` quantile of each network's timed runs.
    spread : float
        Relative spread of the per-pair ratios (interquartile range / median): a noise gauge.
    pairs : int
        Number of alternating timed runs of each network.
    """

    a_ms: float
    b_ms: float
    spread: float
    pairs: int

    @property
    def ratio(self) -> float:
        """``b_ms / a_ms``."""
        return self.b_ms / self.a_ms


def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (linear interpolation).

    >>> quantile([4.0, 1.0, 3.0, 2.0], 0.5)
    2.5
    """
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def paired_timing(
    a: nn.Module,
    b: nn.Module,
    inputs: tuple[Any, ...],
    *,
    pairs: int = 15,
    warmup: int = 3,
    threads: int | None = None,
    sync: Callable[[], None] = lambda: None,
) -> PairedTiming:
    """Time ``a(*inputs)`` and ``b(*inputs)`` alternately.

    Both run in eval mode under :func:`torch.inference_mode`; their train/eval flags and the
    process's thread count are restored afterwards. ``inputs`` are never written (see the module
    docstring).

    Parameters
    ----------
    a, b : torch.nn.Module
    inputs : tuple
        Arguments of both forwards, already on the modules' device.
    pairs : int
        Timed runs of each network (at least 3).
    warmup : int
        Untimed calls of each network first.
    threads : int, optional
        ``torch.set_num_threads`` for the measurement.
    sync : callable
        Waits for the device (``torch.cuda.synchronize`` on GPUs).

    Examples
    --------
    >>> t = paired_timing(nn.Linear(64, 64), nn.Identity(), (torch.zeros(1, 64),), pairs=3)
    >>> t.a_ms > 0 and t.b_ms > 0
    True
    """
    if not isinstance(pairs, int) or pairs < 3:
        raise InvalidArgument(f"pairs must be an int >= 3, got {pairs!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise InvalidArgument(f"warmup must be an int >= 0, got {warmup!r}")
    flags = {m: m.training for net in (a, b) for m in net.modules()}
    previous = torch.get_num_threads()
    clock = time.perf_counter
    try:
        a.eval()
        b.eval()
        if threads is not None and threads != previous:
            torch.set_num_threads(threads)
        source = clone_tensors(tuple(inputs))
        own = clone_tensors(source)
        versions = _versions(own)
        fresh = False  # whether each call needs a fresh copy of the inputs

        def call(net: nn.Module) -> None:
            nonlocal fresh
            net(*(clone_tensors(source) if fresh else own))
            fresh = fresh or _versions(own) != versions

        with torch.inference_mode():
            inner = []
            for net in (a, b):
                for _ in range(warmup):
                    call(net)
                sync()
                start = clock()
                call(net)
                sync()
                single = clock() - start
                inner.append(max(1, min(1000, math.ceil(MIN_RUN_MS / 1e3 / max(single, 1e-9)))))
            ta: list[float] = []
            tb: list[float] = []
            for _ in range(pairs):
                for net, n, out in ((a, inner[0], ta), (b, inner[1], tb)):
                    start = clock()
                    for _ in range(n):
                        net(*(clone_tensors(source) if fresh else own))
                    sync()
                    out.append((clock() - start) / n * 1e3)
    finally:
        for m, training in flags.items():
            m.train(training)
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)
    ratios = [y / x for x, y in zip(ta, tb)]
    mid = quantile(ratios, 0.5)
    spread = (quantile(ratios, 0.75) - quantile(ratios, 0.25)) / mid if mid > 0 else math.inf
    return PairedTiming(
        max(quantile(ta, QUANTILE), 1e-9), max(quantile(tb, QUANTILE), 1e-9), spread, pairs
    )


def _versions(value: Any) -> list[int]:
    """The version counters of the tensors in ``value`` (they grow with every in-place write)."""
    if isinstance(value, torch.Tensor):
        return [value._version]
    if isinstance(value, (tuple, list)):
        return [v for item in value for v in _versions(item)]
    if isinstance(value, dict):
        return [v for key in value for v in _versions(value[key])]
    return []
