"""Progress bars that the caller can turn off (tqdm, only on a terminal by default).

fxcompress shows bars while it builds latency tables, scores merge options and fuses layers. Your
own long steps (a ``finetune`` callback, for instance) can use :func:`track` for the same behaviour.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

__all__ = ["bar", "track"]

T = TypeVar("T")


def _enabled(enabled: bool | None) -> bool:
    return sys.stderr.isatty() if enabled is None else bool(enabled)


@contextmanager
def bar(*, total: int, desc: str, enabled: bool | None) -> Iterator[Any]:
    """A tqdm bar when ``enabled`` (``None``: when stderr is a terminal), else a no-op."""
    if not _enabled(enabled) or total == 0:
        yield _Null()
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=f"fxcompress {desc}", leave=False) as t:
        yield t


def track(
    items: Iterable[T], *, desc: str, total: int | None = None, enabled: bool | None = None
) -> Iterator[T]:
    """Yield ``items`` while advancing a bar (see :func:`bar`); e.g. the batches of a fine-tune.

    Examples
    --------
    >>> sum(track(range(4), desc="finetune", enabled=False))
    6
    """
    if total is None:
        total = len(items) if hasattr(items, "__len__") else 0  # type: ignore[arg-type]
    if not _enabled(enabled):
        yield from items
        return
    from tqdm.auto import tqdm

    yield from tqdm(items, total=total or None, desc=f"fxcompress {desc}", leave=False)


class _Null:
    def update(self, n: int = 1) -> None:
        return None
