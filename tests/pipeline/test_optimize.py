"""End-to-end depth compression under a budget (issue: latency-budgeted depth compression)."""

from __future__ import annotations

import itertools
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torchvision
from torch import fx, nn

import fxcompress
from fxcompress.depth import planner
from fxcompress.depth.importance import Calibration, score_candidates
from fxcompress.depth.options import enumerate_options
from fxcompress.meta import PLAN
from fxcompress.pipeline import Prepared, make_plan, prepare_problem
from fxcompress.pipeline.measure import Measure
from fxcompress.pipeline.problem import solve_ms
from fxcompress.testing import assert_equivalent


class Net(nn.Module):
    """A small residual CNN with a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b1 = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
        )
        self.b2 = nn.Sequential(
            nn.Conv2d(8, 16, 1),
            nn.BatchNorm2d(16),
            nn.ReLU6(),
            nn.Conv2d(16, 16, 3, padding=1, groups=16),
            nn.BatchNorm2d(16),
            nn.ReLU6(),
            nn.Conv2d(16, 8, 1),
            nn.BatchNorm2d(8),
        )
        self.tail = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
        )
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.b1(x))
        x = x + self.b2(x)
        x = self.tail(x)
        return self.head(x.mean(dim=(2, 3)))


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = Net().eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return net


X = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_budget_is_met_and_model_untouched() -> None:
    net = _net().train()
    before = _state(net)
    out = fxcompress.optimize(net, 0.6, example_inputs=X, latency="flops")
    report = out.meta["fxcompress"]
    assert report.predicted_ms <= 0.6 * report.original_ms
    assert any(d["key"] != "keep" for d in report.decisions)
    assert net.training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert isinstance(out, fx.GraphModule)
    json.dumps(report.to_dict())
    assert "fxcompress report" in report.to_markdown()


def test_result_equals_relaxed_model() -> None:
    net = _net()
    plan = make_plan(net, 0.5, X, latency="flops")
    relaxed = fxcompress.relax(net, plan)
    out = fxcompress.optimize(net, 0.5, example_inputs=X, latency="flops")
    with torch.no_grad():
        ref = relaxed(X)
        assert float((out(X) - ref).abs().max() / ref.abs().max()) <= 1e-4


def test_plan_is_deterministic() -> None:
    a = make_plan(_net(), 0.6, X, latency="flops")
    b = make_plan(_net(), 0.6, X, latency="flops")
    assert a.to_json() == b.to_json()
    assert fxcompress.Plan.from_json(a.to_json()) == a


def test_infeasible_budget_names_the_minimum() -> None:
    with pytest.raises(fxcompress.InfeasibleBudget) as info:
        fxcompress.optimize(_net(), 0.01, example_inputs=X, latency="flops")
    assert 0.01 < info.value.minimum <= 1.0
    assert f"{info.value.minimum:.3g}" in str(info.value)


def test_damage_non_increasing_and_latency_within_budget() -> None:
    prep = prepare_problem(_net(), 0.9, X, latency="flops")
    low = planner.min_latency(prep.problem)
    previous = float("inf")
    for fraction in [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]:
        target = fraction * prep.original
        if target < low:
            continue
        plan = solve_ms(prep, target)
        assert plan.predicted_ms <= target
        assert plan.damage <= previous + 1e-12
        previous = plan.damage
    # the Pareto front of one pass: latency up, damage down
    front = plan.front
    assert all(a[0] <= b[0] and a[1] >= b[1] for a, b in itertools.pairwise(front))


def test_finetune_hook_trains_the_relaxed_model() -> None:
    seen: list[fx.GraphModule] = []

    def finetune(relaxed: fx.GraphModule) -> None:
        seen.append(relaxed)
        with torch.no_grad():
            for p in relaxed.parameters():
                p.mul_(1.01)

    out = fxcompress.optimize(_net(), 0.6, example_inputs=X, latency="flops", finetune=finetune)
    assert len(seen) == 1
    relaxed = seen[0].eval()
    with torch.no_grad():
        ref = relaxed(X)
        assert float((out(X) - ref).abs().max() / ref.abs().max()) <= 1e-4
    acts = [
        n
        for n in relaxed.graph.nodes
        if n.op == "call_function"
        and n.target in (torch.nn.functional.relu, torch.nn.functional.relu6)
    ]
    original_acts = 6
    assert len(acts) < original_acts


def test_task_loss_importance() -> None:
    g = torch.Generator().manual_seed(3)
    data = [
        (torch.randn(4, 3, 12, 12, generator=g), torch.randint(0, 5, (4,), generator=g))
        for _ in range(2)
    ]
    plan = make_plan(_net(), 0.6, data=data, loss_fn=nn.functional.cross_entropy, latency="flops")
    assert plan.input_shapes == (((4, 3, 12, 12), "float32"),)
    assert plan.damage >= 0


def test_merge_only_method_never_prunes() -> None:
    plan = make_plan(_net(), 0.6, X, latency="flops", methods=("merge",))
    assert all("prune" not in key for _, _, _, key, _ in plan.segments)


def _scoring_setup():
    net = _net()
    gm = fxcompress.canonicalize(fxcompress.capture(net, X))
    analysis = fxcompress.analyze(gm)
    cands = [o.segment for o in enumerate_options(analysis, prune=True) if o.needs_score]
    return gm, analysis, cands, Calibration([(X,)], [None])


def test_executor_gives_the_same_scores() -> None:
    gm, analysis, cands, calib = _scoring_setup()
    local = score_candidates(gm, analysis, cands, calib)
    with ThreadPoolExecutor(2) as pool:
        remote = score_candidates(gm, analysis, cands, calib, executor=pool)
    assert local.keys() == remote.keys()
    for k in local:
        assert remote[k] == pytest.approx(local[k], rel=1e-5, abs=1e-12)


def test_dask_distributed_executor() -> None:
    import distributed  # the dev extra installs it (for users it is the optional "dask" extra)

    gm, analysis, cands, calib = _scoring_setup()
    local = score_candidates(gm, analysis, cands[:6], calib)
    # a real local cluster: worker processes, one thread each (unpickling a GraphModule re-runs
    # torch.fx's tracer, which is not thread-safe)
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        remote = score_candidates(gm, analysis, cands[:6], calib, executor=client.get_executor())
    for k in local:
        assert remote[k] == pytest.approx(local[k], rel=1e-5, abs=1e-12)


def test_scoring_resumes_from_checkpoint(tmp_path, monkeypatch) -> None:
    gm, analysis, cands, calib = _scoring_setup()
    path = tmp_path / "scores.json"
    first = score_candidates(gm, analysis, cands, calib, checkpoint=path)
    import fxcompress.depth.importance as imp

    def boom(*args, **kwargs):
        raise AssertionError("a finished candidate was scored again")

    monkeypatch.setattr(imp._Scorer, "damage", boom)
    again = score_candidates(gm, analysis, cands, calib, checkpoint=path)
    assert again == first


def test_checkpoint_of_another_model_or_data_is_not_used(tmp_path, caplog) -> None:
    gm, analysis, cands, calib = _scoring_setup()
    path = tmp_path / "scores.json"
    # a checkpoint written for other calibration data, with deliberately wrong scores
    other = Calibration([(torch.randn_like(X),)], [None])
    stale = score_candidates(gm, analysis, cands[:3], other, checkpoint=path)
    data = json.loads(path.read_text())
    data["scores"] = {k: 1e6 + i for i, k in enumerate(stale)}
    path.write_text(json.dumps(data))
    fresh = score_candidates(gm, analysis, cands[:3], calib)
    with caplog.at_level("WARNING", logger="fxcompress"):
        got = score_candidates(gm, analysis, cands[:3], calib, checkpoint=path)
    assert got == pytest.approx(fresh, rel=1e-6, abs=1e-12)
    assert "made for another model" in caplog.text
    # ... and the file now holds this model's scores
    assert json.loads(path.read_text())["scores"] == pytest.approx(fresh, rel=1e-6, abs=1e-12)


def test_cache_dir_keeps_scores_for_the_next_run(tmp_path, monkeypatch) -> None:
    net = _net()
    kw = {"example_inputs": X, "latency": "flops", "cache_dir": str(tmp_path), "progress": False}
    first = fxcompress.make_plan(net, 0.6, **kw)
    assert len(list(tmp_path.glob("importance-*.json"))) == 1
    import fxcompress.depth.importance as imp

    def boom(*args, **kwargs):
        raise AssertionError("a cached candidate was scored again")

    monkeypatch.setattr(imp._Scorer, "damage", boom)
    assert fxcompress.make_plan(net, 0.6, **kw).to_json() == first.to_json()
    # optimize finds the same scores through its cache_dir
    fxcompress.optimize(net, 0.6, **kw)
    # a plain-function loss is not cached implicitly (its name does not pin what it computes)
    monkeypatch.undo()
    data = [(X, torch.zeros(X.shape[0], 5))]
    fxcompress.make_plan(net, 0.6, data=data, loss_fn=lambda o, t: ((o - t) ** 2).mean(), **kw)
    assert len(list(tmp_path.glob("importance-*.json"))) == 1


def test_candidate_finetune_mode_calls_back_per_candidate() -> None:
    gm, analysis, cands, calib = _scoring_setup()
    calls: list[fx.GraphModule] = []
    scores = score_candidates(gm, analysis, cands[:4], calib, candidate_finetune=calls.append)
    assert len(calls) == 4
    assert all(v >= 0 for v in scores.values())


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_relax_merge_exact_and_identity(name: str) -> None:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, 32, 32)
    out = fxcompress.optimize(model, 0.7, example_inputs=x, latency="flops")  # check=True
    assert out.meta["fxcompress"].max_rel_error <= 1e-4
    same = fxcompress.optimize(model, 1.0, example_inputs=x, latency="flops")
    with torch.no_grad():
        ref = model(x)
        assert float((same(x) - ref).abs().max() / ref.abs().max()) <= 1e-4


def test_measured_latency_closed_loop_reports_measurements(tmp_path) -> None:
    table = fxcompress.LatencyTable(mode="measure", repeats=3, warmup=1, cache_dir=tmp_path)
    net = _net()
    minimum = None
    try:
        out = fxcompress.optimize(net, 0.9, example_inputs=X, latency=table, max_replans=1)
    except fxcompress.InfeasibleBudget as exc:  # timing-dependent; the message must say why
        minimum = exc.minimum
    if minimum is not None:
        assert minimum > 0.9
        return
    report = out.meta["fxcompress"]
    assert report.latency_mode == "measure"
    assert report.original_ms > 0
    assert report.final_ms is not None
    assert report.ratio is not None
    assert len(report.replans) <= 1
    # the contract is on the measurement; a re-plan after a result measured faster than needed may
    # ask the table for more than the budget (timing-dependent: found failing in CI)
    assert report.ratio <= 1.05 * 0.9
    if not report.replans or report.replans[0]["direction"] == "tighter":
        assert report.predicted_ms <= 0.9 * report.original_ms + 1e-9
    assert list(tmp_path.glob("latency-*.json")), "the measured table was cached on disk"


class _PredictingTable(fxcompress.LatencyTable):
    """A "measured" table whose op latencies are the analytic model's: deterministic plans."""

    @property
    def mode(self) -> str:
        return "measure"

    def __call__(self, op):
        from fxcompress.latency.analytic import analytic_ms

        return analytic_ms(op)


