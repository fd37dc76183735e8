"""The on-disk latency cache: one JSON file per environment, safe under concurrent writers.

A file holds ``{"format": CACHE_FORMAT, "env": {...}, "entries": {op key: ms}}``. A table only
ever uses entries written under an identical environment.

Invariants
----------
* A cache file that is unreadable, malformed or from another environment yields no entries and
  a reason (the table logs it as a warning), and is replaced on the next save; invalid single
  entries are dropped. Reading never raises for bad content.
* Cache files are written atomically (a temporary file in the same directory, then
  :func:`os.replace`), so readers see either the old or the new file, never a partial one. Each
  write first re-reads the file and keeps the entries other writers added since
  (:func:`merge_and_write`); only writes racing within that short window can drop each other's new
  entries, which are then measured again later. Files are not fsynced: after a power cut a
  damaged file is just rebuilt.
* Files are JSON only; nothing is ever pickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

__all__ = ["CACHE_FORMAT", "atomic_write_json", "cache_file", "merge_and_write", "read_cache"]

logger = logging.getLogger("fxcompress.latency")

CACHE_FORMAT: int = 2  # 2: entries are a low quantile of the runs, not their median
"""Version of the cache file layout; part of the environment, so a new version starts afresh."""


def cache_file(directory: Path, env: Mapping[str, Any]) -> Path:
    """The cache file of ``env`` in ``directory``: ``latency-<hash of env>.json``.

    Examples
    --------
    >>> cache_file(Path("cache"), {"mode": "measure"}).name
    'latency-d1117a30f254f95d.json'
    """
    digest = hashlib.sha256(
        json.dumps(env, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()[:16]
    return directory / f"latency-{digest}.json"


def read_cache(
    path: Path, env: Mapping[str, Any] | None
) -> tuple[dict[str, Any] | None, dict[str, float], str | None]:
    """The environment and entries of the cache file at ``path`` and, if something is wrong, why.

    The environment is None when the file is missing or is not a cache file at all. With ``env``
    given, a file from another environment yields no entries. Never raises for bad content.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, {}, None
    except (OSError, UnicodeDecodeError) as exc:
        return None, {}, f"cannot be read ({exc})"
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        # JSONDecodeError, but also integers longer than Python's digit limit (ValueError) and
        # nesting deeper than the recursion limit (RecursionError): never crash on a bad file
        return None, {}, f"is not valid JSON ({type(exc).__name__}: {str(exc)[:100]})"
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
        return None, {}, f"is not a latency file of format {CACHE_FORMAT}"
    stored_env, stored = data.get("env"), data.get("entries")
    if not isinstance(stored_env, dict) or not isinstance(stored, dict):
        return None, {}, "lacks an 'env' or 'entries' object"
    if env is not None and stored_env != env:
        differ = sorted(k for k in set(env) | set(stored_env) if env.get(k) != stored_env.get(k))
        detail = ", ".join(f"{k}: {stored_env.get(k)!r} != {env.get(k)!r}" for k in differ)
        return stored_env, {}, f"was written in another environment ({detail})"
    entries: dict[str, float] = {}
    for key, value in stored.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value)
            if math.isfinite(value) and value > 0:
                entries[key] = value
    dropped = len(stored) - len(entries)
    return stored_env, entries, (f"has {dropped} invalid entries, dropped" if dropped else None)


def atomic_write_json(path: Path, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` as JSON to ``path`` through a temporary file and :func:`os.replace`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(payload, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def merge_and_write(
    path: Path, env: Mapping[str, Any], entries: MutableMapping[str, float]
) -> None:
    """Write ``entries`` to ``path`` atomically, after taking in the entries already there.

    Entries the file holds under the same ``env`` are added to ``entries`` (in place; values
    already in ``entries`` win), so tables sharing a cache file do not lose each other's values.
    A file from another environment, or an unreadable one, is replaced.

    Raises
    ------
    OSError
        If the file cannot be written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    _, existing, problem = read_cache(path, env)
    if problem:
        logger.info("latency file %s %s; it will be replaced", path, problem)
    for key, value in existing.items():
        entries.setdefault(key, value)
    payload = {"format": CACHE_FORMAT, "env": env, "entries": dict(sorted(entries.items()))}
    atomic_write_json(path, payload)
