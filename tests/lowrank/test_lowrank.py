"""End-to-end tests of fxcompress.lowrank.decompose.

References: the original layers (full rank must be exact), the factorised model built here from
per-group truncated SVDs, parameter counts of the returned module, FLOPs counted by
``torch.utils.flop_counter`` and spectral norms of weights read back from the result.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode

from fxcompress.errors import InfeasibleBudget, InvalidArgument
from fxcompress.graph.capture import capture
from fxcompress.lowrank import (
    METHODS,
    ErrorCache,
    GroupedLinear,
    decompose,
    max_rank,
    paying_rank,
)
from fxcompress.lowrank.rewrite import apply, find_sites
from fxcompress.testing import assert_equivalent, models

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


@st.composite
def single_layers(draw):
    """A conv (any kernel/stride/padding/dilation) or a linear layer, its input, and a k."""
    nd = draw(st.integers(0, 3))
    k = draw(st.integers(1, 3))
    c = k * draw(st.integers(1, 3))
    f = draw(st.integers(1, 8))
    bias = draw(st.booleans())
    if nd == 0:
        layer = nn.Linear(c, f, bias=bias)
        lead = draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
        x = torch.randn(*lead, c)
    else:
        kernel = [draw(st.integers(1, 3)) for _ in range(nd)]
        stride = [draw(st.integers(1, 2)) for _ in range(nd)]
        dilation = [draw(st.integers(1, 2)) for _ in range(nd)]
        padding = [draw(st.integers(0, 2)) for _ in range(nd)]
        layer = CONV[nd](c, f, kernel, stride=stride, padding=padding, dilation=dilation, bias=bias)
        size = {1: 9, 2: 7, 3: 5}[nd]
        x = torch.randn(2, c, *[size] * nd)
    seed = draw(st.integers(0, 1000))
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return layer.double().eval(), x.double(), k


def low_rank_weight(w: torch.Tensor, k: int, j: int) -> torch.Tensor:
    """Reference: each group of consecutive input channels replaced by its rank-j SVD."""
    folded = w.reshape(w.shape[0], -1)
    parts = []
    for b in folded.chunk(k, dim=1):
        u, s, vh = torch.linalg.svd(b, full_matrices=False)
        parts.append(u[:, :j] @ torch.diag(s[:j]) @ vh[:j])
    return torch.cat(parts, dim=1).reshape(w.shape)


def run_with_weight(layer: nn.Module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, layer.bias)
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[weight.dim() - 2]
    return fn(x, weight, layer.bias, layer.stride, layer.padding, layer.dilation)


@given(single_layers(), st.integers(1, 9))
def test_rewritten_layer_matches_the_factorised_reference(case, j):
    layer, x, k = case
    j = min(j, max_rank(layer.weight.shape, k))
    model = nn.Sequential(layer)
    gm = capture(model, x)
    (site,), _ = find_sites(gm)
    out = apply(gm, {site.node: (k, j)})
    with torch.no_grad():
        got = out(x)
        want = run_with_weight(layer, low_rank_weight(layer.weight, k, j), x)
        tol = 1e-9 * float(want.abs().max())
        torch.testing.assert_close(got, want, rtol=1e-9, atol=tol)
        if j == max_rank(layer.weight.shape, k):  # full rank: the original layer, exactly
            torch.testing.assert_close(got, layer(x), rtol=1e-9, atol=tol)
    enc = out.get_submodule("0.enc")
    assert getattr(enc, "groups", 1) == k  # a bias-free nn.Linear when k == 1
    if isinstance(enc, nn.modules.conv._ConvNd):
        assert (enc.stride, enc.padding, enc.dilation) == (layer.stride, layer.padding,
                                                           layer.dilation)  # fmt: skip
        assert enc.bias is None
    assert (out.get_submodule("0.dec").bias is None) == (layer.bias is None)


class Net(nn.Module):
    """Conv/BN/ReLU layers, a residual, a depthwise conv, a shared conv and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=2, dilation=2)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.shared = nn.Conv2d(16, 16, 1)
        self.conv3 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(32, 48)
        self.fc2 = nn.Linear(48, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = x + F.relu(self.conv2(x))
        x = self.shared(F.relu(self.shared(self.dw(x))))
        x = F.relu(self.conv3(x)).mean((2, 3))
        return self.fc2(F.relu(self.fc1(x)))


def net() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():  # a decaying spectrum, like trained layers
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight.shape[0] > 1:
                f = m.weight.shape[0]
                m.weight.mul_(torch.logspace(0, -1.5, f).reshape(f, *[1] * (m.weight.dim() - 1)))
        model.bn1.running_mean.uniform_(-0.2, 0.2)
        model.bn1.running_var.uniform_(0.5, 1.5)
    return model.eval(), torch.randn(2, 3, 12, 12)


@pytest.fixture(scope="module")
def cache() -> ErrorCache:
    return ErrorCache()


def flops(model: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("method", ["alds", "uniform", "energy"])
@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.9])
def test_parameter_budget_holds_and_report_is_true(method, fraction, cache):
    model, x = net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = decompose(model, fraction, x, method=method, cache=cache)
    report = gm.meta["fxcompress.lowrank"]
    n_before = sum(p.numel() for p in model.parameters())
    n_after = sum(p.numel() for p in gm.parameters())
    assert n_after <= fraction * n_before
    assert (report.params_before, report.params_after) == (n_before, n_after)
    assert report.after == n_after
    assert not gm.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training
    json.dumps(report.to_dict())
    assert report.to_markdown().startswith("# low-rank decomposition")
    names = {d.name for d in report.layers}
    assert names == {"conv1", "conv2", "conv3", "fc1", "fc2"}
    assert dict(report.skipped) == {
        "dw": "grouped conv (groups=16)",
        "shared": "module shared by 2 call sites",
    }
    for d in report.layers:
        if d.decomposed:
            assert d.params_after < d.params_before
            assert (method == "alds") or d.k == 1


