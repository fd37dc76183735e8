"""Choosing among near-equal plans by a trial fine-tune (``optimize(plan_candidates=k)``)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from torch import fx, nn

import fxcompress
from fxcompress.errors import InvalidArgument
from fxcompress.pipeline.selection import choose


def _net() -> nn.Module:
    """A small residual CNN (two blocks, a plain tail): several near-equal plans at 0.55."""
    from test_optimize import _net as residual_net

    return residual_net()


_G = torch.Generator().manual_seed(5)
DATA = [
    (torch.randn(4, 3, 12, 12, generator=_G), torch.randint(0, 5, (4,), generator=_G))
    for _ in range(3)
]
LOSS = nn.functional.cross_entropy


def _sgd(relaxed: fx.GraphModule) -> None:
    """A short deterministic fine-tune: a few SGD steps on ``DATA``."""
    relaxed.train()
    opt = torch.optim.SGD(relaxed.parameters(), lr=0.05)
    for x, y in DATA * 2:
        opt.zero_grad()
        LOSS(relaxed(x), y).backward()
        opt.step()


def _loss(model: nn.Module) -> float:
    with torch.no_grad():
        return sum(float(LOSS(model(x), y)) for x, y in DATA) / len(DATA)


def _fidelity(model: nn.Module) -> float:
    """Relative squared error of ``model``'s outputs against the original's on ``DATA``."""
    original = _net()
    with torch.no_grad():
        err = sum(float((model(x) - original(x)).pow(2).sum()) for x, _ in DATA)
        ref = sum(float(original(x).pow(2).sum()) for x, _ in DATA)
    return err / ref


def _kept(out: nn.Module) -> dict:
    """The one trial marked chosen; it scored best, and the returned model has its score."""
    trials = out.meta["fxcompress"].trials
    (kept,) = [t for t in trials if t["chosen"]]
    assert kept["score"] == min(t["score"] for t in trials if t["score"] is not None)
    # the result is the kept plan's trained network, merged (or trained the same way again):
    # its score, recomputed here on the merged model, is the one its trial recorded
    assert _fidelity(out) == pytest.approx(kept["score"], rel=1e-4)
    return kept


def _optimize(**kw):
    """Output-fidelity damage (no ``loss_fn``): every plan at 0.55 changes the function."""
    kw.setdefault("trial_finetune", _sgd)
    return fxcompress.optimize(_net(), 0.55, data=DATA, latency="flops", plan_candidates=4, **kw)


def test_the_kept_plan_scores_best_and_is_the_one_returned() -> None:
    out = _optimize()
    report = out.meta["fxcompress"]
    trials = report.trials
    assert len(trials) >= 3, "the budget leaves several plans to choose from"
    assert [t["rank"] for t in trials] == list(range(len(trials)))
    assert [t["damage"] for t in trials[1:]] == sorted(t["damage"] for t in trials[1:])
    assert all(t["predicted_ms"] <= 0.55 * report.original_ms for t in trials)
    # plans whose trainable networks coincide are tried once: every trial trains another network
    assert len({t["score"] for t in trials}) == len(trials)
    kept = _kept(out)
    assert report.damage == kept["damage"]
    assert f"plan kept after trial fine-tunes: rank {kept['rank']} of {len(trials)}" in (
        report.to_markdown()
    )


def test_a_runner_up_that_trains_better_wins() -> None:
    calls: list[int] = []

    def spoil_the_first(relaxed: fx.GraphModule) -> None:
        """The planner's best plan (tried first) is made useless by its trial."""
        calls.append(1)
        _sgd(relaxed)
        if len(calls) == 1:
            with torch.no_grad():
                for p in relaxed.parameters():
                    p.mul_(-30.0)

    out = _optimize(trial_finetune=spoil_the_first)
    trials = out.meta["fxcompress"].trials
    assert len(calls) == len(trials)
    kept = _kept(out)
    assert kept["rank"] != 0
    assert out.meta["fxcompress"].damage == kept["damage"] >= trials[0]["damage"]


def test_finetune_after_the_choice_starts_from_the_kept_plan() -> None:
    tuned: list[fx.GraphModule] = []

    def finetune(relaxed: fx.GraphModule) -> None:
        tuned.append(relaxed)
        _sgd(relaxed)

    out = _optimize(finetune=finetune)
    # the trial ran on every candidate, the fine-tune once more on the kept plan's fresh network
    assert len(tuned) == 1
    _kept(out)  # same deterministic training as its trial: the same network and score


def test_finetune_doubles_as_trial_and_is_not_run_twice() -> None:
    seen: list[int] = []

    def finetune(relaxed: fx.GraphModule) -> None:
        seen.append(1)
        _sgd(relaxed)

    out = fxcompress.optimize(
        _net(),
        0.55,
        data=DATA,
        latency="flops",
        plan_candidates=3,
        finetune=finetune,
    )
    trials = out.meta["fxcompress"].trials
    assert len(seen) == sum(t["score"] is not None for t in trials) == len(trials)
    _kept(out)


def test_task_loss_ranks_plans_with_a_loss() -> None:
    # at 0.4 the best plan raises the task loss (at 0.7 and above it does not, on random labels)
    out = fxcompress.optimize(
        _net(),
        0.4,
        data=DATA,
        loss_fn=LOSS,
        latency="flops",
        plan_candidates=3,
        trial_finetune=_sgd,
    )
    trials = out.meta["fxcompress"].trials
    assert len(trials) >= 2
    (kept,) = [t for t in trials if t["chosen"]]
    assert kept["score"] == min(t["score"] for t in trials)
    assert _loss(out) == pytest.approx(kept["score"], rel=1e-4)


