"""What ``optimize`` owes its caller (issue 15 items 2, 3, 7, 10, 11, 13): forward hooks are kept or
refused, the caller's tensors are never written, bad batches and shapes get errors that name the
cause, ``Budget`` spellings of "no speed-up" take the exact path, and the ``finetune`` contract
holds (a returned model is merged; a lossy budget without fine-tuning warns)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import fx, nn

import fxcompress
from fxcompress import Budget, CaptureError, InvalidArgument, RewriteError
from fxcompress.depth.analysis import analyze
from fxcompress.depth.importance import Calibration, score_candidates
from fxcompress.depth.options import enumerate_options
from fxcompress.graph.canonicalize import canonicalize
from fxcompress.graph.capture import Hooked, capture, forward_hooks
from fxcompress.graph.recognise import ACTIVATIONS
from fxcompress.latency.timing import paired_timing
from fxcompress.testing import assert_equivalent


def conv_bn(cin: int = 3, cout: int = 4, k: int = 3) -> nn.Sequential:
    bn = nn.BatchNorm2d(cout)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2), bn)


def net(width: int = 8) -> nn.Sequential:
    """conv-BN-ReLU x 3 then conv-BN: mergeable at 1.0 (the last two) and plannable below 1."""
    return nn.Sequential(
        conv_bn(3, width),
        nn.ReLU(),
        conv_bn(width, width),
        nn.ReLU(),
        conv_bn(width, width),
        nn.ReLU(),
        nn.Identity(),
        conv_bn(width, width, 1),
        conv_bn(width, width, 1),
    ).eval()


def shift(module, inputs, output):
    return output * 0.5 + 1.0


def pre_shift(module, inputs):
    return (inputs[0] * 2.0 - 0.25,)


def flat_children(model):
    return [m for m in model.modules() if not list(m.children())]


# --------------------------------------------------------------------------- item 2: hooks


@pytest.mark.parametrize("index", [1, 6, 7], ids=["relu", "identity", "conv-bn block"])
@pytest.mark.parametrize("kind", ["hook", "pre-hook"])
def test_a_forward_hook_is_kept_at_budget_one(index, kind):
    model = net()
    if kind == "hook":
        model[index].register_forward_hook(shift)
    else:
        model[index].register_forward_pre_hook(pre_shift)
    x = torch.randn(1, 3, 8, 8)
    for check in (True, False):
        out = fxcompress.optimize(model, 1.0, x, latency="flops", check=check)
        assert_equivalent(out, model, x)
    report = out.meta["fxcompress"]
    reasons = [reason for _, reason in report.kept]
    name = "shift" if kind == "hook" else "pre_shift"
    assert any(f"module '{index}'" in r and name in r for r in reasons), reasons


def test_a_hooked_dropout_and_a_hooked_conv_inside_a_block_are_kept():
    model = net()
    model[0][0].register_forward_hook(shift)  # a conv followed by a BatchNorm
    model.insert(2, nn.Dropout(0.3))
    model[2].register_forward_hook(shift)
    x = torch.randn(2, 3, 8, 8)
    out = fxcompress.optimize(model, 1.0, x, latency="flops")
    assert_equivalent(out, model, x)
    hooked = [m for m in out.modules() if isinstance(m, Hooked)]
    assert sorted(type(m.module).__name__ for m in hooked) == ["Conv2d", "Dropout"]


def test_a_hooked_module_survives_a_budget_below_one_untouched():
    model = net()
    model[2][0].register_forward_hook(shift)
    x = torch.randn(1, 3, 8, 8)
    data = [torch.randn(2, 3, 8, 8) for _ in range(2)]
    out = fxcompress.optimize(model, 0.8, x, data=data, latency="flops", finetune=lambda m: None)
    kept = [m.module for m in out.modules() if isinstance(m, Hooked)]
    assert len(kept) == 1
    assert forward_hooks(kept[0]) == ["forward hook shift"]
    torch.testing.assert_close(kept[0].weight, model[2][0].weight, rtol=0, atol=0)


def test_hooks_on_the_top_level_module_that_change_outputs_are_refused_naming_them(caplog):
    model = net()
    model.register_forward_hook(shift)
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(CaptureError, match="has forward hook shift, which do not run"):
        fxcompress.optimize(model, 1.0, x, latency="flops")
    with caplog.at_level(logging.WARNING, logger="fxcompress"):
        fxcompress.optimize(model, 1.0, x, latency="flops", check=False)
    assert any("forward hook shift" in r.getMessage() for r in caplog.records)


def test_top_level_hooks_that_leave_outputs_alone_are_accepted():
    calls = []
    model = net()
    model.register_forward_pre_hook(lambda m, i: calls.append(1))  # e.g. checks of the inputs
    x = torch.randn(1, 3, 8, 8)
    out = fxcompress.optimize(model, 1.0, x, latency="flops")
    assert_equivalent(out, model, x)
    assert calls


def test_global_module_hooks_are_refused_naming_the_hook():
    handle = nn.modules.module.register_module_forward_hook(shift)
    try:
        with pytest.raises(CaptureError, match=r"global module hooks.*shift"):
            fxcompress.optimize(net(), 1.0, torch.randn(1, 3, 8, 8), latency="flops")
    finally:
        handle.remove()


def test_the_final_check_compares_with_the_model_itself_not_its_trace(monkeypatch):
    """A canonicalization that changed the function must be caught: the reference of the check
    is the caller's model run eagerly."""
    real = fxcompress.pipeline.captured.canonicalize

    def broken(gm):
        gm = real(gm)
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in ACTIVATIONS.values():
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                break
        gm.recompile()
        return gm

    monkeypatch.setattr(fxcompress.pipeline.captured, "canonicalize", broken)
    model = net()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(RewriteError, match="capture and merge"):
        fxcompress.optimize(model, 1.0, x, latency="flops")
    with pytest.raises(RewriteError, match="capture and canonicalization"):
        fxcompress.optimize(model, 0.6, x, latency="flops")