def test_reported_errors_are_the_measured_errors_of_the_result(cache):
    model, x = net()
    gm = decompose(model, 0.4, x, cache=cache)
    report = gm.meta["fxcompress.lowrank"]
    decomposed = [d for d in report.layers if d.decomposed]
    assert decomposed
    for d in decomposed:
        w = model.get_submodule(d.name).weight.detach().double()
        enc = gm.get_submodule(d.name + ".enc").weight.detach().double()
        dec = gm.get_submodule(d.name + ".dec").weight.detach().double()
        f = w.shape[0]
        blocks = enc.reshape(d.k, d.j, -1)  # group i: rows [i*j, (i+1)*j)
        low = dec.reshape(f, d.k * d.j) @ torch.block_diag(*blocks)
        folded = w.reshape(f, -1)
        err = torch.linalg.matrix_norm(folded - low, ord=2) / torch.linalg.matrix_norm(folded, 2)
        assert d.error == pytest.approx(float(err), rel=1e-4, abs=1e-6)
    assert report.max_error == max(d.error for d in decomposed)
    assert report.max_error <= report.level + 1e-12


def test_alds_error_is_no_worse_than_the_baselines(cache):
    """Baseline options are a subset of ALDS's (k = 1, same ranks): min-max can only be lower."""
    model, x = net()
    for fraction in (0.35, 0.5, 0.7):
        errs = {
            m: decompose(model, fraction, x, method=m, cache=cache).meta["fxcompress.lowrank"]
            for m in ("alds", "uniform", "energy")
        }
        assert errs["alds"].max_error <= errs["uniform"].max_error + 1e-12
        assert errs["alds"].max_error <= errs["energy"].max_error + 1e-12


def test_mac_budget_holds_by_an_independent_flop_count(cache):
    model, x = net()
    gm = decompose(model, {"macs": 0.75}, x, cache=cache)
    report = gm.meta["fxcompress.lowrank"]
    # the flop counter counts conv/linear/einsum maths only, which is what MACs count
    assert flops(gm, x) <= 0.75 * flops(model, x)
    assert flops(gm, x) == 2 * report.macs_after
    assert flops(model, x) == 2 * report.macs_before