def test_a_best_plan_without_damage_is_kept_untried() -> None:
    # on random labels, the best plan at 0.7 does not raise the task loss: nothing does better
    plain = fxcompress.optimize(_net(), 0.7, data=DATA, loss_fn=LOSS, latency="flops")
    out = fxcompress.optimize(
        _net(),
        0.7,
        data=DATA,
        loss_fn=LOSS,
        latency="flops",
        plan_candidates=4,
        trial_finetune=lambda relaxed: pytest.fail("no trial for a plan without damage"),
    )
    report = out.meta["fxcompress"]
    assert report.damage == 0.0
    assert report.trials == []
    assert report.decisions == plain.meta["fxcompress"].decisions


def _optimize_timed(runners_up: list[float], k: int) -> tuple[list[dict], int]:
    """``optimize`` on a deterministic "measured" table whose whole-network timings are faked:
    the table's calibration (the model against its exact merge), the chosen plan in the band at
    0.55, then ``runners_up`` in turn. Returns the trials and how many plans were trained."""
    from test_optimize import _PredictingTable

    seq = iter([1.0, 0.55, *runners_up])
    trained: list[int] = []
    out = fxcompress.optimize(
        _net(),
        0.55,
        data=DATA,
        latency=_PredictingTable(),
        plan_candidates=k,
        trial_finetune=lambda relaxed: trained.append(1),
        measure=lambda original, result, inputs: (10.0, 10 * next(seq)),
    )
    return out.meta["fxcompress"].trials, len(trained)


def test_plans_measured_too_slow_are_not_trained() -> None:
    trials, trained = _optimize_timed([0.9] * 50, k=4)
    assert len(trials) >= 2
    assert trained == 1
    assert trials[0]["chosen"]
    assert trials[0]["measured_ratio"] == 0.55
    assert all(t["score"] is None and t["measured_ratio"] == 0.9 for t in trials[1:])
    assert len(trials) - 1 <= 2 * (4 - 1)  # runners-up timed at most


def test_slow_runners_up_are_passed_over_until_enough_can_be_trained() -> None:
    trials, trained = _optimize_timed([0.9, 0.55] * 50, k=3)
    assert trained == 3  # the best plan and two runners-up measured in the band
    assert [t["measured_ratio"] for t in trials] == [0.55, 0.9, 0.55, 0.9, 0.55]
    assert [t["score"] is None for t in trials] == [False, True, False, True, False]


def test_equal_inputs_give_equal_choices_and_the_caller_model_is_untouched() -> None:
    net = _net().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    first = fxcompress.optimize(
        net,
        0.55,
        data=DATA,
        latency="flops",
        plan_candidates=3,
        trial_finetune=_sgd,
    )
    second = fxcompress.optimize(
        _net(),
        0.55,
        data=DATA,
        latency="flops",
        plan_candidates=3,
        trial_finetune=_sgd,
    )
    assert net.training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    a, b = first.meta["fxcompress"].trials, second.meta["fxcompress"].trials
    assert a == b
    with torch.no_grad():
        assert torch.equal(first(DATA[0][0]), second(DATA[0][0]))


def test_one_candidate_is_the_default_and_calls_no_trial() -> None:
    out = fxcompress.optimize(
        _net(),
        0.55,
        data=DATA,
        loss_fn=LOSS,
        latency="flops",
        trial_finetune=lambda relaxed: pytest.fail("no trial without plan_candidates > 1"),
    )
    assert out.meta["fxcompress"].trials == []


@given(st.one_of(st.integers(-3, 0), st.just(True), st.just(2.5), st.just("3"), st.none()))
@example(0)
@example(True)
def test_bad_plan_candidates_are_named(value) -> None:
    with pytest.raises(InvalidArgument, match="plan_candidates"):
        fxcompress.optimize(
            _net(), 0.55, data=DATA, latency="flops", plan_candidates=value, trial_finetune=_sgd
        )


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"plan_candidates": 2}, "needs trial_finetune"),
        ({"plan_candidates": 2, "trial_finetune": "sgd"}, "trial_finetune must be a callable"),
        (
            {"plan_candidates": 2, "trial_finetune": _sgd, "methods": ("lowrank",)},
            "lowrank",
        ),
    ],
)
def test_choices_that_cannot_work_are_refused(kw, match) -> None:
    with pytest.raises(InvalidArgument, match=match):
        fxcompress.optimize(_net(), 0.55, data=DATA, latency="flops", **kw)


# --------------------------------------------------------------------------- choose itself


def _choose(scores, ratios, limit=0.6):
    trained: list[int] = []
    values = iter(scores)
    picked = choose(
        list(range(len(ratios))),
        ratios,
        limit=limit,
        describe=lambda p: (float(p), 1.0),
        relax=lambda p: nn.Linear(1, 1),
        trial=lambda net, _seen=trained: _seen.append(1),
        score=lambda net: next(values),
    )
    return picked, len(trained)


def test_choose_keeps_the_lowest_score_and_the_first_of_ties() -> None:
    picked, trained = _choose([3.0, 1.0, 1.0, 2.0], [0.5, 0.5, None, 0.6])
    assert (picked.index, trained) == (1, 4)
    assert [t.chosen for t in picked.trials] == [False, True, False, False]


def test_choose_always_tries_the_first_and_skips_slow_runners_up() -> None:
    picked, trained = _choose([5.0, 1.0], [0.9, 0.7, 0.59])
    # plan 0 is tried although slow (the caller already accepted it); plan 1 is not
    assert trained == 2
    assert picked.index == 2
    assert picked.trials[1].score is None


def test_choose_treats_a_nan_score_as_worst() -> None:
    picked, _ = _choose([math.nan, 4.0], [0.5, 0.5])
    assert picked.index == 1
    picked, _ = _choose([1.0, math.nan], [0.5, 0.5])
    assert picked.index == 0
