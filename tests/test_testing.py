"""Tests of fxcompress.testing: the strategies draw what they promise, assert_equivalent judges
outputs correctly (checked against hand-built cases), and hypothesis stays optional."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fxcompress.testing import (
    GeneratedModel,
    Step,
    assert_equivalent,
    conv_chains,
    default_rtol,
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

    @settings(max_examples=60)
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