def test_latency_budget_holds_in_the_analytic_model(cache):
    model, x = net()
    gm = decompose(model, {"latency": 0.7}, x, cache=cache)
    report = gm.meta["fxcompress.lowrank"]
    assert report.metric == "latency"
    assert report.after <= 0.7 * report.before
    assert sum(d.ms_after for d in report.layers) == pytest.approx(report.after)


def test_full_budget_keeps_every_layer_dense_and_the_function(cache):
    model, x = net()
    gm = decompose(model, 1.0, x, cache=cache)
    assert not any(d.decomposed for d in gm.meta["fxcompress.lowrank"].layers)
    assert_equivalent(gm, model, x)


def test_infeasible_budget_names_the_minimum(cache):
    model, x = net()
    with pytest.raises(InfeasibleBudget) as info:
        decompose(model, 0.01, x, cache=cache)
    assert 0.01 < info.value.minimum < 1
    assert "below the smallest reachable" in str(info.value)


@pytest.mark.parametrize(
    ("budget", "match"),
    [
        (1.5, r"budget must be in \(0, 1\] \(a fraction of the parameters to keep\)"),
        (0.0, r"budget must be in \(0, 1\] \(a fraction of the parameters to keep\)"),
        ({"params": 1.5}, "params must be in"),
        ({"params": 0.5, "macs": 0.5}, "exactly one of"),
        ({"flops": 0.5}, "exactly one of"),
        ("half", r"budget must be a number in \(0, 1\] \(a fraction of the parameters"),
    ],
)
def test_bad_budgets_are_rejected(budget, match):
    model, x = net()
    with pytest.raises(InvalidArgument, match=match):
        decompose(model, budget, x)


def test_bad_method_and_latency_are_rejected():
    model, x = net()
    with pytest.raises(InvalidArgument, match="method must be one of"):
        decompose(model, 0.5, x, method="svd")
    with pytest.raises(InvalidArgument, match="latency must be"):
        decompose(model, {"latency": 0.5}, x, latency="fast")
    with pytest.raises(InvalidArgument, match="ranks must be an int >= 2"):
        decompose(model, 0.5, x, ranks=1)


def test_fxcompress_budget_is_a_latency_target(cache):
    import fxcompress

    model, x = net()
    gm = decompose(model, fxcompress.Budget(speedup=1.25), x, cache=cache)
    report = gm.meta["fxcompress.lowrank"]
    assert (report.metric, report.fraction) == ("latency", 0.8)
    assert report.after <= 0.8 * report.before


def test_result_traces_exports_and_matches(cache):
    model, x = net()
    gm = decompose(model, 0.4, x, cache=cache)
    assert_equivalent(fx.symbolic_trace(gm), gm, x)
    exported = torch.export.export(gm, (x,))
    assert_equivalent(exported.module(), gm, x)
    again = capture(gm, x)  # the result is an ordinary model for the other passes
    assert_equivalent(again, gm, x)


def test_linear_with_groups_and_functional_layers():
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(24, 8, 3, 3))
            self.b = nn.Parameter(torch.randn(24))
            self.head = nn.Linear(24, 40)

        def forward(self, x):
            y = F.conv2d(x, self.w, self.b, padding=1).relu().mean((2, 3))
            return self.head(y)

    model = Functional().eval()
    x = torch.randn(3, 8, 6, 6)
    gm = decompose(model, 0.5, x, max_groups=4)
    report = gm.meta["fxcompress.lowrank"]
    kinds = {d.kind: d for d in report.layers}
    assert set(kinds) == {"conv", "linear"}
    assert sum(p.numel() for p in gm.parameters() if p.requires_grad) <= 0.5 * sum(
        p.numel() for p in model.parameters()
    )
    assert kinds["conv"].decomposed  # 1728 of the 2752 weights: the budget needs it
    assert not any(n.op == "get_attr" for n in gm.graph.nodes)  # its weights are gone
    grouped = [m.groups for m in gm.modules() if isinstance(m, GroupedLinear)]
    assert grouped == ([kinds["linear"].k] if kinds["linear"].k > 1 else [])