def _fake_timing(ratio_of) -> tuple[Measure, list[float]]:
    """A whole-network "measurement" giving ``ratio_of(original, result)`` (optimize's
    ``measure=``), and the ratios it gave."""
    seen: list[float] = []

    def measure(a, b, inputs):
        r = ratio_of(a, b)
        seen.append(r)
        return 10.0, 10.0 * r

    return measure, seen


def test_closed_loop_raises_with_the_fastest_model_when_measurements_never_fit(tmp_path) -> None:
    table = fxcompress.LatencyTable(mode="measure", repeats=2, warmup=0, cache_dir=tmp_path)
    measure, seen = _fake_timing(lambda a, b: 0.99)
    with pytest.raises(fxcompress.InfeasibleBudget, match="missed on measurement") as info:
        fxcompress.optimize(
            _net(), 0.8, example_inputs=X, latency=table, max_replans=2, measure=measure
        )
    assert info.value.minimum == pytest.approx(0.99)
    assert isinstance(info.value.result, fx.GraphModule)
    assert info.value.result(X).shape == _net()(X).shape
    assert 2 <= len(seen) <= 1 + 1 + 2  # make_plan's baseline pair + at most 1 + max_replans


def test_a_measured_miss_still_fine_tunes_the_fastest_model(tmp_path) -> None:
    table = fxcompress.LatencyTable(mode="measure", repeats=2, warmup=0, cache_dir=tmp_path)
    measure, _ = _fake_timing(lambda a, b: 0.99)
    tuned = []

    def finetune(relaxed: fx.GraphModule) -> None:
        tuned.append(relaxed)
        with torch.no_grad():
            for p in relaxed.parameters():
                p.mul_(0.5)  # a visible change the merged result must carry

    with pytest.raises(fxcompress.InfeasibleBudget, match="missed on measurement") as info:
        fxcompress.optimize(
            _net(),
            0.8,
            example_inputs=X,
            latency=table,
            max_replans=1,
            finetune=finetune,
            measure=measure,
        )
    (relaxed,) = tuned
    assert not relaxed.training
    # the exception's model is the merge of the fine-tuned relaxed model, not the untuned one
    assert_equivalent(info.value.result, relaxed, X)
    assert "finetune" in info.value.result.meta["fxcompress"].stage_seconds


