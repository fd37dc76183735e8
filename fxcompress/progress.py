"""Progress that the caller can turn off: a bar on a terminal, a logged line per stage elsewhere.

fxcompress reports progress while it builds latency tables, scores merge options and fuses layers.
Where it goes follows ``progress``:

- ``None`` (the default): a tqdm bar when stderr is a terminal; otherwise (a log file, a pipe, a
  notebook's captured stream) one line per finished stage on the ``fxcompress.progress`` logger at
  INFO level, e.g. ``scoring: 40/40 done in 3.2 s``, and while a stage runs, a line every
  :data:`LOG_EVERY_S` seconds with the steps done and left and an estimate of the time left
  (``scoring: 12/40 done in 31.0 s, 28 left, about 72 s to go``). Carriage-return updates never
  reach a file.
- ``True``: a tqdm bar wherever stderr goes.
- ``False``: nothing.

Your own long steps (a ``finetune`` callback, for instance) can use :func:`track` for the same
behaviour.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

__all__ = ["LOG_EVERY_S", "bar", "track"]

logger = logging.getLogger("fxcompress.progress")

#: seconds between two "still running" lines of a logged stage
LOG_EVERY_S = 30.0

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
        counter = _Counter(desc, total)
        yield counter
        _log_stage(desc, counter.n, total, counter.elapsed())
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
        counter = _Counter(desc, total or None)
        for item in items:
            yield item
            counter.update()
        _log_stage(desc, counter.n, total or None, counter.elapsed())
        return
    from tqdm.auto import tqdm

    yield from tqdm(items, total=total or None, desc=f"fxcompress {desc}", leave=False)


class _Null:
    def update(self, n: int = 1) -> None:
        return None


class _Counter:
    """Counts the steps of a stage whose progress is logged rather than drawn, and logs a line with
    the steps left and the time they should take every ``every`` seconds of the stage."""

    def __init__(
        self,
        desc: str,
        total: int | None,
        *,
        every: float | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.desc, self.total, self.n = desc, total, 0
        self.every = LOG_EVERY_S if every is None else every
        self.clock = clock
        self.start = self.last = clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last < self.every:
            return
        self.last = now
        seconds = now - self.start
        if not self.total or self.n >= self.total:
            logger.info("%s: %d done in %.1f s, still running", self.desc, self.n, seconds)
            return
        left = self.total - self.n
        logger.info(
            "%s: %d/%d done in %.1f s, %d left, about %.0f s to go",
            self.desc,
            self.n,
            self.total,
            seconds,
            left,
            seconds / self.n * left,
        )