def test_finetune_hook_trains_the_decomposed_model(cache):
    model, x = net()
    seen = {}

    def finetune(m: fx.GraphModule) -> None:
        seen["type"] = type(m)
        m.train()
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        for _ in range(3):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()

    plain = decompose(model, 0.5, x, cache=cache)
    tuned = decompose(model, 0.5, x, cache=cache, finetune=finetune)
    assert issubclass(seen["type"], fx.GraphModule)
    assert not tuned.training
    assert tuned.meta["fxcompress.lowrank"].finetuned
    with torch.no_grad():
        assert not torch.allclose(tuned(x), plain(x))
        assert tuned(x).square().mean() < plain(x).square().mean()


def test_decompose_leaves_global_state_alone(cache):
    model, x = net()
    threads = torch.get_num_threads()
    rng = torch.random.get_rng_state()
    copy_before = copy.deepcopy(model)
    model.train()  # a model in training mode stays so (the result is in eval mode)
    gm = decompose(model, 0.5, x, cache=cache)
    assert model.training
    assert not gm.training
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert_equivalent(model.eval(), copy_before, x)


def test_paying_rank_bounds_every_decomposition(cache):
    model, x = net()
    report = decompose(model, 0.3, x, cache=cache).meta["fxcompress.lowrank"]
    for d in report.layers:
        if d.decomposed:
            assert 1 <= d.j <= paying_rank(d.weight_shape, d.k)
            assert math.isfinite(d.error)


@pytest.mark.slow
def test_result_exports_to_onnx(cache):
    import tempfile

    import onnxruntime as ort  # the "export" extra

    model, x = net()
    gm = decompose(model, 0.4, x, cache=cache)
    with tempfile.TemporaryDirectory() as d:
        path = f"{d}/m.onnx"
        torch.onnx.export(gm, (x,), path, dynamo=True)
        sess = ort.InferenceSession(path)
        (out,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), gm(x).detach(), rtol=1e-4, atol=1e-5)


def test_excluded_layers_stay_dense_and_are_reported(cache):
    model, x = net()
    gm = decompose(model, 0.8, x, cache=cache, exclude=("fc1", "conv3"))
    report = gm.meta["fxcompress.lowrank"]
    assert {d.name for d in report.layers} == {"conv1", "conv2", "fc2"}
    assert ("fc1", "excluded by the caller") in report.skipped
    assert isinstance(gm.get_submodule("conv3"), nn.Conv2d)
    assert isinstance(gm.get_submodule("fc1"), nn.Linear)


def test_measured_latency_budget_uses_the_table():
    from fxcompress.latency import LatencyTable, analytic_ms

    priced = []

    class Recording(LatencyTable):
        """A "measured" table with deterministic (analytic) values that records what it prices."""

        @property
        def mode(self) -> str:
            return "measure"

        def __call__(self, op):
            priced.append(op)
            return analytic_ms(op)

    model = nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3)).eval()
    x = torch.randn(1, 8, 16, 16)
    table = Recording(mode="flops")
    gm = decompose(model, {"latency": 0.99}, x, latency=table, max_groups=1, ranks=2)
    report = gm.meta["fxcompress.lowrank"]
    assert report.metric == "latency"
    assert priced  # the candidates were priced by the table given
    assert report.after <= 0.99 * report.before
    for d in report.layers:
        assert d.ms_before is not None
        assert d.ms_after is not None


@settings(max_examples=40)  # each example captures and rewrites a whole model
@given(models(dtype=torch.float64), st.sampled_from([0.3, 0.6, 0.95]), st.sampled_from(METHODS))
def test_random_models_keep_the_budget_and_match_the_factorised_reference(case, fraction, method):
    """decompose checks the result against the factorised reference itself (RewriteError)."""
    model, x = case
    try:
        gm = decompose(model, fraction, x, method=method)
    except InfeasibleBudget as exc:
        minimum = exc.minimum
        gm = None
    if gm is None:
        assert minimum > fraction
        return
    report = gm.meta["fxcompress.lowrank"]
    assert sum(p.numel() for p in gm.parameters()) == report.params_after
    assert report.params_after <= fraction * sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        assert gm(x).shape == model(x).shape
    decomposed = {d.name for d in report.layers if d.decomposed}
    if not decomposed:
        assert_equivalent(gm, model, x)
