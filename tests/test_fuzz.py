"""Graph fuzzer (issue 8): random model DAGs from ``fxcompress.testing.graphs`` through the whole
pipeline. The reference is always the original model.

Counts in the default ``ci`` profile: 200 + 150 examples; ``HYPOTHESIS_PROFILE=long`` runs
2000 each.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxcompress
from fxcompress import InfeasibleBudget, make_plan, merge
from fxcompress.testing import assert_equivalent, graphs

LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"


def snapshot(model):
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, [m.training for m in model.modules()]


def assert_untouched(model, snap):
    state, flags = snap
    assert model.state_dict().keys() == state.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert [m.training for m in model.modules()] == flags


@settings(max_examples=2000 if LONG else 200)
@given(graphs(dtype=torch.float64))
def test_budget_one_is_the_identity(case):
    model, x = case
    snap = snapshot(model)
    compiled = fxcompress.optimize(model, 1.0, example_inputs=x, latency="flops")
    assert assert_equivalent(compiled, model, x) <= 1e-9
    assert_untouched(model, snap)


METHODS = st.sampled_from([("merge",), ("merge", "prune"), ("merge", "prune", "drop")])


@settings(max_examples=2000 if LONG else 150)
@given(graphs(max_steps=6), st.floats(0.05, 0.999), METHODS)
def test_random_budget_never_crashes_and_relaxed_equals_merged(case, budget, methods):
    model, x = case
    snap = snapshot(model)
    minimum = None
    try:
        plan = make_plan(model, budget, x, latency="flops", methods=methods, progress=False)
    except InfeasibleBudget as exc:
        minimum = exc.minimum
    if minimum is not None:
        assert minimum > budget
        assert_untouched(model, snap)
        return
    assert plan.predicted_ms <= budget * plan.original_ms * (1 + 1e-9)
    relaxed = fxcompress.relax(model, plan, x)
    assert_equivalent(merge(relaxed), relaxed, x)
    out = fxcompress.optimize(
        model, budget, example_inputs=x, latency="flops", methods=methods, progress=False
    )
    assert_equivalent(out, relaxed, x)
    assert_untouched(model, snap)


@pytest.mark.parametrize("seed", range(3))
def test_shared_modules_called_twice_stay_exact(seed):
    """A conv called twice with a BN after one call site only (torch.fx fuser bug class)."""
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    bn = torch.nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = conv, bn

        def forward(self, x):
            return self.conv(torch.relu(self.bn(self.conv(x))))

    m = M().eval()
    x = torch.randn(1, 4, 6, 6)
    for b in (1.0, 0.5):
        try:
            out = fxcompress.optimize(m, b, example_inputs=x, latency="flops", progress=False)
        except InfeasibleBudget:
            continue
        if b == 1.0:
            assert_equivalent(out, m, x)