def test_closed_loop_replans_until_the_measurement_fits() -> None:
    def layers(gm):
        return sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in gm.modules())

    def macs_ratio(a, b):  # a stand-in "measurement" the table does not predict
        return 1.2 * layers(b) / layers(a)

    table = _PredictingTable(mode="flops")
    measure, seen = _fake_timing(macs_ratio)
    budget = 0.85  # the first plan measures far from the budget
    out = fxcompress.optimize(
        _net(), budget, example_inputs=X, latency=table, max_replans=3, measure=measure
    )
    report = out.meta["fxcompress"]
    assert report.ratio <= 1.05 * budget
    assert report.ratio == pytest.approx(macs_ratio(fxcompress.capture(_net(), X), out))
    assert report.replans
    assert len(report.replans) == len(seen) - 2  # one baseline pair, then one per attempt


def test_optimize_lowrank_method_meets_a_parameter_budget() -> None:
    net = _net()
    out = fxcompress.optimize(
        net,
        fxcompress.Budget(params=0.6),
        example_inputs=X,
        methods=("lowrank",),
        latency="flops",
        progress=False,
    )
    report = out.meta["fxcompress"]
    params = sum(p.numel() for p in net.parameters())
    assert report.params_before == params
    assert report.params_after == sum(p.numel() for p in out.parameters())
    assert report.params_after <= 0.6 * params
    assert report.events[0]["kind"] == "lowrank"
    assert out(X).shape == net(X).shape


