"""Determinism (issue 8): equal inputs give a byte-identical plan JSON, in this process and in
fresh processes with different hash seeds (set and dict orders must not leak into the plan)."""

from __future__ import annotations

import os
import subprocess
import sys

from hypothesis import given, settings

import fxcompress
from fxcompress import InfeasibleBudget
from fxcompress.testing import graphs

_PLAN = """
import torch, fxcompress
from torch import nn
torch.manual_seed(0)
layers = [nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()]
for _ in range(5):
    layers += [nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6()]
model = nn.Sequential(*layers).eval()
x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
print(fxcompress.plan(model, 0.7, x, latency="flops", progress=False).to_json())
"""


def test_plan_json_is_byte_identical_across_processes_and_hash_seeds():
    outs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        proc = subprocess.run(
            [sys.executable, "-c", _PLAN], capture_output=True, text=True, env=env, timeout=300
        )
        assert proc.returncode == 0, proc.stderr
        outs.append(proc.stdout)
    assert outs[0] == outs[1]
    assert fxcompress.Plan.from_json(outs[0]).to_json() + "\n" == outs[0]


@settings(max_examples=15)
@given(graphs(max_steps=5))
def test_random_graphs_plan_twice_identically(case):
    model, x = case
    plans = []
    for _ in range(2):
        try:
            plans.append(fxcompress.plan(model, 0.6, x, latency="flops", progress=False).to_json())
        except InfeasibleBudget as exc:
            plans.append(f"infeasible {exc.minimum!r}")
    assert plans[0] == plans[1]
