"""The default on-disk cache: where latency tables and importance scores are kept between runs.

``cache_dir=None`` (the default of :func:`~fxcompress.optimize`, :func:`~fxcompress.make_plan`
and :func:`~fxcompress.pipeline.prepare_problem`) means :func:`default_cache_dir`; ``False``
turns the cache off (everything is computed in memory); a path is used as it is.

Invariants
----------
* The directory is chosen by platform convention: ``$XDG_CACHE_HOME/fxcompress`` (else
  ``~/.cache/fxcompress``) on Linux and other Unixes, ``~/Library/Caches/fxcompress`` on macOS,
  ``%LOCALAPPDATA%\\fxcompress\\Cache`` on Windows; the environment variable
  ``FXCOMPRESS_CACHE_DIR`` overrides it.
* A directory that cannot be created or written is never an error: a warning is logged and the
  run works in memory (:func:`resolve_cache_dir` returns None).
* Entries are keyed so that another machine, runtime or library version never uses them:
  latency files by a hash of their environment (device, device name, threads, torch version,
  cache format; see :mod:`fxcompress.latency.cache`), importance files by a fingerprint of the
  graph, weights, calibration batches and loss (:func:`fxcompress.depth.importance.fingerprint`).
* Only fxcompress's own files (:data:`PATTERNS`) are ever counted, trimmed or cleared, so a
  ``cache_dir`` shared with other files loses none of them. After a write, the oldest of them
  (by modification time) are deleted until they fit in ``FXCOMPRESS_CACHE_MAX_MB`` megabytes
  (default :data:`DEFAULT_MAX_MB`).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fxcompress.errors import InvalidArgument

__all__ = [
    "CACHE_DIR_ENV",
    "DEFAULT_MAX_MB",
    "MAX_MB_ENV",
    "PATTERNS",
    "CacheInfo",
    "as_cache_dir",
    "cache_files",
    "cache_info",
    "clear_cache",
    "default_cache_dir",
    "max_cache_bytes",
    "resolve_cache_dir",
    "trim_cache",
]

logger = logging.getLogger("fxcompress")

CACHE_DIR_ENV = "FXCOMPRESS_CACHE_DIR"
"""Environment variable overriding :func:`default_cache_dir`."""

MAX_MB_ENV = "FXCOMPRESS_CACHE_MAX_MB"
"""Environment variable: the size limit of the cache in megabytes."""

DEFAULT_MAX_MB = 512.0
"""The size limit of the cache without ``FXCOMPRESS_CACHE_MAX_MB``, in megabytes."""

PATTERNS = ("latency-*.json", "importance-*.json")
"""The files fxcompress writes to a cache directory (the only ones it counts, trims or clears)."""


def default_cache_dir() -> Path:
    """The default cache directory: ``FXCOMPRESS_CACHE_DIR``, else the platform's user cache.

    The directory is not created here.

    Examples
    --------
    >>> isinstance(default_cache_dir(), Path)
    True
    """
    override = os.environ.get(CACHE_DIR_ENV)
    if override:
        return Path(override).expanduser()
    if sys.platform == "win32":
        local = os.environ.get("LOCALAPPDATA")
        base = Path(local) if local else Path.home() / "AppData" / "Local"
        return base / "fxcompress" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "fxcompress"
    xdg = os.environ.get("XDG_CACHE_HOME")
    # the XDG spec: a relative path is invalid and must be ignored
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "fxcompress"


def as_cache_dir(cache_dir: Any) -> Path | None:
    """The directory ``cache_dir`` names (None: :func:`default_cache_dir`), or None for False.

    Checks the argument only; the directory is neither created nor checked.

    Raises
    ------
    InvalidArgument
        If ``cache_dir`` is neither a path, None nor False.
    """
    if cache_dir is False:
        return None
    if cache_dir is None:
        return default_cache_dir()
    if isinstance(cache_dir, (str, os.PathLike)) and not isinstance(cache_dir, bool):
        return Path(cache_dir).expanduser()
    raise InvalidArgument(
        f"cache_dir must be a path, None (the default cache) or False (no cache), got "
        f"{cache_dir!r} of type {type(cache_dir).__name__}"
    )


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | bool | None) -> Path | None:
    """The directory to cache in, created and checked writable; None for no cache.

    Parameters
    ----------
    cache_dir : path, None or False
        None: :func:`default_cache_dir`; False: no cache; a path: that directory.

    Returns
    -------
    pathlib.Path or None
        None if ``cache_dir`` is False, or if the directory cannot be created or written (then
        a warning is logged on the ``fxcompress`` logger and the caller works in memory).

    Raises
    ------
    InvalidArgument
        If ``cache_dir`` is neither a path, None nor False.

    Examples
    --------
    >>> resolve_cache_dir(False) is None
    True
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     resolve_cache_dir(Path(tmp) / "fx") == Path(tmp) / "fx"
    True
    """
    directory = as_cache_dir(cache_dir)
    if directory is None:
        return None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        logger.warning(
            "cache directory %s cannot be used (%s); working without a cache (set %s or pass "
            "cache_dir to choose another, cache_dir=False to silence this)",
            directory,
            exc,
            CACHE_DIR_ENV,
        )
        return None
    return directory


def max_cache_bytes() -> int:
    """The cache's size limit in bytes: ``FXCOMPRESS_CACHE_MAX_MB`` megabytes, else the default.

    A value that is not a non-negative number is ignored with a warning.
    """
    raw = os.environ.get(MAX_MB_ENV)
    mb = DEFAULT_MAX_MB
    if raw:
        try:
            mb = float(raw)
            if not math.isfinite(mb) or mb < 0:
                raise ValueError(raw)
        except ValueError:
            logger.warning("ignoring %s=%r: not a non-negative number of MB", MAX_MB_ENV, raw)
            mb = DEFAULT_MAX_MB
    return int(mb * 1024 * 1024)


def cache_files(directory: str | os.PathLike[str]) -> list[tuple[Path, int, float]]:
    """fxcompress's files in ``directory`` as ``(path, bytes, mtime)``, oldest first.

    Files that vanish while being listed (another process trimming) are left out.
    """
    found: dict[Path, tuple[Path, int, float]] = {}
    root = Path(directory)
    for pattern in PATTERNS:
        for path in root.glob(pattern):
            try:
                st = path.stat()
            except OSError:
                continue
            if path.is_file():
                found[path] = (path, st.st_size, st.st_mtime)
    return sorted(found.values(), key=lambda f: (f[2], f[0].name))


def trim_cache(directory: str | os.PathLike[str], max_bytes: int | None = None) -> list[Path]:
    """Delete the oldest of fxcompress's files in ``directory`` until they fit in ``max_bytes``.

    ``max_bytes`` defaults to :func:`max_cache_bytes`. Never raises for files it cannot delete
    (another process may hold or have removed them). Returns the files deleted.
    """
    limit = max_cache_bytes() if max_bytes is None else max_bytes
    removed = _delete_oldest(directory, limit)
    if removed:
        logger.info("cache %s over its limit: deleted the %d oldest files", directory, len(removed))
    return removed


def _delete_oldest(directory: str | os.PathLike[str], limit: int) -> list[Path]:
    files = cache_files(directory)
    total = sum(size for _, size, _ in files)
    removed: list[Path] = []
    for path, size, _ in files:
        if total <= limit:
            break
        try:
            path.unlink()
        except FileNotFoundError:
            pass  # another process trimmed it first
        except OSError as exc:
            logger.debug("could not delete cache file %s: %s", path, exc)
            continue
        total -= size
        removed.append(path)
    return removed


@dataclass(frozen=True)
class CacheInfo:
    """What a cache directory holds.

    Attributes
    ----------
    path : pathlib.Path
    exists : bool
    files : int
        fxcompress's files there (latency tables and importance scores).
    bytes : int
        Their total size.
    max_bytes : int
        The size limit (:func:`max_cache_bytes`).
    """

    path: Path
    exists: bool
    files: int
    bytes: int
    max_bytes: int


def cache_info(cache_dir: str | os.PathLike[str] | None = None) -> CacheInfo:
    """Path, file count and size of ``cache_dir`` (default: :func:`default_cache_dir`).

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     info = cache_info(tmp)
    >>> (info.files, info.bytes)
    (0, 0)
    """
    directory = as_cache_dir(cache_dir)
    if directory is None:
        raise InvalidArgument("cache_info needs a directory, got cache_dir=False")
    files = cache_files(directory) if directory.is_dir() else []
    return CacheInfo(
        path=directory,
        exists=directory.is_dir(),
        files=len(files),
        bytes=sum(size for _, size, _ in files),
        max_bytes=max_cache_bytes(),
    )


def clear_cache(cache_dir: str | os.PathLike[str] | None = None) -> int:
    """Delete fxcompress's files in ``cache_dir`` (default: :func:`default_cache_dir`).

    Other files, and the directory itself, are left. Returns the number of files deleted.
    """
    directory = as_cache_dir(cache_dir)
    if directory is None:
        raise InvalidArgument("clear_cache needs a directory, got cache_dir=False")
    if not directory.is_dir():
        return 0
    return len(_delete_oldest(directory, -1))