# --------------------------------------------------------------------------- item 3: copies


class WritesItsInput(nn.Module):
    """``x.mul_(2)`` first, then a mergeable, plannable stack (``inplace=False``: the twin)."""

    def __init__(self, inplace: bool = True):
        super().__init__()
        self.inplace = inplace
        self.body = net()

    def forward(self, x):
        if self.inplace:
            x.mul_(2)
        else:
            x = x * 2
        return self.body(x)


def batches(n: int = 3) -> list[torch.Tensor]:
    return [torch.randn(2, 3, 8, 8) for _ in range(n)]


@pytest.mark.parametrize("check", [True, False])
def test_a_model_writing_its_input_leaves_example_inputs_alone_at_budget_one(check):
    model = WritesItsInput()
    x = torch.randn(1, 3, 8, 8)
    before = x.clone()
    out = fxcompress.optimize(model, 1.0, x, latency="flops", check=check)  # no RewriteError
    assert torch.equal(x, before)
    assert_equivalent(out, model, x)  # each run on its own copy
    assert torch.equal(x, before)


@pytest.mark.parametrize("check", [True, False])
def test_a_model_writing_its_input_leaves_inputs_and_batches_alone_below_one(check):
    model = WritesItsInput()
    x, data = torch.randn(1, 3, 8, 8), batches()
    x0, data0 = x.clone(), [d.clone() for d in data]
    fxcompress.optimize(model, 0.5, x, data=data, latency="flops", check=check)
    assert torch.equal(x, x0)
    assert all(torch.equal(d, d0) for d, d0 in zip(data, data0))


def test_damages_of_a_model_writing_its_input_equal_those_of_its_out_of_place_twin():
    inplace = WritesItsInput()
    twin = WritesItsInput(inplace=False)
    twin.load_state_dict(inplace.state_dict())
    x, data = torch.randn(1, 3, 8, 8), batches()
    plans = [
        fxcompress.plan(m, 0.6, x, data=data, latency="flops", calibration_batches=3)
        for m in (inplace, twin)
    ]
    assert plans[0].segments == plans[1].segments
    assert plans[0].damage == pytest.approx(plans[1].damage, rel=1e-6)


