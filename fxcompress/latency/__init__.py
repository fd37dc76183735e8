"""Latency: op specs, the analytic model, measurement, the on-disk cache and the table."""

from __future__ import annotations

from fxcompress.latency.table import LatencyTable, OpSpec

__all__ = ["LatencyTable", "OpSpec"]
