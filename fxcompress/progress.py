"""Progress bars that the caller can turn off (tqdm, only on a terminal by default)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["bar"]


@contextmanager
def bar(*, total: int, desc: str, enabled: bool | None) -> Iterator[Any]:
    """A tqdm bar when ``enabled`` (``None``: when stderr is a terminal), else a no-op."""
    show = sys.stderr.isatty() if enabled is None else bool(enabled)
    if not show or total == 0:
        yield _Null()
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=f"fxcompress {desc}", leave=False) as t:
        yield t


class _Null:
    def update(self, n: int = 1) -> None:
        return None
