"""Latency: op specs, the analytic model, measurement, the on-disk cache and the table.

Modules: :mod:`.spec` (:class:`OpSpec`, one op at one input shape), :mod:`.analytic` (the
``"flops"`` model), :mod:`.measure` (timing one module: :class:`ForwardTimer`, the default timer
a table can be given another of), :mod:`.cache` (the JSON disk cache, safe under concurrent runs),
:mod:`.table` (:class:`LatencyTable`), :mod:`.timing` (paired timing of two whole networks).
"""

from __future__ import annotations

from fxcompress.latency.analytic import analytic_ms
from fxcompress.latency.measure import ForwardTimer, Timer
from fxcompress.latency.spec import OpSpec
from fxcompress.latency.table import LatencyTable

__all__ = ["ForwardTimer", "LatencyTable", "OpSpec", "Timer", "analytic_ms"]
