"""Latency of single ops, measured on a device or estimated analytically, with an on-disk cache.

A :class:`LatencyTable` maps op specs (:class:`~fxcompress.latency.spec.OpSpec`) to latencies in
float milliseconds: in ``"measure"`` mode it times the op on the table's device with its timer
(:mod:`fxcompress.latency.measure`), in ``"flops"`` mode it applies the analytic model of
:func:`~fxcompress.latency.analytic.analytic_ms`. Values are kept in memory and, when the table
has a ``cache_dir``, in a JSON file there (:mod:`fxcompress.latency.cache`), so that a later table
with the same environment reuses them instead of measuring again.

Invariants
----------
* A table holds at most one value per op key and never replaces one it holds: an op is measured
  at most once per table, and which ops get measured depends only on the requests made and on the
  cache's contents, never on timing.
* A table only ever uses cache entries written under an identical environment (device, device
  name, threads, torch version, mode, cache format, and in ``"flops"`` mode the model's constants).
  A cache file that is unreadable, malformed or from another environment is ignored with a logged
  warning, and replaced on the next save; invalid single entries are dropped.
* Measuring leaves global state as it found it: torch's intra-op thread count is restored, and so
  are the train/eval flags of a module given to :meth:`LatencyTable.measure_module`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import torch
from torch import nn

from fxcompress.cache import trim_cache
from fxcompress.errors import InvalidArgument
from fxcompress.latency.analytic import analytic_ms, flops_model
from fxcompress.latency.cache import CACHE_FORMAT, cache_file, merge_and_write, read_cache
from fxcompress.latency.measure import ForwardTimer, Timer, check_device, cpu_name, sync_device
from fxcompress.latency.spec import OpSpec, as_int
from fxcompress.progress import bar as progress_bar

__all__ = ["SAVE_EVERY", "LatencyTable"]

logger = logging.getLogger("fxcompress.latency")

SAVE_EVERY: int = 8
""":meth:`LatencyTable.many` saves to the cache after this many new values."""


class LatencyTable:
    """Latency of ops on a device, in float milliseconds, with an optional on-disk cache.

    Parameters
    ----------
    mode : {"measure", "flops"}
        ``"measure"`` times each op on ``device``; ``"flops"`` uses :func:`analytic_ms` and
        never times anything.
    device : str or torch.device
        ``"cpu"``, ``"cuda[:i]"`` or ``"mps"``. In ``"measure"`` mode it must be available.
    threads : int, optional
        Torch intra-op threads while measuring (restored afterwards); default: torch's current
        setting at construction.
    cache_dir : path-like or False, optional
        Directory of the persistent cache; the file is ``latency-<hash of env>.json`` there. It is
        read at construction and written after new values (created if missing; then the oldest
        files there are trimmed to the size limit, see :mod:`fxcompress.cache`). Ignored in
        ``"flops"`` mode, whose values cost less to compute than to cache. None or False: no
        cache (the pipeline's functions pass :func:`fxcompress.cache.resolve_cache_dir`'s
        directory, the default cache unless told otherwise).
    repeats : int
        Timed runs per op (at most: a slow op stops after about 1.5 s once it has 5 runs); a low
        quantile of them is kept. At least 1.
    warmup : int
        Untimed calls before timing (at most: a slow op stops warming up after about 0.3 s).
        At least 0.
    progress : bool, optional
        Show progress in :meth:`many`: a bar on a terminal, a logged line elsewhere (see
        :mod:`fxcompress.progress`); ``False`` turns it off.
    timer : callable, optional
        Times one module in ``"measure"`` mode and in :meth:`measure_module`, called as
        ``timer(module, inputs, repeats=..., warmup=..., sync=...)`` and returning milliseconds
        (see :class:`~fxcompress.latency.measure.Timer`); default: a
        :class:`~fxcompress.latency.measure.ForwardTimer`. The environment (and so the cache file)
        does not depend on it.

    Raises
    ------
    InvalidArgument
        If an argument has a bad type or value, or the device is unavailable for measuring.

    Examples
    --------
    >>> table = LatencyTable(mode="flops")
    >>> op = OpSpec("linear", (1, 64), out_channels=64)
    >>> ms = table(op)
    >>> ms == analytic_ms(op) and table.entries[op.key()] == ms
    True
    >>> measured = LatencyTable(repeats=2, warmup=0)(op)
    >>> measured > 0
    True
    """

    def __init__(
        self,
        *,
        mode: str = "measure",
        device: str | torch.device = "cpu",
        threads: int | None = None,
        cache_dir: str | os.PathLike[str] | Literal[False] | None = None,
        repeats: int = 30,
        warmup: int = 5,
        progress: bool | None = None,
        timer: Timer | None = None,
    ) -> None:
        if not isinstance(mode, str) or mode not in ("measure", "flops"):
            raise InvalidArgument(
                f"mode must be 'measure' or 'flops', got {mode!r} of type {type(mode).__name__}"
            )
        self._mode = mode
        self._device = check_device(device, need_available=mode == "measure")
        if threads is None:
            threads = torch.get_num_threads()
        self._threads = as_int(threads, "threads")
        if self._threads < 1:
            raise InvalidArgument(f"threads must be >= 1, got {threads!r}")
        self._repeats = as_int(repeats, "repeats")
        if self._repeats < 1:
            raise InvalidArgument(f"repeats must be >= 1, got {repeats!r}")
        self._warmup = as_int(warmup, "warmup")
        if self._warmup < 0:
            raise InvalidArgument(f"warmup must be >= 0, got {warmup!r}")
        if progress is not None and not isinstance(progress, bool):
            raise InvalidArgument(
                f"progress must be a bool or None, got {progress!r} of type "
                f"{type(progress).__name__}"
            )
        self._progress = progress
        if timer is not None and not callable(timer):
            raise InvalidArgument(
                f"timer must be callable, got {timer!r} of type {type(timer).__name__}"
            )
        self._timer: Timer = ForwardTimer() if timer is None else timer
        self._env = self._make_env()
        self._entries: dict[str, float] = {}
        self._cache_path: Path | None = None
        if cache_dir is not None and cache_dir is not False:
            if not isinstance(cache_dir, (str, os.PathLike)):
                raise InvalidArgument(
                    f"cache_dir must be a path, got {cache_dir!r} of type "
                    f"{type(cache_dir).__name__}"
                )
            directory = Path(cache_dir)
            if directory.exists() and not directory.is_dir():
                raise InvalidArgument(f"cache_dir {str(directory)!r} exists and is not a directory")
            if mode == "flops":
                logger.debug("mode 'flops' computes values afresh, ignoring cache_dir")
                return
            self._cache_path = cache_file(directory, self._env)
            _, entries, problem = read_cache(self._cache_path, self._env)
            if problem:
                logger.warning("latency cache %s %s", self._cache_path, problem)
            self._entries.update(entries)
            logger.debug("loaded %d latency entries from %s", len(entries), self._cache_path)

    def _make_env(self) -> dict[str, Any]:
        device = self._device
        device_name: str | None = None  # the analytic model is the same everywhere
        if self._mode == "measure" and device.type == "cuda":
            device_name = torch.cuda.get_device_name(device)
        elif self._mode == "measure" and device.type == "cpu":
            device_name = cpu_name()
        env: dict[str, Any] = {
            "device": str(device),
            "device_name": device_name,
            "format": CACHE_FORMAT,
            "mode": self._mode,
            "threads": self._threads,
            "torch": torch.__version__,
        }
        if self._mode == "flops":
            env["flops_model"] = flops_model()
        return env

    # ---- properties

    @property
    def mode(self) -> str:
        """``"measure"`` or ``"flops"``."""
        return self._mode

    @property
    def device(self) -> torch.device:
        """The device ops are timed on."""
        return self._device

    @property
    def threads(self) -> int:
        """Torch intra-op threads used while measuring."""
        return self._threads

    @property
    def env(self) -> dict[str, Any]:
        """The environment the values belong to (a copy); cache files must match it exactly."""
        return json.loads(json.dumps(self._env))

    @property
    def cache_path(self) -> Path | None:
        """The cache file of this table, or None without a ``cache_dir`` or in ``"flops"`` mode."""
        return self._cache_path

    @property
    def entries(self) -> Mapping[str, float]:
        """Read-only live view of the values held, keyed by :meth:`OpSpec.key`."""
        return MappingProxyType(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, op: object) -> bool:
        return isinstance(op, OpSpec) and op.key() in self._entries

    def __repr__(self) -> str:
        return (
            f"LatencyTable(mode={self._mode!r}, device={str(self._device)!r}, "
            f"threads={self._threads}, entries={len(self._entries)}, "
            f"cache_path={str(self._cache_path) if self._cache_path else None!r})"
        )

    # ---- lookups

    def __call__(self, op: OpSpec) -> float:
        """Latency of ``op`` in ms: the held value, or a new one (then stored and cached).

        Raises
        ------
        InvalidArgument
            If ``op`` is not an :class:`OpSpec`.
        """
        key = _check_op(op).key()
        if key not in self._entries:
            self._entries[key] = self._compute(op)
            self._autosave()
        return self._entries[key]

    def many(self, ops: Iterable[OpSpec]) -> list[float]:
        """Latencies of ``ops``, in order, measuring each missing distinct op once.

        Missing ops are computed in order of first appearance, under a progress bar, and the
        cache is saved every few new values (and on the way out, also after an interruption), so
        an interrupted build resumes where it stopped.

        Examples
        --------
        >>> table = LatencyTable(mode="flops")
        >>> a, b = OpSpec("add", (1, 8)), OpSpec("act", (1, 8), activation="relu")
        >>> x, y, z = table.many([a, b, a])
        >>> x == z and len(table) == 2
        True
        """
        if isinstance(ops, OpSpec):
            raise InvalidArgument(f"many() needs an iterable of OpSpec, got the single op {ops!r}")
        specs = [_check_op(op) for op in ops]
        keys = [op.key() for op in specs]
        todo = {k: op for k, op in zip(keys, specs) if k not in self._entries}
        if todo:
            self._compute_many(todo)
        return [self._entries[k] for k in keys]

    def _compute_many(self, todo: Mapping[str, OpSpec]) -> None:
        unsaved = 0
        try:
            with progress_bar(total=len(todo), desc="latency", enabled=self._progress) as bar:
                for key, op in todo.items():
                    self._entries[key] = self._compute(op)
                    unsaved += 1
                    bar.update()
                    if unsaved >= SAVE_EVERY:
                        self._autosave()
                        unsaved = 0
        finally:
            if unsaved:
                self._autosave()

    def _compute(self, op: OpSpec) -> float:
        if self._mode == "flops":
            return analytic_ms(op)
        module, x = op.build()
        module, x = module.to(self._device), x.to(self._device)
        ms = self._timed(module, (x,))
        logger.debug("measured %.6f ms for %s", ms, op.key())
        return ms

    def _timed(self, module: nn.Module, inputs: tuple[Any, ...]) -> float:
        previous = torch.get_num_threads()
        if previous != self._threads:
            torch.set_num_threads(self._threads)
        try:
            return float(
                self._timer(
                    module, inputs, repeats=self._repeats, warmup=self._warmup, sync=self._sync
                )
            )
        finally:
            if torch.get_num_threads() != previous:
                torch.set_num_threads(previous)

    def _sync(self) -> None:
        sync_device(self._device)

    def measure_module(self, module: nn.Module, inputs: tuple[Any, ...] | torch.Tensor) -> float:
        """Low-quantile ms of ``module(*inputs)`` for whole networks; measured, never cached.

        This times the forward even in ``"flops"`` mode. The module and tensor inputs must
        already be on the table's device; the module runs in eval mode under
        :func:`torch.inference_mode`, and its train/eval flags are restored afterwards.

        Raises
        ------
        InvalidArgument
            If ``module`` is not a module, ``inputs`` not a tuple (a lone tensor is accepted),
            or a parameter or input tensor is on another device.

        Examples
        --------
        >>> table = LatencyTable(repeats=2, warmup=0)
        >>> table.measure_module(nn.Linear(4, 4), (torch.zeros(1, 4),)) > 0
        True
        """
        if not isinstance(module, nn.Module):
            raise InvalidArgument(
                f"module must be a torch.nn.Module, got {module!r} of type {type(module).__name__}"
            )
        if isinstance(inputs, torch.Tensor):
            inputs = (inputs,)
        if not isinstance(inputs, tuple):
            raise InvalidArgument(
                f"inputs must be a tuple of arguments, got {inputs!r} of type "
                f"{type(inputs).__name__}"
            )
        for name, tensor in _named_tensors(module, inputs):
            if not _same_device(tensor.device, self._device):
                raise InvalidArgument(
                    f"{name} is on {tensor.device}, but the table measures on {self._device}"
                )
        flags = {m: m.training for m in module.modules()}
        module.eval()
        try:
            return self._timed(module, inputs)
        finally:
            for m, training in flags.items():
                m.training = training

    # ---- persistence

    def save(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write the values to ``path`` (default: the cache file) as JSON, atomically.

        Entries already in the file under the same environment are merged in first (and taken
        into this table too), so tables sharing a cache directory do not lose each other's
        values. A file from another environment, or an unreadable one, is replaced.

        Returns
        -------
        pathlib.Path
            The file written.

        Raises
        ------
        InvalidArgument
            If ``path`` is None and the table has no ``cache_dir``.
        OSError
            If the file cannot be written.
        """
        if path is None:
            if self._cache_path is None:
                raise InvalidArgument(
                    "save() needs a path when the table has no cache file (no cache_dir, or mode "
                    f"'flops'), got path={path!r}"
                )
            target = self._cache_path
        elif isinstance(path, (str, os.PathLike)):
            target = Path(path)
        else:
            raise InvalidArgument(
                f"path must be a path or None, got {path!r} of type {type(path).__name__}"
            )
        merge_and_write(target, self._env, self._entries)
        logger.debug("saved %d latency entries to %s", len(self._entries), target)
        return target

    def _autosave(self) -> None:
        if self._cache_path is None:
            return
        try:
            self.save()
        except OSError as exc:
            logger.warning("could not write latency cache %s: %s", self._cache_path, exc)
            return
        trim_cache(self._cache_path.parent)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        repeats: int = 30,
        warmup: int = 5,
        progress: bool | None = None,
        timer: Timer | None = None,
    ) -> LatencyTable:
        """A table with the mode, device, threads and entries of a file written by :meth:`save`.

        If the file's environment differs from the one the table gets here (another torch
        version or machine, say), a warning is logged and its entries are not used.

        Raises
        ------
        InvalidArgument
            If the file cannot be read or is not a latency file, or its device is unavailable.

        Examples
        --------
        >>> import tempfile
        >>> table = LatencyTable(mode="flops")
        >>> _ = table(OpSpec("add", (1, 8)))
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     loaded = LatencyTable.load(table.save(Path(tmp) / "table.json"))
        >>> dict(loaded.entries) == dict(table.entries)
        True
        """
        if not isinstance(path, (str, os.PathLike)):
            raise InvalidArgument(
                f"path must be a path, got {path!r} of type {type(path).__name__}"
            )
        path = Path(path)
        if not path.is_file():
            raise InvalidArgument(f"no latency file at {str(path)!r}")
        env, entries, problem = read_cache(path, None)
        if env is None:
            raise InvalidArgument(f"{str(path)!r} {problem or 'is not a latency file'}")
        try:
            mode, device, threads = env["mode"], env["device"], env["threads"]
        except KeyError as exc:
            raise InvalidArgument(f"{str(path)!r} has no {exc} in its env") from None
        table = cls(
            mode=mode,
            device=device,
            threads=threads,
            cache_dir=cache_dir,
            repeats=repeats,
            warmup=warmup,
            progress=progress,
            timer=timer,
        )
        if env != table._env:
            _, _, mismatch = read_cache(path, table._env)
            logger.warning("not using latency file %s: it %s", path, mismatch)
            return table
        if problem:
            logger.warning("latency file %s %s", path, problem)
        table._entries.update(entries)
        return table


def _check_op(op: object) -> OpSpec:
    if not isinstance(op, OpSpec):
        raise InvalidArgument(f"expected an OpSpec, got {op!r} of type {type(op).__name__}")
    return op


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def _named_tensors(
    module: nn.Module, inputs: tuple[Any, ...]
) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in module.named_parameters():
        yield f"parameter {name!r}", tensor
    for name, tensor in module.named_buffers():
        yield f"buffer {name!r}", tensor
    for i, value in enumerate(inputs):
        if isinstance(value, torch.Tensor):
            yield f"inputs[{i}]", value
