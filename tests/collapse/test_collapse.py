"""Tests of fxcompress.collapse (LayerCollapse).

References are independent of the Blend machinery: the original model run eagerly with the
linearised activations swapped for ``nn.Identity`` (for exactness), the activation functions
themselves (for the blend and the bound), and brute force over all partitions (for the choice
of which layers to merge).
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from fxcompress import InvalidArgument, collapse
from fxcompress.collapse.maths import Blend, Cost, best_partition, spectral_norm
from fxcompress.testing import assert_equivalent, linear_chains

BNS = (nn.BatchNorm1d, nn.BatchNorm2d)
ACTS = (nn.ReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish, lambda: nn.LeakyReLU(0.2), nn.ReLU6,
        nn.ELU, nn.Tanh)


def identity_reference(model: nn.Sequential, firsts: set[str]) -> nn.Sequential:
    """``model`` with the activation after each layer named in ``firsts`` replaced by Identity."""
    ref = copy.deepcopy(model)
    for name in firsts:
        i = int(name)
        j = next(k for k in range(i + 1, len(ref)) if not isinstance(ref[k], (nn.Linear, BNS)))
        ref[j] = nn.Identity()
    return ref


def params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def set_slopes(prepared: nn.Module, values: dict[str, float]) -> None:
    with torch.no_grad():
        for name, v in values.items():
            prepared.get_submodule(name).slope.fill_(v)


# --------------------------------------------------------------------------- the blend


@given(
    act=st.sampled_from(("relu", "gelu", "silu", "hardswish", "mish", "elu", "tanh", "relu6")),
    slope=st.floats(-1.0, 2.0),
)
def test_blend_is_the_activation_at_0_and_the_identity_at_1(act: str, slope: float) -> None:
    x = torch.linspace(-8, 8, 101, dtype=torch.float64)
    fn = getattr(F, act) if hasattr(F, act) else getattr(torch, act)
    with torch.no_grad():
        assert torch.equal(Blend(act, dtype=torch.float64)(x), fn(x))
        assert torch.equal(Blend(act, slope=1.0, dtype=torch.float64)(x), x)
        mixed = Blend(act, slope=slope, dtype=torch.float64)(x)
        torch.testing.assert_close(mixed, (1 - slope) * fn(x) + slope * x)
        # |blend(x) - x| <= |1 - a| |x|: the premise of the reported error bound
        assert bool(((mixed - x).abs() <= abs(1 - slope) * x.abs() + 1e-12).all())


def test_relu_blend_is_prelu() -> None:
    x = torch.randn(50)
    with torch.no_grad():
        torch.testing.assert_close(Blend("relu", slope=0.3)(x), F.prelu(x, torch.tensor([0.3])))


# --------------------------------------------------------------------------- prepare


@given(linear_chains(min_layers=2, max_layers=4, dtype=torch.float64))
def test_prepare_computes_the_original_function_and_leaves_the_model_alone(case) -> None:
    model, x = case
    model.train()  # the prepared copy takes the caller's training flag
    before = copy.deepcopy(model.state_dict())
    prepared = collapse.prepare(model, x, sites="all")
    assert prepared.training
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    model.eval()
    assert_equivalent(prepared, model, x)
    n_sites = len(prepared.meta["fxcompress.collapse.sites"])
    assert len(collapse.slopes(prepared)) == n_sites


def test_default_sites_are_those_that_shrink_and_names_resolve() -> None:
    wide = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 16), nn.ReLU(),
                         nn.Linear(16, 4), nn.GELU(), nn.Linear(4, 16))
    x = torch.randn(3, 16)
    names = [s.name for s in collapse.prepare(wide, x).meta["fxcompress.collapse.sites"]]
    # 16-64-16 shrinks (64 > 16*16/32 = 8); 64-16-4: 16 > 64*4/68 = 3.8 shrinks; 16-4-16 does not
    assert names == ["0_act", "2_act"]
    every = collapse.prepare(wide, x, sites="all").meta["fxcompress.collapse.sites"]
    assert [s.name for s in every] == ["0_act", "2_act", "4_act"]
    assert [s.saving for s in every] == [16 * 64 + 64 * 16 + 64 - 16 * 16,
                                         64 * 16 + 16 * 4 + 16 - 64 * 4,
                                         16 * 4 + 4 * 16 + 4 - 16 * 16]
    picked = collapse.prepare(wide, x, sites=["4", "0_act"])
    assert list(collapse.slopes(picked)) == ["0_act", "4_act"]
    with pytest.raises(InvalidArgument, match=r"\['6'\] are not collapse sites"):
        collapse.prepare(wide, x, sites=["6"])


def test_tapped_shared_and_non_pointwise_sites_are_skipped() -> None:
    class Tapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 32), nn.Linear(32, 8)
            self.c = nn.Linear(32, 8)

        def forward(self, x):
            h = F.relu(self.a(x))
            return self.b(h) + self.c(h)  # the hidden tensor is read twice

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 32), nn.Linear(32, 8)

        def forward(self, x):
            return self.b(F.relu(self.a(x))) + self.b(F.relu(self.a(x + 1)))

    conv = nn.Sequential(nn.Conv2d(3, 16, 1), nn.ReLU(), nn.Conv2d(16, 3, 3))  # 3x3 after
    for model, x in ((Tapped(), torch.randn(2, 8)), (Shared(), torch.randn(2, 8)),
                     (conv, torch.randn(1, 3, 6, 6))):
        prepared = collapse.prepare(model, x, sites="all")
        assert prepared.meta["fxcompress.collapse.sites"] == ()
        assert_equivalent(prepared, model.eval(), x)


# --------------------------------------------------------------------------- apply: exactness


@given(linear_chains(min_layers=2, max_layers=5, dtype=torch.float64), st.data())
def test_collapse_at_slope_1_is_exact(case, data) -> None:
    model, x = case
    prepared = collapse.prepare(model, x, sites="all")
    names = list(collapse.slopes(prepared))
    chosen = data.draw(st.sets(st.sampled_from(names)) if names else st.just(set()))
    set_slopes(prepared, dict.fromkeys(chosen, 1.0))
    out = collapse.apply(prepared, tol=0.0)
    ref = identity_reference(model, {n[: -len("_act")] for n in chosen})
    assert_equivalent(out, ref, x, rtol=1e-9)
    report = out.meta["fxcompress.collapse"]
    assert {d.name for d in report.sites if d.action != "kept"} == chosen
    assert all(d.bound == 0.0 for d in report.sites)
    assert params(out) <= params(prepared) - len(names)  # never larger (slopes are gone)
    assert report.params_after == params(out)
    torch.export.export(out, (x,))


def test_unchanged_sites_come_back_as_their_activation() -> None:
    model = nn.Sequential(nn.Linear(4, 32), nn.LeakyReLU(0.2), nn.Linear(32, 32), nn.GELU(),
                          nn.Linear(32, 4)).eval()
    x = torch.randn(5, 4)
    out = collapse.apply(collapse.prepare(model, x), tol=0.05)
    assert [d.action for d in out.meta["fxcompress.collapse"].sites] == ["kept", "kept"]
    assert_equivalent(out, model, x)
    assert not any(isinstance(m, Blend) for m in out.modules())


def test_kept_blends_stay_exact() -> None:
    model = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 32), nn.SiLU(),
                          nn.Linear(32, 4)).eval()
    x = torch.randn(5, 4)
    prepared = collapse.prepare(model, x)
    set_slopes(prepared, {"0_act": 0.4, "2_act": 0.7})
    prepared.train()
    before = copy.deepcopy(prepared.state_dict())
    out = collapse.apply(prepared, tol=0.05)
    assert prepared.training  # apply works on a copy
    assert not out.training
    for k, v in prepared.state_dict().items():
        assert torch.equal(v, before[k])
    assert_equivalent(out, prepared, x)
    ref = copy.deepcopy(model)
    ref[1] = nn.LeakyReLU(0.4)  # a ReLU blend is a leaky ReLU
    ref[3] = Blend("silu", slope=0.7)
    assert_equivalent(out, ref, x)


def conv_site_model(draw) -> tuple[nn.Module, torch.Tensor]:
    c0, c1, c2, c3 = (draw(st.integers(1, 6)) for _ in range(4))
    k = draw(st.sampled_from((1, 3)))
    layers = [nn.Conv2d(c0, c1, k, stride=draw(st.integers(1, 2)), padding=k // 2,
                        bias=draw(st.booleans()))]
    if draw(st.booleans()):
        layers.append(nn.BatchNorm2d(c1))
    layers += [draw(st.sampled_from(ACTS))(), nn.Conv2d(c1, c2, 1, stride=draw(st.integers(1, 2)))]
    if draw(st.booleans()):
        layers.append(nn.BatchNorm2d(c2))
    layers += [draw(st.sampled_from(ACTS))(), nn.Conv2d(c2, c3, 1)]
    model = nn.Sequential(*layers).double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(-2, 2)
                m.bias.uniform_(-1, 1)
    return model.eval(), torch.randn(2, c0, 7, 7, dtype=torch.float64)


@given(st.data())
def test_conv_chain_collapse_at_slope_1_is_exact(data) -> None:
    model, x = conv_site_model(data.draw)
    prepared = collapse.prepare(model, x, sites="all")
    names = list(collapse.slopes(prepared))
    assert len(names) == 2  # conv -> act -> 1x1 conv, twice
    chosen = data.draw(st.sets(st.sampled_from(names)))
    set_slopes(prepared, dict.fromkeys(chosen, 1.0))
    out = collapse.apply(prepared, tol=0.0)
    ref = copy.deepcopy(model)
    acts = [i for i, m in enumerate(ref) if not isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    convs = [i for i, m in enumerate(ref) if isinstance(m, nn.Conv2d)]
    for name in chosen:
        first = int(name[: -len("_act")])
        ref[acts[convs.index(first)]] = nn.Identity()
    assert_equivalent(out, ref, x, rtol=1e-9)
    torch.export.export(out, (x,))


# --------------------------------------------------------------------------- apply: size


def brute_force_partition(costs, merged):
    n = len(costs)
    best = None
    for cuts in itertools.product((False, True), repeat=n - 1):
        runs, start = [], 0
        for i, cut in enumerate(cuts):
            if cut:
                runs.append((start, i))
                start = i + 1
        runs.append((start, n - 1))
        total, ok = 0, True
        for i, j in runs:
            if i == j:
                total += costs[i].params
                continue
            apart = sum((costs[k] for k in range(i, j + 1)), Cost(0, 0))
            run = merged[(i, j)]
            ok &= run.params < apart.params and run.macs <= apart.macs
            total += run.params
        if ok and (best is None or (total, len(runs)) < best):
            best = (total, len(runs))
    return best


@given(st.lists(st.tuples(st.integers(1, 50), st.integers(1, 50)), min_size=1, max_size=6),
       st.data())
def test_best_partition_matches_brute_force(sizes, data) -> None:
    costs = [Cost(p, m) for p, m in sizes]
    n = len(costs)
    merged = {(i, j): Cost(data.draw(st.integers(1, 150)), data.draw(st.integers(1, 150)))
              for i in range(n) for j in range(i + 1, n)}
    runs = best_partition(costs, merged)
    assert [r[0] for r in runs] == [0] + [r[1] + 1 for r in runs[:-1]]
    assert runs[-1][1] == n - 1
    total = sum(costs[i].params if i == j else merged[(i, j)].params for i, j in runs)
    assert (total, len(runs)) == brute_force_partition(costs, merged)


def test_a_bottleneck_is_linearised_but_not_merged() -> None:
    # 64-8-64: merging gives 64*64 = 4096 weights against 2*512: keep it factored
    model = nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 64)).eval()
    x = torch.randn(3, 64)
    prepared = collapse.prepare(model, x, sites="all")
    set_slopes(prepared, {"0_act": 1.0})
    out = collapse.apply(prepared, tol=0.0)
    assert [d.action for d in out.meta["fxcompress.collapse"].sites] == ["identity"]
    assert sum(isinstance(m, nn.Linear) for m in out.modules()) == 2
    assert_equivalent(out, nn.Sequential(model[0], model[2]), x)


def test_vgg_style_head_merges_whole() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 64), nn.ReLU(), nn.Dropout(),
                          nn.Linear(64, 64), nn.ReLU(), nn.Dropout(), nn.Linear(64, 10))
    x = torch.randn(2, 3, 4, 4)
    prepared = collapse.prepare(model, x)
    set_slopes(prepared, {"1_act": 1.0, "4_act": 1.0})
    out = collapse.apply(prepared)
    linears = [m for m in out.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(48, 10)]
    ref = copy.deepcopy(model).eval()
    ref[2] = ref[5] = nn.Identity()
    assert_equivalent(out, ref, x)


# --------------------------------------------------------------------------- bound


@given(st.data())
def test_reported_bound_holds(data) -> None:
    d = [data.draw(st.integers(1, 12)) for _ in range(4)]
    with torch.random.fork_rng():
        torch.manual_seed(data.draw(st.integers(0, 2**16)))
        model = nn.Sequential(nn.Linear(d[0], d[1]), data.draw(st.sampled_from(ACTS))(),
                              nn.Linear(d[1], d[2]), data.draw(st.sampled_from(ACTS))(),
                              nn.Linear(d[2], d[3])).double().eval()
        x = 3 * torch.randn(64, d[0], dtype=torch.float64)
    prepared = collapse.prepare(model, x, sites="all")
    tol = 0.3
    set_slopes(prepared, {n: 1 - data.draw(st.floats(-tol, tol)) for n in ["0_act", "2_act"]})
    prepared.eval()
    seen = {}
    hooks = [prepared.get_submodule(n).register_forward_hook(
        lambda m, i, o, n=n: seen.__setitem__(n, i[0].detach())) for n in ["0_act", "2_act"]]
    with torch.no_grad():
        y = prepared(x)
    for h in hooks:
        h.remove()
    out = collapse.apply(prepared, tol=tol)
    bounds = {s.name: s.bound for s in out.meta["fxcompress.collapse"].sites}
    with torch.no_grad():
        change = (out(x) - y).norm(dim=-1)
    allowed = sum(bounds[n] * seen[n].norm(dim=-1) for n in bounds)
    assert bool((change <= allowed * (1 + 1e-9) + 1e-12).all())


@given(st.integers(1, 9), st.integers(1, 9), st.integers(0, 2**16))
def test_spectral_norm_matches_the_svd(rows, cols, seed) -> None:
    m = torch.randn(rows, cols, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    assert spectral_norm(m) == pytest.approx(float(torch.linalg.svdvals(m)[0]), rel=1e-10)


# --------------------------------------------------------------------------- regulariser


def test_regularizer_value_gradient_and_effect() -> None:
    model = nn.Sequential(nn.Linear(8, 64), nn.GELU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 4))
    prepared = collapse.prepare(model, torch.randn(2, 8))
    sites = prepared.meta["fxcompress.collapse.sites"]
    weights = [s.saving / max(t.saving for t in sites) for s in sites]
    set_slopes(prepared, {"0_act": 0.2, "2_act": 0.6})
    value = collapse.regularizer(prepared, 0.5)
    expected = 0.5 * (weights[0] * 0.8**2 + weights[1] * 0.4**2)
    assert value.item() == pytest.approx(expected, rel=1e-6)
    uniform = collapse.regularizer(prepared, 2.0, weighting="uniform")
    assert uniform.item() == pytest.approx(2.0 * (0.8**2 + 0.4**2), rel=1e-6)
    opt = torch.optim.SGD(collapse.slope_parameters(prepared), lr=0.5)
    for _ in range(50):
        opt.zero_grad()
        collapse.regularizer(prepared, 1.0, weighting="uniform").backward()
        opt.step()
    assert all(abs(1 - a) < 1e-6 for a in collapse.slopes(prepared).values())
    assert collapse.apply(prepared).meta["fxcompress.collapse"].sites[0].action == "merged"


def test_bad_arguments_raise_clear_errors() -> None:
    model = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(2, 4)
    prepared = collapse.prepare(model, x)
    with pytest.raises(InvalidArgument, match=r"tol must be a number >= 0, got tol=-0\.1"):
        collapse.apply(prepared, tol=-0.1)
    with pytest.raises(InvalidArgument, match="prepared must be the GraphModule"):
        collapse.apply(model)
    with pytest.raises(InvalidArgument, match="no Blend sites"):
        collapse.regularizer(model)
    with pytest.raises(InvalidArgument, match="strength must be >= 0"):
        collapse.regularizer(prepared, -1.0)
    with pytest.raises(InvalidArgument, match="weighting must be"):
        collapse.regularizer(prepared, weighting="flops")
    with pytest.raises(InvalidArgument, match=r"unknown names \['swish'\]"):
        collapse.prepare(model, x, activations=["swish"])
    with pytest.raises(InvalidArgument, match="sites must be None, 'all' or a sequence"):
        collapse.prepare(model, x, sites="0")


# --------------------------------------------------------------------------- transformers


def test_torchvision_vit_mlp_blocks() -> None:
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                            hidden_dim=16, mlp_dim=64, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    prepared = collapse.prepare(vit, x)
    names = list(collapse.slopes(prepared))
    assert names == [f"encoder.layers.encoder_layer_{i}.mlp.0_act" for i in range(2)]
    set_slopes(prepared, dict.fromkeys(names, 1.0))
    out = collapse.apply(prepared)
    ref = copy.deepcopy(vit)
    for layer in ref.encoder.layers:
        layer.mlp[1] = nn.Identity()
    assert_equivalent(out, ref, x)
    linears = [m for n, m in out.named_modules() if isinstance(m, nn.Linear) and "mlp" in n]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 16), (16, 16)]
    assert params(vit) - params(out) == 2 * (16 * 64 + 64 + 64 * 16 + 16 - 16 * 16 - 16)
    torch.export.export(out, (x,))


def test_prepared_model_traces_exports_and_trains() -> None:
    model = nn.Sequential(nn.Linear(6, 24), nn.GELU(), nn.Linear(24, 6))
    x = torch.randn(3, 6)
    prepared = collapse.prepare(model, x)
    exported = torch.export.export(prepared, (x,))
    assert_equivalent(exported.module(), model.eval(), x)
    retraced = torch.fx.symbolic_trace(prepared)
    assert_equivalent(retraced, model, x)
    before = collapse.slopes(prepared)["0_act"]
    loss = prepared(x).square().sum() + collapse.regularizer(prepared)
    loss.backward()
    grad = collapse.slope_parameters(prepared)[0].grad
    assert grad is not None
    assert before == 0.0


def test_functional_layers_are_sites() -> None:
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w1, self.b1 = nn.Parameter(torch.randn(32, 5)), nn.Parameter(torch.randn(32))
            self.w2 = nn.Parameter(torch.randn(5, 32))

        def forward(self, x):
            return F.linear(torch.relu(F.linear(x, self.w1, self.b1)), self.w2)

    model = Functional().double()
    x = torch.randn(4, 5, dtype=torch.float64)
    prepared = collapse.prepare(model, x)
    (name,) = collapse.slopes(prepared)
    set_slopes(prepared, {name: 1.0})
    out = collapse.apply(prepared, tol=0.0)
    with torch.no_grad():
        expected = F.linear(F.linear(x, model.w1, model.b1), model.w2)
        torch.testing.assert_close(out(x), expected, rtol=1e-9, atol=1e-9)
    assert [type(m) for m in out.children()] == [nn.Linear]
    assert params(out) == 5 * 5 + 5  # the functional weights went with their last reader


@given(st.integers(0, 2**16), st.sampled_from(ACTS))
def test_batchnorm_after_the_activation_is_folded(seed, act) -> None:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        bn = nn.BatchNorm1d(24)
        with torch.no_grad():
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(-2, 2)
            bn.bias.uniform_(-1, 1)
        model = nn.Sequential(nn.Linear(6, 24), act(), bn, nn.Dropout(), nn.Linear(24, 5))
        model = model.double().eval()
        x = torch.randn(7, 6, dtype=torch.float64)
    prepared = collapse.prepare(model, x)
    set_slopes(prepared, {"0_act": 1.0})
    out = collapse.apply(prepared, tol=0.0)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in out.modules())
    ref = copy.deepcopy(model)
    ref[1] = nn.Identity()
    assert_equivalent(out, ref, x, rtol=1e-9)


def test_training_with_the_penalty_collapses_a_head_that_can_be_linear() -> None:
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(3, 6, generator=gen)
    x = torch.randn(256, 6, generator=gen)
    y = x @ target.T
    model = nn.Sequential(nn.Linear(6, 48), nn.ReLU(), nn.Linear(48, 48), nn.GELU(),
                          nn.Linear(48, 3))
    prepared = collapse.prepare(model, x[:2])
    slopes = collapse.slope_parameters(prepared)
    rest = [p for p in prepared.parameters() if all(p is not s for s in slopes)]
    opt = torch.optim.Adam([{"params": rest, "lr": 3e-3}, {"params": slopes, "lr": 3e-2}])
    for _ in range(300):
        loss = F.mse_loss(prepared(x), y) + collapse.regularizer(prepared, 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(abs(1 - a) <= 0.05 for a in collapse.slopes(prepared).values())
    out = collapse.apply(prepared, tol=0.05, data=[x])
    report = out.meta["fxcompress.collapse"]
    assert [d.action for d in report.sites] == ["merged", "merged"]
    assert [type(m) for m in out.children()] == [nn.Linear]
    assert report.params_after == 6 * 3 + 3
    with torch.no_grad():
        assert F.mse_loss(out(x), y).item() < 0.05 * y.var().item()
        assert report.output_error == pytest.approx(
            ((out(x) - prepared.eval()(x)).abs().max() / prepared(x).abs().max()).item(), rel=1e-4
        )


class _WritesItsInputBetweenTheLayers(nn.Module):
    """``fc1`` reads ``x``; ``x`` is then written in place before ``fc2`` runs (issue 15 item 4)."""

    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(6, 32), nn.GELU(), nn.Linear(32, 6)
        self.spelling = spelling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * 1.0  # a tensor of the model's own: the write below must not reach the caller
        h = self.fc1(x)
        if self.spelling == "mul_":
            x.mul_(2)
        else:  # an in-place activation on the shortcut
            torch.relu_(x)
        return self.fc2(self.act(h)) + x


@pytest.mark.parametrize("spelling", ["mul_", "relu_"])
def test_collapsed_run_reads_its_input_before_an_in_place_write(spelling: str) -> None:
    model = _WritesItsInputBetweenTheLayers(spelling).double().eval()
    x = torch.randn(5, 6, dtype=torch.float64)
    prepared = collapse.prepare(model, x)
    assert list(collapse.slopes(prepared)) == ["fc1_act"]
    set_slopes(prepared, {"fc1_act": 1.0})
    for check in (True, False):  # the emission itself is right, not only caught by the check
        out = collapse.apply(prepared, tol=0.0, check=check)
        assert [d.action for d in out.meta["fxcompress.collapse"].sites] == ["merged"]
        ref = copy.deepcopy(model)
        ref.act = nn.Identity()
        assert_equivalent(out, ref, x, rtol=1e-9)