@pytest.mark.parametrize(
    ("methods", "budget", "match"),
    [
        (("lowrank", "merge"), 0.5, "runs on its own"),
        (("merge",), fxcompress.Budget(params=0.5), "only methods=\\('lowrank',\\)"),
        (("prune", "merge"), fxcompress.Budget(macs=0.5), "depth compression takes a latency"),
    ],
)
def test_methods_and_budget_kinds_that_do_not_fit_are_named(methods, budget, match) -> None:
    with pytest.raises(fxcompress.InvalidArgument, match=match):
        fxcompress.optimize(_net(), budget, example_inputs=X, methods=methods, latency="flops")


def test_calibration_batches_of_another_shape_are_named() -> None:
    data = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 12, 16)]
    with pytest.raises(fxcompress.InvalidArgument, match=r"data batch 1, input 0 has shape"):
        fxcompress.make_plan(
            _net(), 0.6, example_inputs=torch.randn(1, 3, 16, 16), data=data, latency="flops"
        )


def _measured_by_plan(ratio_of_plan) -> tuple[Measure, list[fxcompress.Plan]]:
    """Fake timing: a plan's result measures ``ratio_of_plan(plan)``; returns the measurement
    and the plans it measured, in order."""
    measured: list[fxcompress.Plan] = []

    def ratio(original, result):
        if PLAN not in result.meta:
            return 1.0  # make_plan's baseline pair (original vs exactly merged)
        measured.append(fxcompress.Plan.from_dict(result.meta[PLAN]))  # set by relax
        return ratio_of_plan(measured[-1])

    measure, _ = _fake_timing(ratio)
    return measure, measured


