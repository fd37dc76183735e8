"""Progress that the caller can turn off: a bar on a terminal, a logged line per stage elsewhere.

fxcompress reports progress while it builds latency tables, scores merge options and fuses layers.
Where it goes follows ``progress``:

- ``None`` (the default): a tqdm bar when stderr is a terminal; otherwise (a log file, a pipe, a
  notebook's captured stream) one line per finished stage on the ``fxcompress.progress`` logger at
  INFO level, e.g. ``scoring: 40/40 done in 3.2 s``. Carriage-return updates never reach a
  file.
- ``True``: a tqdm bar wherever stderr goes.
- ``False``: nothing.

Your own long steps (a ``finetune`` callback, for instance) can use :func:`track` for the same
behaviour.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

__all__ = ["bar", "track"]

logger = logging.getLogger("fxcompress.progress")

T = TypeVar("T")


def _mode(enabled: bool | None) -> str:
    """``"bar"``, ``"log"`` (one line per stage) or ``"off"`` for a ``progress`` setting."""
    if enabled is None:
        stderr = sys.stderr
        return "bar" if stderr is not None and stderr.isatty() else "log"
    return "bar" if enabled else "off"


def _log_stage(desc: str, done: int, total: int | None, seconds: float) -> None:
    count = f"{done}/{total}" if total else f"{done}"
    logger.info("%s: %s done in %.1f s", desc, count, seconds)


@contextmanager
def bar(*, total: int, desc: str, enabled: bool | None) -> Iterator[Any]:
    """Progress over ``total`` steps of one stage; call ``.update()`` on what it yields.

    A tqdm bar with ``enabled=True`` or, with ``None``, when stderr is a terminal; with ``None``
    elsewhere, one INFO line on the ``fxcompress.progress`` logger when the stage ends; nothing
    with ``False`` (or when there is nothing to do).

    Examples
    --------
    >>> with bar(total=3, desc="scoring", enabled=False) as b:
    ...     for _ in range(3):
    ...         b.update()
    """
    mode = _mode(enabled)
    if mode == "off" or total == 0:
        yield _Null()
        return
    if mode == "log":
        counter = _Counter()
        t0 = time.perf_counter()
        yield counter
        _log_stage(desc, counter.n, total, time.perf_counter() - t0)
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=f"fxcompress {desc}", leave=False) as t:
        yield t


def track(
    items: Iterable[T], *, desc: str, total: int | None = None, enabled: bool | None = None
) -> Iterator[T]:
    """Yield ``items`` while reporting progress (see :func:`bar`); e.g. the batches of a fine-tune.

    Examples
    --------
    >>> sum(track(range(4), desc="finetune", enabled=False))
    6
    """
    if total is None:
        total = len(items) if hasattr(items, "__len__") else 0  # type: ignore[arg-type]
    mode = _mode(enabled)
    if mode == "off":
        yield from items
        return
    if mode == "log":
        t0, n = time.perf_counter(), 0
        for item in items:
            n += 1
            yield item
        _log_stage(desc, n, total or None, time.perf_counter() - t0)
        return
    from tqdm.auto import tqdm

    yield from tqdm(items, total=total or None, desc=f"fxcompress {desc}", leave=False)


class _Null:
    def update(self, n: int = 1) -> None:
        return None


class _Counter:
    """Counts the steps of a stage whose progress is logged rather than drawn."""

    def __init__(self) -> None:
        self.n = 0

    def update(self, n: int = 1) -> None:
        self.n += n
