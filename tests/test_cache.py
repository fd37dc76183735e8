"""The default on-disk cache (fxcompress.cache): where it is, off, unwritable, trimmed, the CLI."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress import cli
from fxcompress.cache import (
    CacheInfo,
    cache_info,
    clear_cache,
    default_cache_dir,
    max_cache_bytes,
    resolve_cache_dir,
    trim_cache,
)
from fxcompress.errors import InvalidArgument
from fxcompress.latency.table import LatencyTable
from fxcompress.pipeline.pricing import latency_table

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _net() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()]
    for _ in range(3):
        layers += [nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()]
    return nn.Sequential(*layers).eval()


class CountingLoss(nn.Module):
    """An nn.Module loss (so its scores are cached) that counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return ((out - target) ** 2).mean()


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.json")) if directory.is_dir() else []


# ---- where


def test_tests_never_use_the_user_cache() -> None:
    home = Path.home().resolve()
    here = default_cache_dir().resolve()
    assert os.environ["FXCOMPRESS_CACHE_DIR"] == str(default_cache_dir())
    assert home / ".cache" not in here.parents


def test_default_follows_fxcompress_cache_dir_then_xdg(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("FXCOMPRESS_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("FXCOMPRESS_CACHE_DIR")
    if sys.platform in ("win32", "darwin"):
        pytest.skip("XDG_CACHE_HOME is the Linux convention")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "fxcompress"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # invalid by the spec: ignored
    assert default_cache_dir() == Path.home() / ".cache" / "fxcompress"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "fxcompress"


def test_resolve_none_false_path_and_bad_types(tmp_path) -> None:
    assert resolve_cache_dir(None) == default_cache_dir()
    assert default_cache_dir().is_dir()  # created
    assert resolve_cache_dir(False) is None
    assert resolve_cache_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    for bad in (True, 3, ["x"]):
        with pytest.raises(InvalidArgument, match="cache_dir must be a path, None"):
            resolve_cache_dir(bad)


def test_pipeline_tables_and_scores_share_the_default_dir() -> None:
    table = latency_table("measure", "cpu", None, False)
    assert table.cache_path is not None
    assert table.cache_path.parent == default_cache_dir()
    assert latency_table("measure", "cpu", False, False).cache_path is None
    assert LatencyTable(cache_dir=False).cache_path is None
    fxcompress.make_plan(_net(), 0.6, X, latency="flops", progress=False)
    assert [n for n in _files(default_cache_dir()) if n.startswith("importance-")]


# ---- off and unusable


def test_false_writes_nothing(tmp_path) -> None:
    fxcompress.optimize(_net(), 0.6, X, latency="flops", cache_dir=False, progress=False)
    fxcompress.make_plan(_net(), 0.6, X, latency="flops", cache_dir=False, progress=False)
    assert _files(default_cache_dir()) == []


@pytest.mark.parametrize("where", ["argument", "environment"])
def test_unwritable_dir_warns_and_still_returns_a_result(where, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    bad = blocker / "cache"  # cannot be created, even as root
    kw: dict = {"cache_dir": str(bad)} if where == "argument" else {}
    if where == "environment":
        monkeypatch.setenv("FXCOMPRESS_CACHE_DIR", str(bad))
    with caplog.at_level(logging.WARNING, logger="fxcompress"):
        out = fxcompress.optimize(_net(), 0.9, X, latency="flops", progress=False, **kw)
    assert isinstance(out, torch.fx.GraphModule)
    assert out(X).shape == _net()(X).shape
    warned = [r for r in caplog.records if "cannot be used" in r.getMessage()]
    assert len(warned) == 1, caplog.text  # once per call, not once per stage
    assert str(bad) in warned[0].getMessage()


# ---- reuse


def test_second_make_plan_reuses_the_scores_from_the_default_cache() -> None:
    data = [(X, torch.zeros(2, 8, 8, 8))]
    loss = CountingLoss()
    kw = {"data": data, "loss_fn": loss, "latency": "flops", "progress": False}
    first = fxcompress.make_plan(_net(), 0.6, X, **kw)
    cold = loss.calls
    files = _files(default_cache_dir())
    assert len([n for n in files if n.startswith("importance-")]) == 1
    loss.calls = 0
    second = fxcompress.make_plan(_net(), 0.6, X, **kw)
    assert second.to_json() == first.to_json()
    assert cold > 2
    assert loss.calls <= 1
    assert _files(default_cache_dir()) == files
    loss.calls = 0
    fxcompress.make_plan(_net(), 0.6, X, cache_dir=False, **kw)  # off: scored afresh
    assert loss.calls == cold


# ---- size limit


def _aged(path: Path, size: int, age: float) -> Path:
    path.write_bytes(b"x" * size)
    t = time.time() - age
    os.utime(path, (t, t))
    return path


def test_size_limit_deletes_the_oldest_fxcompress_files_only(tmp_path, monkeypatch) -> None:
    old = _aged(tmp_path / "latency-old.json", 4000, 300)
    mid = _aged(tmp_path / "importance-mid.json", 4000, 200)
    new = _aged(tmp_path / "importance-new.json", 4000, 100)
    other = _aged(tmp_path / "notes.json", 50_000, 1000)  # not ours: never counted or deleted
    assert trim_cache(tmp_path, max_bytes=9000) == [old]
    assert [p.exists() for p in (old, mid, new, other)] == [False, True, True, True]
    monkeypatch.setenv("FXCOMPRESS_CACHE_MAX_MB", str(5000 / 2**20))
    assert max_cache_bytes() == 5000
    assert trim_cache(tmp_path) == [mid]
    assert cache_info(tmp_path) == CacheInfo(tmp_path, True, 1, 4000, 5000)
    monkeypatch.setenv("FXCOMPRESS_CACHE_MAX_MB", "lots")
    assert max_cache_bytes() == 512 * 2**20


def test_a_write_trims_the_cache(monkeypatch) -> None:
    cache = default_cache_dir()
    cache.mkdir(parents=True)
    stale = _aged(cache / "importance-stale.json", 8000, 1000)
    monkeypatch.setenv("FXCOMPRESS_CACHE_MAX_MB", str(8000 / 2**20))
    fxcompress.make_plan(_net(), 0.6, X, latency="flops", progress=False)
    assert not stale.exists()
    assert len(_files(cache)) == 1


# ---- command line


def test_cli_cache_info_and_clear(tmp_path, capsys) -> None:
    (tmp_path / "importance-a.json").write_text("{}")
    (tmp_path / "latency-b.json").write_text("{}")
    (tmp_path / "keep.txt").write_text("mine")
    assert cli.main(["cache", "--info", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"path: {tmp_path}" in out
    assert "files: 2" in out
    assert cli.main(["cache", "--clear", "--cache-dir", str(tmp_path)]) == 0
    assert "removed 2 files" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    assert clear_cache(tmp_path / "missing") == 0
    assert cli.main(["cache"]) == 0  # --info by default, on the default (test) cache
    assert f"path: {default_cache_dir()}" in capsys.readouterr().out


def test_cli_subprocess_inherits_the_test_cache() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fxcompress", "cache", "--info"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"path: {default_cache_dir()}" in proc.stdout