@pytest.fixture(scope="module")
def scores_dir(tmp_path_factory) -> str:
    """One importance cache for the closed-loop tests below: the net is scored once."""
    return str(tmp_path_factory.mktemp("scores"))


@pytest.fixture(scope="module")
def every_plan(scores_dir) -> tuple[Prepared, list[tuple[float, fxcompress.Plan]]]:
    """Brute force over budgets: the distinct plans of ``_net`` with ``_PredictingTable`` (timed as
    by ``_measured_by_plan``), each with the lowest budget fraction on a fine grid giving it."""
    measure, _ = _fake_timing(lambda a, b: 1.0)
    table = _PredictingTable(mode="flops")
    prep = prepare_problem(_net(), 0.9, X, latency=table, cache_dir=scores_dir, measure=measure)
    low = planner.min_latency(prep.problem)
    found: dict[tuple, tuple[float, fxcompress.Plan]] = {}
    for i in range(401):
        target = low + (prep.original - low) * i / 400
        plan = solve_ms(prep, target)
        found.setdefault(plan.segments, (target / prep.original, plan))
    return prep, sorted(found.values(), key=lambda fp: fp[0])


def _optimize_measured(
    budget: float, cache_dir: str, max_replans: int, measure: Measure
) -> fxcompress.Report:
    table = _PredictingTable(mode="flops")
    out = fxcompress.optimize(
        _net(),
        budget,
        example_inputs=X,
        latency=table,
        cache_dir=cache_dir,
        max_replans=max_replans,
        progress=False,
        measure=measure,
    )
    return out.meta["fxcompress"]


def _in_band(ratio: float, budget: float) -> bool:
    return 0.85 * budget <= ratio <= 1.05 * budget


@pytest.mark.parametrize("budget", [0.3, 0.5])
def test_closed_loop_loosens_when_every_plan_measures_faster_than_predicted(
    budget, every_plan, scores_dir
) -> None:
    _, plans = every_plan

    def fast(plan: fxcompress.Plan) -> float:
        return 0.6 * plan.predicted_ms / plan.original_ms

    measure, measured = _measured_by_plan(fast)
    report = _optimize_measured(budget, scores_dir, max_replans=3, measure=measure)
    assert fast(measured[0]) < 0.85 * budget  # the first plan measures below the band
    assert report.replans[0]["direction"] == "looser"
    assert len(report.replans) == len(measured) - 1
    assert len({p.segments for p in measured}) == len(measured), "a plan was measured twice"
    assert _in_band(report.ratio, budget) or len(measured) == 3 + 1
    if any(_in_band(fast(p), budget) for _, p in plans):
        assert _in_band(report.ratio, budget)


