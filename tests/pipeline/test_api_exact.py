"""``fxcompress.optimize(model, 1.0, ...)`` applies only exact rewrites: its result computes what
the original model computes, the caller's model is left alone, the report is consistent with the
model, and the result exports. The reference is always the original model."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import nn

import fxcompress
from fxcompress import InvalidArgument, Report, capture, merge
from fxcompress.testing import GeneratedModel, assert_equivalent, models


def optimize_exact(model: nn.Module, x) -> torch.fx.GraphModule:
    return fxcompress.optimize(model, 1.0, example_inputs=x, latency="flops")


def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[bool]]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, [m.training for m in model.modules()]


def assert_unchanged(model: nn.Module, snap) -> None:
    state, flags = snap
    assert model.state_dict().keys() == state.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert [m.training for m in model.modules()] == flags


def foldable_bns(model: GeneratedModel) -> int:
    """BNs that follow a conv/linear whose output nothing else reads, from the model's program
    (value ``i`` is produced by step ``i - 1``)."""
    reads: dict[int, int] = {}
    for step in model.steps:
        for i in step.inputs:
            reads[i] = reads.get(i, 0) + 1
    for i in model.outputs:
        reads[i] = reads.get(i, 0) + 1

    def is_layer(i: int) -> bool:
        if i == 0:
            return False
        step = model.steps[i - 1]
        if step.op == "conv_fn":
            return True
        return step.op == "module" and isinstance(
            model.get_submodule(step.arg), (nn.Conv2d, nn.Linear)
        )

    total = 0
    for step in model.steps:
        if step.op == "module" and isinstance(model.get_submodule(step.arg), nn.BatchNorm2d):
            (i,) = step.inputs
            total += is_layer(i) and reads[i] == 1
    return total


def macs(gm: torch.fx.GraphModule) -> int:
    """Multiply-accumulates of every conv/linear call, module or functional, from the shapes
    recorded on the graph."""
    total = 0
    for node in gm.graph.nodes:
        out = node.meta.get("tensor_meta")
        if node.op == "call_module":
            mod = gm.get_submodule(str(node.target))
            if isinstance(mod, nn.Conv2d):
                per = mod.in_channels // mod.groups * math.prod(mod.kernel_size)
                total += math.prod(out.shape) * per
            elif isinstance(mod, nn.Linear):
                total += math.prod(out.shape) * mod.in_features
        elif node.op == "call_function" and node.target is F.conv2d:
            weight = gm.get_parameter(str(node.args[1].target))
            total += math.prod(out.shape) * math.prod(weight.shape[1:])
    return total


@given(models(multiple_outputs=True))
def test_optimize_at_budget_one_is_exact(case):
    model, x = case
    snap = snapshot(model)
    compiled = optimize_exact(model, x)
    assert_equivalent(compiled, model, x)
    assert_unchanged(model, snap)

    report = compiled.meta["fxcompress"]
    assert isinstance(report, Report)
    kinds = [e["kind"] for e in report.events]
    assert kinds.count("fold_bn") == foldable_bns(model)
    adds = sum(s.op == "add" for s in model.steps)
    layer_calls = sum(
        s.op == "conv_fn"
        or (s.op == "module" and isinstance(model.get_submodule(s.arg), (nn.Conv2d, nn.Linear)))
        for s in model.steps
    )
    assert kinds.count("fold_skip") <= adds
    assert kinds.count("merge") < max(layer_calls, 1)  # each merge removes one layer call
    assert macs(compiled) <= macs(capture(model, x))  # exact rewrites are never costlier
    if not any(s.op == "conv_fn" for s in model.steps):  # Report ignores functional convs
        assert report.macs_before == macs(capture(model, x))
        assert report.macs_after == macs(compiled)
    assert report.max_rel_error is not None
    assert report.max_rel_error <= 1e-4
    json.dumps(report.to_dict())  # JSON-serialisable as it is
    markdown = report.to_markdown()
    assert markdown.startswith("# fxcompress report")
    for kind in set(kinds):
        assert f"{kind} ×{kinds.count(kind)}" in markdown


@settings(max_examples=30)  # the float32 property above covers the structure; slow-ish
@given(models(dtype=torch.float64))
def test_optimize_at_budget_one_is_exact_in_float64(case):
    model, x = case
    compiled = optimize_exact(model, x)
    assert assert_equivalent(compiled, model, x) <= 1e-9


@settings(max_examples=10)  # torch.export takes ~0.5 s per model
@given(models())
def test_result_exports_with_equal_outputs(case):
    model, x = case
    compiled = optimize_exact(model, x)
    exported = torch.export.export(compiled, (x,))
    assert_equivalent(exported.module(), model, x)
    assert_equivalent(exported.module(), compiled, x)


class Block(nn.Module):
    """A ResNet basic block with a projection shortcut, and a plain one after it."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.down = nn.Sequential(nn.Conv2d(3, 8, 1, stride=2, bias=False), nn.BatchNorm2d(8))
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out = self.relu(out + self.down(x))
        out = self.relu(self.bn3(self.conv3(out)) + out)
        return self.fc(self.drop(out.mean((2, 3))))


def trained_block(train: bool) -> Block:
    torch.manual_seed(0)
    block = Block()
    block.train()
    with torch.no_grad():
        for _ in range(3):  # move the running statistics away from their defaults
            block(torch.randn(8, 3, 12, 12))
    return block.train(train)


@pytest.mark.parametrize("train", [False, True])
def test_caller_model_unchanged_by_optimize_capture_and_merge(train):
    model = trained_block(train)
    x = torch.randn(2, 3, 12, 12)
    snap = snapshot(model)
    compiled = optimize_exact(model, x)
    assert_unchanged(model, snap)
    gm = capture(model, x)
    assert_unchanged(model, snap)
    merge(gm)
    assert_unchanged(model, snap)
    assert model.training == train
    # the result equals the model's eval-mode output (assert_equivalent runs both in eval and
    # restores the flags)
    assert_equivalent(compiled, model, x)
    assert_unchanged(model, snap)
    kinds = sorted(e["kind"] for e in compiled.meta["fxcompress"].events)
    # 4 BNs after convs and the identity skip around conv3 fold; the projection shortcut does
    # not (its other branch is two convs with a ReLU between), nor does anything across a ReLU
    assert kinds == ["drop", "fold_bn", "fold_bn", "fold_bn", "fold_bn", "fold_skip"]
    convs = [m for m in compiled.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 4


@pytest.mark.parametrize(
    "budget", [0, -1, 1.5, float("nan"), float("inf"), "0.5", True, None, 0.0, [0.5]]
)
def test_bad_budgets_are_rejected_with_their_repr(budget):
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(InvalidArgument) as info:
        fxcompress.optimize(model, budget, example_inputs=torch.randn(1, 3, 6, 6), latency="flops")
    assert isinstance(info.value, ValueError)
    assert repr(budget) in str(info.value)


def test_report_dict_round_trips_through_json():
    model = trained_block(False)
    report = optimize_exact(model, torch.randn(1, 3, 12, 12)).meta["fxcompress"]
    d = report.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["budget"] == 1.0
    assert d["params_after"] < d["params_before"]  # BN parameters are gone
    assert math.isclose(d["macs_after"], d["macs_before"])
    assert copy.deepcopy(report).to_markdown() == report.to_markdown()