def test_scoring_sees_fresh_inputs_on_every_run():
    model = WritesItsInput()
    data = batches(2)
    data0 = [d.clone() for d in data]
    gm = canonicalize(capture(model, data[0]))
    analysis = analyze(gm)
    options = [o for o in enumerate_options(analysis, prune=True, drop=False) if o.needs_score]
    candidates = [o.segment for o in options]
    calib = Calibration([(d,) for d in data], [None] * len(data))
    first = score_candidates(gm, analysis, candidates, calib, progress=False)
    again = score_candidates(gm, analysis, candidates, calib, progress=False)
    assert first == again
    assert all(torch.equal(d, d0) for d, d0 in zip(data, data0))


def test_paired_timing_runs_on_copies_and_every_call_sees_the_same_input():
    seen: list[float] = []

    class Doubles(nn.Module):
        def forward(self, x):
            seen.append(float(x.sum()))
            return x.mul_(2)

    x = torch.ones(1, 8)
    paired_timing(Doubles(), nn.Identity(), (x,), pairs=3, warmup=2)
    assert torch.equal(x, torch.ones(1, 8))
    assert set(seen) == {8.0}


def test_distill_gives_teacher_and_student_their_own_copies():
    data = batches(2)
    data0 = [d.clone() for d in data]
    teacher = WritesItsInput()
    student = fxcompress.relax(teacher, fxcompress.plan(teacher, 0.6, data[0], latency="flops"))
    fxcompress.Distill(teacher, data, epochs=1, kind="mse")(student)
    assert all(torch.equal(d, d0) for d, d0 in zip(data, data0))


# --------------------------------------------------------------------------- item 7: dict batches


@pytest.mark.parametrize(
    "batch",
    [{"x": torch.randn(2, 3, 8, 8)}, ({"x": torch.randn(2, 3, 8, 8)}, torch.zeros(2))],
    ids=["dict", "dict-inputs"],
)
@pytest.mark.parametrize("with_example", [True, False])
def test_dict_batches_get_a_clear_invalid_argument(batch, with_example):
    x = torch.randn(1, 3, 8, 8) if with_example else None
    with pytest.raises(InvalidArgument, match=r"is a dict \(keys \['x'\]\).*positionally"):
        fxcompress.optimize(net(), 0.6, x, data=[batch], latency="flops")


def test_distill_on_dict_batches_gets_a_clear_invalid_argument():
    model = net()
    with pytest.raises(InvalidArgument, match="is a dict"):
        fxcompress.Distill(model, [{"x": torch.randn(2, 3, 8, 8)}])(copy.deepcopy(model))


# --------------------------------------------------------------------------- item 10: shapes


def test_a_wrong_input_shape_names_the_cause_in_one_line(capfd):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval()
    with pytest.raises(CaptureError) as info:
        fxcompress.optimize(model, 1.0, torch.randn(1, 1, 32, 32), latency="flops")
    message = str(info.value)
    assert "expected input[1, 1, 32, 32] to have 3 channels, but got 1 channels" in message
    assert "module '0' (Conv2d)" in message
    assert "\n" not in message
    assert "tlparse" not in message
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__
    assert capfd.readouterr().err == ""  # torch's ShapeProp printed a traceback to stderr


# --------------------------------------------------------------------------- item 11: budgets


def test_a_speedup_budget_is_reported_as_a_fraction():
    model = net(16)
    x = torch.randn(1, 3, 16, 16)
    out = fxcompress.optimize(model, Budget(speedup=1.25), x, latency="flops")
    report = out.meta["fxcompress"]
    assert report.budget == pytest.approx(0.8)
    assert report.target == {"speedup": 1.25}
    assert "nan" not in report.to_markdown()


def test_a_latency_budget_is_reported_as_a_fraction():
    model = net(16)
    x = torch.randn(1, 3, 16, 16)
    original = fxcompress.plan(model, 1.0, x, latency="flops").original_ms
    out = fxcompress.optimize(model, Budget(latency_ms=0.8 * original), x, latency="flops")
    assert out.meta["fxcompress"].budget == pytest.approx(0.8)


