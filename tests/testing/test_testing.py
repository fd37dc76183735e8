"""Tests of fxcompress.testing: the strategies draw what they promise, assert_equivalent judges
outputs correctly (checked against hand-built cases), and hypothesis stays optional."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fxcompress.testing import (
    GeneratedModel,
    Hook,
    InplaceOp,
    Step,
    assert_equivalent,
    conv_chains,
    default_rtol,
    graphs,
    linear_chains,
    models,
)

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def convs_of(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, CONV_TYPES)]


# ------------------------------------------------------------------------------------------
# Strategies
# ------------------------------------------------------------------------------------------


@given(conv_chains())
def test_conv_chains_run_in_eval_mode_with_a_fitting_input(case):
    model, x = case
    assert isinstance(model, nn.Sequential)
    assert not any(m.training for m in model.modules())
    assert 1 <= len(convs_of(model)) <= 4
    assert x.dim() == 4
    assert x.dtype == torch.float32
    with torch.no_grad():
        y = model(x)  # the input is large enough for the whole chain
    assert y.numel() > 0
    assert torch.isfinite(y).all()


@settings(max_examples=50)  # 3-D convs are slow; the 2-D test above has the full count
@given(st.data())
def test_conv_chains_other_dimensions_and_dtypes(data):
    ndim = data.draw(st.sampled_from((1, 3)))
    dtype = data.draw(st.sampled_from((torch.float64, torch.float32)))
    model, x = data.draw(conv_chains(ndim=ndim, dtype=dtype))
    assert x.dim() == ndim + 2
    assert x.dtype == dtype
    assert all(p.dtype == dtype for p in model.parameters())
    with torch.no_grad():
        assert model(x).dtype == dtype


@given(conv_chains(padding="first", batchnorm=False, activations=False, groups=False, max_convs=3))
def test_conv_chains_respect_their_options(case):
    model, _ = case
    convs = convs_of(model)
    assert len(convs) == len(model)  # no BatchNorm, no activation
    assert all(c.groups == 1 for c in convs)
    assert all(all(p == 0 for p in c.padding) for c in convs[1:])
    for c in convs:
        assert all(1 <= k <= 7 for k in c.kernel_size)
        assert all(1 <= s <= 3 for s in c.stride)
        assert all(1 <= d <= 3 for d in c.dilation)


@given(conv_chains(padding="none"))
def test_conv_chains_without_padding(case):
    model, _ = case
    assert all(all(p == 0 for p in c.padding) for c in convs_of(model))


@given(conv_chains(max_channels=6))
def test_conv_chains_batchnorms_have_nontrivial_statistics(case):
    model, _ = case
    for bn in (m for m in model.modules() if isinstance(m, BN_TYPES)):
        assert bn.eps in (1e-5, 1e-3, 0.1)
        assert (bn.running_var > 0).all()
        if bn.num_features > 1:
            assert bn.running_mean.std() > 0


def test_conv_chains_cover_groups_bias_batchnorm_and_activations():
    """Over the ci sample, every feature the docstring promises shows up."""
    seen: set[str] = set()

    @given(conv_chains())
    def collect(case):
        model, _ = case
        for i, m in enumerate(model):
            if isinstance(m, nn.Conv2d):
                if m.groups == m.in_channels > 1:
                    seen.add("depthwise")
                    if m.out_channels > m.in_channels:
                        seen.add("multiplier")
                elif m.groups > 1:
                    seen.add("grouped")
                seen.add("bias" if m.bias is not None else "no bias")
                if any(p > 0 for p in m.padding):
                    seen.add("padding")
                if any(s > 1 for s in m.stride):
                    seen.add("stride")
                if any(d > 1 for d in m.dilation):
                    seen.add("dilation")
                if len(set(m.kernel_size)) > 1:
                    seen.add("non-square")
            elif isinstance(m, nn.BatchNorm2d):
                seen.add("bn")
            elif 0 < i < len(model) - 1:
                seen.add("activation")

    collect()
    expected = {"depthwise", "multiplier", "grouped", "bias", "no bias", "padding", "stride"}
    assert expected | {"dilation", "non-square", "bn", "activation"} <= seen


@given(linear_chains())
def test_linear_chains(case):
    model, x = case
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert 1 <= len(linears) <= 4
    assert x.shape[-1] == linears[0].in_features
    if any(isinstance(m, nn.BatchNorm1d) for m in model):
        assert x.dim() == 2
    with torch.no_grad():
        assert model(x).shape[-1] == linears[-1].out_features


@given(models())
def test_models_trace_and_run(case):
    model, x = case
    assert isinstance(model, GeneratedModel)
    assert not model.training
    gm = torch.fx.symbolic_trace(model)
    assert_equivalent(gm, model, x)
    assert "return" in model.program()


def test_models_cover_the_promised_structures():
    ops: set[str] = set()

    @given(models(multiple_outputs=True))
    def collect(case):
        model, _ = case
        ops.update(s.op for s in model.steps)
        names = [s.arg for s in model.steps if s.op == "module"]
        if any(names.count(n) > 1 for n in names):
            ops.add("shared module")
        if isinstance(model.outputs, tuple) and len(model.outputs) > 1:
            ops.add("several outputs")
        if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
            ops.add("bn")
        if any(isinstance(m, nn.Linear) for m in model.modules()):
            ops.add("linear head")

    collect()
    assert {"module", "conv_fn", "add", "cat", "scale", "gate", "flatten"} <= ops
    assert {"shared module", "several outputs", "bn", "linear head"} <= ops
    assert {"max_pool", "avg_pool"} & ops
    assert {"relu", "relu_method"} & ops


def test_strategies_replay_deterministically_and_leave_the_global_rng_alone():
    drawn: list[list[torch.Tensor]] = []

    @settings(max_examples=1, database=None)
    @given(models(dtype=torch.float64))
    def draw(case):
        model, x = case
        drawn.append([x, *model.state_dict().values()])

    state = torch.random.get_rng_state()
    draw()
    draw()
    assert torch.equal(state, torch.random.get_rng_state())
    assert len(drawn) == 2
    assert all(torch.equal(a, b) for a, b in zip(*drawn, strict=True))


def test_strategy_arguments_are_validated():
    with pytest.raises(ValueError, match="ndim"):
        conv_chains(ndim=4)
    with pytest.raises(ValueError, match="padding"):
        conv_chains(padding="same")
    with pytest.raises(ValueError, match="dtype"):
        linear_chains(dtype=torch.int64)
    with pytest.raises(ValueError, match="max_steps"):
        models(max_steps=0)


def test_generated_model_program_and_outputs():
    model = GeneratedModel(
        {"conv": nn.Conv2d(2, 2, 1)},
        [Step("module", (0,), "conv"), Step("scale", (1,), 2.0), Step("cat", (0, 2))],
        outputs=(1, -1),
    )
    x = torch.randn(1, 2, 3, 3)
    a, b = model(x)
    assert torch.equal(b, torch.cat([x, 2.0 * model.conv(x)], 1))
    assert torch.equal(a, model.conv(x))
    assert model.program().splitlines() == [
        "v1 = conv(v0)",
        "v2 = v1 * 2.0",
        "v3 = cat([v0, v2], 1)",
        "return v1, v3",
    ]


# ------------------------------------------------------------------------------------------
# assert_equivalent
# ------------------------------------------------------------------------------------------


def test_default_tolerances():
    assert default_rtol(torch.float64) == 1e-9
    assert default_rtol(torch.float32) == 1e-4
    assert default_rtol(torch.float16) == 1e-2
    assert default_rtol(torch.bfloat16) == 5e-2
    assert default_rtol(torch.int32) == 0.0


@given(
    scale=st.floats(1e-3, 1e3),
    rel=st.floats(0, 1e-3),
    dtype=st.sampled_from((torch.float64, torch.float32)),
)
def test_relative_max_error_criterion(scale, rel, dtype):
    """Passes iff max|a-b| <= rtol * max|b| (up to the float64 rounding of the criterion)."""
    x = torch.zeros(1)
    ref = torch.linspace(-scale, scale / 2, 7, dtype=torch.float64)
    perturbed = ref.clone()
    perturbed[3] += rel * scale  # max|ref| == scale
    tol = default_rtol(dtype)

    def a(_):
        return perturbed.to(dtype)

    def b(_):
        return ref.to(dtype)

    actual = (perturbed.to(dtype).double() - ref.to(dtype).double()).abs().max() / scale
    if actual <= tol * (1 - 1e-9):
        assert assert_equivalent(a, b, x) == pytest.approx(float(actual), rel=1e-6, abs=1e-300)
    elif actual > tol * (1 + 1e-9):
        with pytest.raises(AssertionError, match=r"max relative error .* > rtol"):
            assert_equivalent(a, b, x)


def test_nested_outputs_name_the_offending_output_and_index():
    x = torch.zeros(1)
    good = {"logits": torch.ones(2, 3), "aux": (torch.zeros(2), torch.arange(3.0))}
    bad = {"logits": torch.ones(2, 3), "aux": (torch.zeros(2), torch.tensor([0.0, 1.0, 2.5]))}
    assert assert_equivalent(lambda _: good, lambda _: good, x) == 0.0
    with pytest.raises(AssertionError) as info:
        assert_equivalent(lambda _: bad, lambda _: good, x)
    message = str(info.value)
    assert "output['aux'][1]" in message
    assert "index (2,)" in message
    assert "0.25" in message  # |2.5 - 2| / max|[0, 1, 2]|


@pytest.mark.parametrize(
    ("a", "b", "fragment"),
    [
        ((torch.ones(2),), (torch.ones(2), torch.ones(2)), "structures differ"),
        (torch.ones(2, 1), torch.ones(2), "shapes differ"),
        ({"a": torch.ones(1)}, {"b": torch.ones(1)}, "structures differ"),
        ((torch.ones(1), 3), (torch.ones(1), 4), "3 != 4"),
        (torch.tensor([math.nan]), torch.tensor([1.0]), "max relative error inf"),
        (torch.tensor([math.inf]), torch.tensor([1.0]), "max relative error inf"),
    ],
)
def test_mismatches_are_reported(a, b, fragment):
    with pytest.raises(AssertionError, match=fragment.replace("(", r"\(")):
        assert_equivalent(lambda _: a, lambda _: b, torch.zeros(1))


def test_matching_non_finite_values_and_empty_tensors_pass():
    out = torch.tensor([math.nan, math.inf, -math.inf, 1.0])
    assert assert_equivalent(lambda _: out.clone(), lambda _: out.clone(), torch.zeros(1)) == 0.0
    empty = torch.zeros(0, 3)
    assert assert_equivalent(lambda _: empty, lambda _: empty, torch.zeros(1)) == 0.0


def test_half_precision_tolerance_and_explicit_rtol():
    ref = torch.ones(4, dtype=torch.float16)
    off = ref * (1 + 5e-3)
    assert assert_equivalent(lambda _: off, lambda _: ref, torch.zeros(1)) < 1e-2
    with pytest.raises(AssertionError):
        assert_equivalent(lambda _: off, lambda _: ref, torch.zeros(1), rtol=1e-3)
    with pytest.raises(ValueError, match="rtol"):
        assert_equivalent(lambda _: ref, lambda _: ref, torch.zeros(1), rtol=-1)


def test_runs_in_eval_mode_without_grad_and_restores_training_flags():
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.9), nn.BatchNorm1d(3))
    model.train()
    model[2].eval()  # a mixed state must come back exactly
    flags = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    model.register_forward_pre_hook(
        lambda mod, args: seen.append((torch.is_grad_enabled(), mod.training, mod[1].training))
    )

    def reference(x):
        return model[2](model[0](x))

    assert_equivalent(model, reference, torch.randn(5, 3))  # dropout would break this
    assert seen == [(False, False, False)]
    assert [m.training for m in model.modules()] == flags
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_hypothesis_is_optional():
    """``import fxcompress`` imports neither fxcompress.testing nor hypothesis; without
    hypothesis, assert_equivalent works and the strategies say how to install it."""
    code = (
        "import sys\n"
        "import fxcompress\n"
        "print('fxcompress.testing' in sys.modules, 'hypothesis' in sys.modules)\n"
        "sys.modules['hypothesis'] = None  # as if it were not installed\n"
        "import torch\n"
        "from fxcompress.testing import assert_equivalent, conv_chains\n"
        "print(assert_equivalent(torch.nn.Identity(), torch.nn.Identity(), torch.ones(1)))\n"
        "try:\n"
        "    conv_chains()\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[0].split() == ["False", "False"]
    assert out[1] == "0.0"
    assert "pip install hypothesis" in out[2]


def test_each_model_gets_its_own_copy_of_the_inputs():
    class Doubler(nn.Module):
        def forward(self, x):
            return x.mul_(2.0)  # writes its input and returns it

    x = torch.randn(3)
    original = x.clone()
    assert assert_equivalent(Doubler(), lambda t: 2.0 * t, x) == 0.0
    assert torch.equal(x, original)


def test_graphs_cover_the_fuzzer_structures():
    """Over the ci sample, graphs() draws every structure its docstring promises."""
    from fxcompress.testing import graphs

    seen: set[str] = set()

    @settings(max_examples=150)
    @given(graphs())
    def collect(case):
        model, x = case
        seen.update(s.op for s in model.steps)
        seen.update(str(s.arg) for s in model.steps if s.op == "add")
        names = [s.arg for s in model.steps if s.op == "module"]
        for n in set(names):
            if names.count(n) > 1:
                seen.add(type(model.get_submodule(n)).__name__ + " shared")
        for m in model.modules():
            seen.add(type(m).__name__)
            if isinstance(m, nn.Conv2d) and len(set(m.kernel_size)) > 1:
                seen.add("non-square")
        assert_equivalent(torch.fx.symbolic_trace(model), model, x)

    collect()
    assert {"mul", "reshape", "transpose", "cat", "conv_fn", "flatten"} <= seen
    assert {"None", "torch.add", "method"} <= seen
    assert {"Conv2d shared", "Linear shared", "non-square", "PReLU", "BatchNorm2d"} <= seen


# ------------------------------------------------------------------------------------------
# Hostile draws (issue 15): hooks, in-place writes, unbatched inputs, and the new structures
# ------------------------------------------------------------------------------------------


def _ancestors(model: GeneratedModel) -> list[set[int]]:
    """For each value index, the set of value indices it was computed from (itself included)."""
    anc: list[set[int]] = [{0}]
    for i, s in enumerate(model.steps, start=1):
        anc.append({i}.union(*(anc[j] for j in s.inputs)))
    return anc


def _producer(model: GeneratedModel, v: int) -> Step | None:
    return model.steps[v - 1] if v > 0 else None


def _module_of(model: GeneratedModel, v: int) -> nn.Module | None:
    step = _producer(model, v)
    return model.get_submodule(step.arg) if step is not None and step.op == "module" else None


def _structures(model: GeneratedModel) -> set[str]:
    """The issue-15 structure classes present in a drawn model."""
    found: set[str] = set()
    anc = _ancestors(model)
    for s in model.steps:
        is_bn = s.op == "module" and isinstance(model.get_submodule(s.arg), nn.BatchNorm2d)
        if is_bn and not isinstance(_module_of(model, s.inputs[0]), nn.Conv2d):
            found.add("bn without conv")
        if s.op == "add":
            a, b = s.inputs
            inner = _producer(model, a)
            # ((p + q) + r) with r not computed from (p + q): a sum of three branches
            if inner is not None and inner.op == "add" and a not in anc[b]:
                found.add("sum of 3+ branches")
            for fork, branch in ((a, b), (b, a)):
                unit = _module_of(model, fork)
                producer = _producer(model, fork)
                is_act = producer is not None and (
                    producer.op in ("relu", "relu_method")
                    or (unit is not None and not isinstance(unit, (nn.Conv2d, nn.BatchNorm2d)))
                )
                if is_act and fork in anc[branch] and branch != fork:
                    found.add("residual fork at an activation")
        if s.op == "module" and isinstance(model.get_submodule(s.arg), (nn.Identity, nn.Dropout)):
            found.add("identity or dropout")
    return found


def test_graphs_draw_the_issue_15_structures_by_default():
    seen: set[str] = set()

    @settings(max_examples=120)
    @given(graphs())
    def collect(case):
        model, x = case
        seen.update(_structures(model))
        assert x.dim() == 4  # unbatched inputs are opt-in
        assert not model.hook_specs  # so are hooks
        assert not any(s.op == "inplace" for s in model.steps)  # and in-place writes
        assert_equivalent(torch.fx.symbolic_trace(model), model, x)

    collect()
    assert {
        "bn without conv",
        "sum of 3+ branches",
        "residual fork at an activation",
        "identity or dropout",
    } <= seen


def _hooks_of(model: nn.Module) -> dict[str, list[Any]]:
    return {
        name: [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]
        for name, m in model.named_modules()
        if m._forward_hooks or m._forward_pre_hooks
    }


def test_hooked_models_register_the_hooks_they_describe():
    kinds: set[str] = set()
    hooked: set[str] = set()
    changed = []

    @settings(max_examples=60)
    @given(graphs(hooks=True))
    def collect(case):
        model, x = case
        registered = _hooks_of(model)
        assert registered == {n: list(h) for n, h in model.hook_specs.items()}
        for name, hooks in model.hook_specs.items():
            kinds.update(h.kind for h in hooks)
            hooked.add(type(model.get_submodule(name)).__name__)
            assert all(h.describe() in model.program() for h in hooks)
        # the hooks run in eager mode and in a plain trace (hooked modules stay leaves)
        assert_equivalent(torch.fx.symbolic_trace(model), model, x)
        if model.hook_specs:
            bare = copy.deepcopy(model)
            for m in bare.modules():
                m._forward_hooks.clear()
                m._forward_pre_hooks.clear()
            with torch.no_grad():
                changed.append(not torch.equal(_first(bare(x.clone())), _first(model(x.clone()))))

    collect()
    assert kinds == {"output", "output_inplace", "observe", "input"}
    assert {"Conv2d", "BatchNorm2d", "Identity"} <= hooked
    assert {"Dropout", "Dropout2d"} & hooked
    assert hooked & {"ReLU", "ReLU6", "GELU", "SiLU", "Tanh", "Sigmoid", "Hardswish"}
    assert any(changed)  # hooks do change what models compute


def _first(out: Any) -> torch.Tensor:
    return out[-1] if isinstance(out, tuple) else out


def _inputs(model: GeneratedModel, v: int) -> tuple[int, ...]:
    return model.steps[v - 1].inputs


def _is_layer(model: GeneratedModel, v: int) -> bool:
    return isinstance(_module_of(model, v), (nn.Conv2d, nn.Linear))


def test_inplace_models_write_their_input_and_intermediates():
    seen: set[str] = set()

    @settings(max_examples=80)
    @given(graphs(inplace=True))
    def collect(case):
        model, x = case
        anc = _ancestors(model)
        for i, s in enumerate(model.steps, start=1):
            if s.op != "inplace":
                continue
            (target,) = s.inputs
            seen.add("input" if target == 0 else "intermediate")
            assert f"v{target}.{s.arg[0]}(" in model.program()
            # read later: a later step uses the written value (or its alias) as an input
            if any(target in t.inputs or i in t.inputs for t in model.steps[i:]):
                seen.add("read later")
            # between two layers: a layer read `target` before the write, and a layer after
            # the write reads a value computed from it
            before = {j for j in range(1, i) if _is_layer(model, j) and target in _inputs(model, j)}
            after = [j for j in range(i + 1, len(model.steps) + 1) if _is_layer(model, j)]
            if any(before & anc[k] for j in after for k in _inputs(model, j)):
                seen.add("between layers")
        probe = x.clone()
        with torch.no_grad():
            model(probe)
        if not torch.equal(probe, x):
            seen.add("writes the caller's input")
        assert_equivalent(torch.fx.symbolic_trace(model), model, x)  # copies: x is untouched

    collect()
    assert {"input", "intermediate", "read later", "between layers"} <= seen
    assert "writes the caller's input" in seen


def test_unbatched_models_and_their_batchnorms():
    seen: set[str] = set()

    @settings(max_examples=80)
    @given(graphs(unbatched=True, head=False))
    def collect(case):
        model, x = case
        assert model.unbatched == (x.dim() == 3)
        seen.add("unbatched" if model.unbatched else "batched")
        if not model.unbatched:
            return
        assert model.program().startswith("# v0 has no batch axis")
        shapes: dict[str, torch.Size] = {}
        probe = copy.deepcopy(model)
        for name, m in probe.named_modules():
            if isinstance(m, nn.BatchNorm1d):
                m.register_forward_pre_hook(lambda _, a, n=name: shapes.update({n: a[0].shape}))
        with torch.no_grad():
            probe(x.clone())
        for name, t in shapes.items():
            bn = model.get_submodule(name)
            assert len(t) == 3  # (C, H, W)
            assert bn.num_features == t[1]  # normalises H
            seen.add("bn over H")
            if t[0] == t[1]:
                seen.add("C == H")  # looks like a per-channel BN but is not
        assert_equivalent(torch.fx.symbolic_trace(model), model, x)

    collect()
    assert {"batched", "unbatched", "bn over H", "C == H"} <= seen


@settings(max_examples=60)
@given(st.data())
def test_hostile_conv_and_linear_chains(data):
    ndim = data.draw(st.sampled_from((1, 2, 3)))
    model, x = data.draw(conv_chains(ndim=ndim, hooks=True, inplace=True, unbatched=True))
    assert x.dim() in (ndim + 1, ndim + 2)
    for name, hooks in _hooks_of(model).items():
        assert all(isinstance(h, Hook) for h in hooks), name
    if x.dim() == ndim + 1:
        # unbatched: a BN normalises the first spatial axis of (C, *spatial)
        for m in model:
            if isinstance(m, BN_TYPES):
                assert type(m) is BN_TYPES[max(0, ndim - 2)]
    with torch.no_grad():
        y = model(x.clone())
    assert y.numel() > 0
    lin, v = data.draw(linear_chains(hooks=True, inplace=True, unbatched=True))
    if v.dim() == 1:
        assert not any(isinstance(m, nn.BatchNorm1d) for m in lin)
    last = [m for m in lin if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        assert lin(v.clone()).shape[-1] == last.out_features


def test_hostile_chains_cover_their_options():
    seen: set[str] = set()

    @settings(max_examples=100)
    @given(conv_chains(ndim=1, hooks=True, inplace=True, unbatched=True))
    def collect(case):
        model, x = case
        if isinstance(model[0], InplaceOp):
            seen.add("writes the input")
        if any(isinstance(m, InplaceOp) for m in list(model)[1:]):
            seen.add("writes an intermediate")
        if _hooks_of(model):
            seen.add("hooks")
        if x.dim() == 2:
            seen.add("unbatched")
            for prev, m in zip(model, list(model)[1:]):
                if isinstance(m, nn.BatchNorm1d) and isinstance(prev, nn.Conv1d):
                    seen.add("bn after unbatched conv")
                    if prev.out_channels == m.num_features:
                        seen.add("C == L")

    collect()
    assert {"writes the input", "writes an intermediate", "hooks", "unbatched"} <= seen
    assert {"bn after unbatched conv", "C == L"} <= seen


def test_hook_and_inplace_op():
    x = torch.tensor([[-1.0, 2.0]])
    relu = nn.ReLU()
    handle = Hook("output", 0.5, 0.25).register(relu)
    assert torch.equal(relu(x), torch.tensor([[0.25, 1.25]]))
    handle.remove()
    handle = Hook("output_inplace", -1.0).register(relu)
    assert torch.equal(relu(x), torch.tensor([[-0.0, -2.0]]))
    handle.remove()
    handle = Hook("input", 2.0, 1.0).register(relu)
    assert torch.equal(relu(x), torch.tensor([[0.0, 5.0]]))
    handle.remove()
    Hook("observe").register(relu)
    assert torch.equal(relu(x), torch.tensor([[0.0, 2.0]]))
    assert copy.deepcopy(relu)(x).tolist() == [[0.0, 2.0]]
    with pytest.raises(ValueError, match="kind"):
        Hook("backward")
    y = x.clone()
    assert InplaceOp("relu_")(y) is y
    assert torch.equal(y, torch.tensor([[0.0, 2.0]]))
    with pytest.raises(ValueError, match="method"):
        InplaceOp("sub_", 1.0)
    with pytest.raises(ValueError, match="value"):
        InplaceOp("mul_")


def test_hostile_strategies_replay_deterministically():
    drawn: list[list[Any]] = []

    @settings(max_examples=3, database=None)
    @given(graphs(dtype=torch.float64, hooks=True, inplace=True, unbatched=True))
    def draw(case):
        model, x = case
        with torch.no_grad():
            out = model(x.clone())
        drawn.append([model.program(), x, out, *model.state_dict().values()])

    draw()
    draw()
    first, second = drawn[:3], drawn[3:]
    for a, b in zip(first, second, strict=True):
        assert a[0] == b[0]
        assert all(torch.equal(p, q) for p, q in zip(_flat(a[1:]), _flat(b[1:]), strict=True))


def _flat(values: list[Any]) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for v in values:
        out.extend(_flat(list(v)) if isinstance(v, tuple) else [v])
    return out
