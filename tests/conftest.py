"""Shared test configuration: hypothesis profiles, deterministic torch settings, a private cache.

Profiles: ``ci`` (the default; derandomised, fixed example counts) and ``dev`` (fewer examples,
for quick local iterations). Select with ``HYPOTHESIS_PROFILE=dev``. ``long`` runs the fuzzers for
thousands of examples (documented in docs/testing.md).

Tests never write to the user's cache: ``FXCOMPRESS_CACHE_DIR`` points into a temporary directory
of this process, set at import (so subprocesses and the package's doctests inherit it), and each
test gets its own subdirectory of it (so no test sees another's cached scores or timings).
"""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=100,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("dev", parent=settings.get_profile("ci"), max_examples=20)
settings.register_profile("long", parent=settings.get_profile("ci"), max_examples=2000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(1)

_CACHE_ROOT = Path(tempfile.mkdtemp(prefix="fxcompress-test-cache-"))
atexit.register(shutil.rmtree, _CACHE_ROOT, ignore_errors=True)
os.environ["FXCOMPRESS_CACHE_DIR"] = str(_CACHE_ROOT / "session")
_TEST_NUMBER = itertools.count()


@pytest.fixture(autouse=True)
def _private_cache(monkeypatch):
    """Each test caches in its own (not yet created) directory under this process's root."""
    monkeypatch.setenv("FXCOMPRESS_CACHE_DIR", str(_CACHE_ROOT / f"t{next(_TEST_NUMBER)}"))


@pytest.fixture(autouse=True)
def _seed_torch():
    """Give every test the same torch RNG state, and restore the caller's afterwards."""
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    yield
    torch.random.set_rng_state(state)