def test_closed_loop_steps_past_a_plan_already_measured(every_plan, scores_dir):
    prep, plans = every_plan
    grid = (1 - planner.min_latency(prep.problem) / prep.original) / 400
    # the widest stretch of budgets giving one plan (not the fastest plan: its budget is the
    # lowest reachable, where rounding may make the goal infeasible)
    (goal, first), (after, _) = max(
        itertools.pairwise(plans[1:]), key=lambda pair: pair[1][0] / pair[0][0]
    )
    predicted = first.predicted_ms / first.original_ms
    # every plan measures k x its predicted ratio, k such that the first plan measures below the
    # band, and that the secant's looser budget, goal * 0.96 goal / (k predicted), stays in the
    # stretch: the DP answers it with the plan just measured
    secant = (1.13 * goal + after - grid) / 2
    k = 0.96 * goal * goal / (predicted * secant)
    assert 1.13 * goal < after - grid
    assert k * predicted < 0.85 * goal
    assert solve_ms(prep, secant * prep.original).segments == first.segments

    def fast(plan: fxcompress.Plan) -> float:
        return k * plan.predicted_ms / plan.original_ms

    measure, measured = _measured_by_plan(fast)
    report = _optimize_measured(goal, scores_dir, max_replans=3, measure=measure)
    assert measured[0].segments == first.segments
    # the loop used to stop here, returning the plan measured below the band
    assert len(measured) >= 2
    assert report.replans[0]["how"] == "step"
    assert report.replans[0]["repeats"] >= 1
    assert report.replans[0]["direction"] == "looser"
    assert report.replans[0]["new_budget_ms"] > secant * prep.original
    assert len(report.replans) == len(measured) - 1
    assert len({p.segments for p in measured}) == len(measured), "a plan was measured twice"
    assert any(_in_band(fast(p), goal) for _, p in plans)
    assert _in_band(report.ratio, goal)
    assert report.to_dict()["replans"] == json.loads(report.to_json())["replans"]


def test_closed_loop_bisects_when_the_measured_curve_jumps_across_the_band(
    every_plan, scores_dir
) -> None:
    _, plans = every_plan
    # Plan i is the only one measured in the band; those before it measure 0.8 x goal (too fast),
    # those after 2 x goal (too slow). The goal is plan i-1's lowest budget, so the secant from
    # its measurement aims at 1.2 x goal, past plan i+1: the measurement jumps across the band.
    candidates = [
        j
        for j in range(2, len(plans) - 1)
        if plans[j + 1][0] < 1.19 * plans[j - 1][0] and plans[j][1].damage < plans[j - 1][1].damage
    ]
    assert candidates
    # the band plan's stretch of budgets narrowest relative to its neighbour's: hardest to hit
    i = max(candidates, key=lambda j: plans[j][0] / plans[j - 1][0])
    goal = plans[i - 1][0]
    start, stop = plans[i][1].predicted_ms, plans[i + 1][1].predicted_ms

    def step_like(plan: fxcompress.Plan) -> float:
        if plan.predicted_ms < start:
            return 0.8 * goal
        return goal if plan.predicted_ms < stop else 2 * goal

    measure, measured = _measured_by_plan(step_like)
    report = _optimize_measured(goal, scores_dir, max_replans=4, measure=measure)
    ratios = [step_like(p) for p in measured]
    assert ratios[:2] == [0.8 * goal, 2 * goal]  # below the band, then above it
    hows = [r["how"] for r in report.replans]
    assert hows[0] == "secant"
    assert len(hows) >= 2
    assert set(hows[1:]) == {"bisect"}
    assert len({p.segments for p in measured}) == len(measured), "a plan was measured twice"
    assert any(_in_band(step_like(p), goal) for _, p in plans)  # brute force: a plan fits
    assert _in_band(report.ratio, goal)
    assert report.damage == plans[i][1].damage


def test_a_checkpoint_that_cannot_be_written_warns_and_scoring_goes_on(tmp_path, caplog) -> None:
    gm, analysis, cands, calib = _scoring_setup()
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the checkpoint's folder should be")
    expected = score_candidates(gm, analysis, cands[:3], calib)
    with caplog.at_level("WARNING", logger="fxcompress.importance"):
        got = score_candidates(gm, analysis, cands[:3], calib, checkpoint=blocker / "s.json")
    assert got == expected
    assert sum("cannot write importance checkpoint" in r.message for r in caplog.records) == 1


def test_a_checkpoint_holds_every_score_when_scoring_ends(tmp_path) -> None:
    gm, analysis, cands, calib = _scoring_setup()
    path = tmp_path / "scores.json"
    got = score_candidates(gm, analysis, cands, calib, checkpoint=path)
    assert json.loads(path.read_text())["scores"] == dict(sorted(got.items()))
