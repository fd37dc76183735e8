"""The pipeline's stages on their own: a prepared problem solved at several budgets, the closed
loop with an injected measurement, plans in the format saved before."""

from __future__ import annotations

import contextlib
import json
from typing import ClassVar

import pytest
import torch
from test_optimize import X, _net, _PredictingTable

import fxcompress
from fxcompress.depth.segment import Segment
from fxcompress.pipeline import ClosedLoop, Plan, prepare_problem, solve
from fxcompress.pipeline.build import Builder
from fxcompress.pipeline.captured import capture_once
from fxcompress.pipeline.measure import Stopwatch
from fxcompress.pipeline.problem import Planning, prepare


def test_a_prepared_problem_solves_as_make_plan_plans() -> None:
    prepared = prepare_problem(_net(), 0.6, X, latency="flops")
    for budget in (0.5, 0.6, fxcompress.Budget(speedup=1.25)):
        plan = solve(prepared, budget)
        assert plan.to_json() == fxcompress.make_plan(_net(), budget, X, latency="flops").to_json()
        assert all(isinstance(s, Segment) for s in plan.segments)


def test_the_closed_loop_runs_on_its_own_with_an_injected_measurement() -> None:
    captured = capture_once(_net(), (X,))
    table = _PredictingTable(mode="flops")
    calls = []

    def measure(original, result, inputs):
        calls.append(result)
        return 10.0, 9.9  # every network measures 0.99 of the original

    prepared = prepare(captured, Planning(), table, measure)
    plan = solve(prepared, 0.8)
    builder = Builder(captured, table, check=True, watch=Stopwatch())
    outcome = ClosedLoop(table, measure=measure, max_replans=2).run(
        prepared, plan, builder.build, captured.gm
    )
    assert outcome.best is None  # nothing measured within 1.05 x 0.8
    assert outcome.fastest.ratio == pytest.approx(0.99)
    assert 1 <= len(outcome.tried) <= 3
    assert len(outcome.replans) == len(outcome.tried) - 1
    assert all(r["direction"] == "tighter" for r in outcome.replans)
    assert len(calls) == 1 + len(outcome.tried)  # the table's calibration, then each attempt
    assert builder.max_rel_error is not None


def test_plans_saved_before_still_load() -> None:
    saved = {
        "format": 1,
        "segments": [["body", 0, 2, "merge:prune=relu", ["relu"]], ["body", 2, 3, "keep", []]],
        "input_shapes": [[[2, 3, 12, 12], "float32"]],
        "budget_ms": 1.5,
        "predicted_ms": 1.25,
        "original_ms": 2.5,
        "damage": 0.125,
        "leaf_modules": [],
        "front": [[1.25, 0.125]],
        "segment_ms": [[1.0, 0.75], [0.5, 0.5]],
    }
    text = json.dumps(saved, sort_keys=True)
    plan = Plan.from_json(text)
    assert plan.to_json() == text
    assert plan.segments[0] == ("body", 0, 2, "merge:prune=relu", ("relu",))
    assert [s.id for s in plan.segments] == ["body:0-2:merge:prune=relu", "body:2-3:keep"]
    # plain 5-tuples still build a plan, as Segments
    assert Plan(**{**plan.__dict__, "segments": tuple(map(tuple, plan.segments))}) == plan


class _CountsTraces(torch.nn.Module):
    """A small conv net that counts how often it is traced (called with an fx Proxy).

    The count is kept on the class: capture works on a deep copy of the model.
    """

    traces: ClassVar[list[int]] = []

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1),
            torch.nn.BatchNorm2d(8),
            torch.nn.ReLU(),
            torch.nn.Conv2d(8, 8, 3, padding=1),
            torch.nn.BatchNorm2d(8),
            torch.nn.ReLU(),
            torch.nn.Conv2d(8, 8, 3, padding=1),
            torch.nn.ReLU(),
        )

    def forward(self, x):
        if isinstance(x, torch.fx.Proxy):
            self.traces.append(1)
        return self.body(x)


@pytest.mark.parametrize(
    ("budget", "methods"),
    [
        (1.0, ("merge", "prune")),
        (0.8, ("merge", "prune")),
        (0.8, ("merge", "prune", "drop")),
        (0.5, ("lowrank",)),
    ],
)
def test_optimize_traces_the_model_once(budget, methods) -> None:
    _CountsTraces.traces.clear()
    model = _CountsTraces().eval()
    x = torch.randn(2, 3, 8, 8)
    # the budget does not matter here (it may be out of reach): how often the model is traced does
    with contextlib.suppress(fxcompress.InfeasibleBudget):
        fxcompress.optimize(model, budget, x, latency="flops", methods=methods, progress=False)
    assert len(_CountsTraces.traces) == 1
