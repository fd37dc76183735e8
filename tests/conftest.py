"""Shared test configuration: hypothesis profiles and deterministic torch settings.

Profiles: ``ci`` (the default; derandomised, fixed example counts) and ``dev`` (fewer examples,
for quick local iterations). Select with ``HYPOTHESIS_PROFILE=dev``. ``long`` runs the fuzzers for
thousands of examples (documented in docs/testing.md).
"""

from __future__ import annotations

import os

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


@pytest.fixture(autouse=True)
def _seed_torch():
    """Give every test the same torch RNG state, and restore the caller's afterwards."""
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    yield
    torch.random.set_rng_state(state)