@pytest.mark.parametrize(
    "budget",
    [Budget(speedup=1.0), Budget(fraction=1.0), Budget(latency_ms=1e9)],
    ids=["speedup=1", "fraction=1", "latency_ms-above"],
)
def test_budgets_asking_for_no_speedup_take_the_exact_path(budget):
    model = net()
    x = torch.randn(1, 3, 8, 8)
    reference = fxcompress.optimize(model, 1.0, x, latency="flops")
    out = fxcompress.optimize(model, budget, x, latency="flops")
    assert_equivalent(out, model, x)
    assert_equivalent(out, reference, x, rtol=0)
    report = out.meta["fxcompress"]
    # the stages that ran: no analysis, scoring or planning for a budget asking for no speed-up
    assert list(report.stage_seconds) == ["capture", "merge"]
    assert report.decisions == []
    assert report.damage == 0
    assert report.budget >= 1


# --------------------------------------------------------------------------- item 13: finetune


def test_the_relaxed_model_arrives_in_eval_mode():
    modes = []
    x = torch.randn(1, 3, 8, 8)
    fxcompress.optimize(
        net(), 0.6, x, latency="flops", finetune=lambda m: modes.append(m.training)
    )
    assert modes == [False]


def bump_last_bias(relaxed: fx.GraphModule) -> fx.GraphModule:
    trained = copy.deepcopy(relaxed)
    last = [m for m in trained.modules() if isinstance(m, nn.Conv2d)][-1]
    with torch.no_grad():
        last.bias += 1.0
    trained.train()
    return trained


class Wrapper(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


@pytest.mark.parametrize("wrap", [False, True], ids=["graph-module", "plain-module"])
def test_a_model_returned_by_finetune_is_merged(wrap):
    model = net()
    x = torch.randn(1, 3, 8, 8)
    returned = []

    def finetune(relaxed):
        trained = bump_last_bias(relaxed)
        returned.append(Wrapper(trained) if wrap else trained)
        return returned[-1]

    out = fxcompress.optimize(model, 0.6, x, latency="flops", finetune=finetune)
    plain = fxcompress.optimize(model, 0.6, x, latency="flops", finetune=lambda m: None)
    assert_equivalent(out, returned[0], x)
    difference = (out(x) - plain(x)).abs().max()
    assert difference > 0.5  # the returned weights were used, not the relaxed model's


def test_a_model_returned_by_trial_finetune_is_kept():
    model = net()
    x, data = torch.randn(1, 3, 8, 8), batches(2)
    returned = []

    def trial(relaxed):
        returned.append(bump_last_bias(relaxed))
        return returned[-1]

    out = fxcompress.optimize(
        model, 0.6, x, data=data, latency="flops", plan_candidates=2, trial_finetune=trial
    )
    with torch.no_grad():
        errors = [float((out(x) - r.eval()(x)).abs().max() / out(x).abs().max()) for r in returned]
    assert min(errors) <= 1e-4


@pytest.mark.parametrize("value", [3, "done", [None]])
def test_finetune_returning_anything_else_is_refused_naming_the_type(value):
    with pytest.raises(InvalidArgument, match=f"finetune returned .*{type(value).__name__}"):
        fxcompress.optimize(
            net(), 0.6, torch.randn(1, 3, 8, 8), latency="flops", finetune=lambda m: value
        )


def test_candidate_and_trial_finetunes_returning_non_modules_are_refused():
    x, data = torch.randn(1, 3, 8, 8), batches(2)
    with pytest.raises(InvalidArgument, match="candidate_finetune returned int"):
        fxcompress.optimize(net(), 0.6, x, latency="flops", candidate_finetune=lambda m: 1)
    with pytest.raises(InvalidArgument, match=r"trial_finetune returned .*str"):
        fxcompress.optimize(
            net(), 0.6, x, data=data, latency="flops", plan_candidates=2,
            trial_finetune=lambda m: "x",
        )


def test_a_lossy_budget_without_finetuning_warns(caplog):
    x = torch.randn(1, 3, 8, 8)
    with caplog.at_level(logging.WARNING, logger="fxcompress"):
        fxcompress.optimize(net(), 0.6, x, latency="flops")
    assert any("no fine-tuning" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fxcompress"):
        fxcompress.optimize(net(), 0.6, x, latency="flops", finetune=lambda m: None)
        fxcompress.optimize(net(), 1.0, x, latency="flops")
    assert not any("no fine-tuning" in r.getMessage() for r in caplog.records)
