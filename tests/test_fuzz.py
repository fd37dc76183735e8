"""Graph fuzzer (issue 8, hostile classes issue 15): random model DAGs from
``fxcompress.testing.graphs`` (and hostile conv / linear chains) through the whole pipeline. The
reference is always the original model, run eagerly on a copy of the inputs.

The hostile properties (issue 15 item 15's classes: forward hooks, in-place writes of inputs and of
intermediates read later, unbatched inputs, residual forks at pruned units, BatchNorm without a
preceding conv, sums of three or more branches) state, for every drawn model: either the result
equals the original model at budget 1.0 (relaxed equals merged below 1.0), the caller's inputs
come back bit-identical and the caller's model unchanged (weights, buffers, training flags and
hooks), or the library refuses with one of its documented clean errors (``InvalidArgument``,
``CaptureError``, ``InfeasibleBudget``) - never a ``RewriteError``, never a raw torch error.

Counts in the default ``ci`` profile: 200 + 150 (plain graphs) and 80 + 60 + 80 + 80 + 30
(hostile), about a minute on one core; ``HYPOTHESIS_PROFILE=long`` runs 2000 + 1500 (plain) and
1000 + 800 + 800 + 600 + 400 (hostile) = 7100 examples.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from hypothesis import assume, event, example, given, settings
from hypothesis import strategies as st
from torch import nn

import fxcompress
from fxcompress import (
    CaptureError,
    InfeasibleBudget,
    InvalidArgument,
    collapse,
    fold_batchnorm,
    make_plan,
    merge,
)
from fxcompress.testing import (
    GeneratedModel,
    Hook,
    InplaceOp,
    Step,
    assert_equivalent,
    conv_chains,
    graphs,
    linear_chains,
)
from fxcompress.testing.drawing import randomise_bn

LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"

#: The errors a hostile model may legitimately get instead of a result.
CLEAN_ERRORS = (InvalidArgument, CaptureError, InfeasibleBudget)

HOSTILE = {"hooks": True, "inplace": True, "unbatched": True}


def snapshot(model):
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    hooks = [
        (name, list(m._forward_hooks.values()), list(m._forward_pre_hooks.values()))
        for name, m in model.named_modules()
    ]
    return state, [m.training for m in model.modules()], hooks


def assert_untouched(model, snap):
    state, flags, hooks = snap
    assert model.state_dict().keys() == state.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert [m.training for m in model.modules()] == flags
    now = [
        (name, list(m._forward_hooks.values()), list(m._forward_pre_hooks.values()))
        for name, m in model.named_modules()
    ]
    assert now == hooks, "the caller's hooks changed"


def guarded(model, x, step):
    """Run ``step()``; a clean error gives None. Either way the caller's tensors and model must
    come back exactly as they were."""
    before = x.clone()
    snap = snapshot(model)
    try:
        result = step()
    except CLEAN_ERRORS as exc:
        event(f"clean error: {type(exc).__name__}")
        result = None
    assert torch.equal(x, before), "the caller's input tensor was written"
    assert_untouched(model, snap)
    return result


# ------------------------------------------------------------------------------------------
# Plain graphs (issue 8)
# ------------------------------------------------------------------------------------------


@settings(max_examples=2000 if LONG else 200)
@given(graphs(dtype=torch.float64))
def test_budget_one_is_the_identity(case):
    model, x = case
    snap = snapshot(model)
    compiled = fxcompress.optimize(model, 1.0, example_inputs=x, latency="flops")
    assert assert_equivalent(compiled, model, x) <= 1e-9
    assert_untouched(model, snap)


METHODS = st.sampled_from([("merge",), ("merge", "prune"), ("merge", "prune", "drop")])


@settings(max_examples=1500 if LONG else 150)
@given(graphs(max_steps=6), st.floats(0.05, 0.999), METHODS)
def test_random_budget_never_crashes_and_relaxed_equals_merged(case, budget, methods):
    model, x = case
    snap = snapshot(model)
    minimum = None
    try:
        plan = make_plan(model, budget, x, latency="flops", methods=methods, progress=False)
    except InfeasibleBudget as exc:
        minimum = exc.minimum
    if minimum is not None:
        assert minimum > budget
        assert_untouched(model, snap)
        return
    assert plan.predicted_ms <= budget * plan.original_ms * (1 + 1e-9)
    relaxed = fxcompress.relax(model, plan, x)
    assert_equivalent(merge(relaxed), relaxed, x)
    out = fxcompress.optimize(
        model, budget, example_inputs=x, latency="flops", methods=methods, progress=False
    )
    assert_equivalent(out, relaxed, x)
    assert_untouched(model, snap)


# ------------------------------------------------------------------------------------------
# Hostile models (issue 15): minimal cases found by the properties below, pinned as examples
# ------------------------------------------------------------------------------------------


def _case(model, shape):
    """A hand-written case (float64, eval, non-trivial BatchNorm statistics), built under a fixed
    seed and leaving the global RNG alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                randomise_bn(m)
        return model.double().eval(), torch.randn(shape, dtype=torch.float64)


def _net(modules, steps, hooks=None):
    """A GeneratedModel with fresh (seeded) weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return GeneratedModel({k: make() for k, make in modules.items()}, steps, hooks=hooks)


def _m(src, name):
    return Step("module", (src,), name)


def conv(cin, cout, k, **kw):
    return lambda: nn.Conv2d(cin, cout, k, **kw)


# Minimal cases, one per failure class found by the hostile properties on 4720c31 (the issue
# item in brackets). Built lazily: each returns (model, x).
EXAMPLES = {
    # [1] BatchNorm1d after a conv on an unbatched (C, L) / (C, H, W) input normalises L / H
    "unbatched_conv1d_bn": lambda: _case(
        nn.Sequential(nn.Conv1d(4, 8, 3), nn.BatchNorm1d(8)), (4, 10)
    ),
    "unbatched_conv2d_bn1d": lambda: _case(
        nn.Sequential(nn.Conv2d(1, 5, 1, bias=False), nn.BatchNorm1d(5)), (1, 5, 5)
    ),
    "unbatched_conv_chain_bn": lambda: _case(
        nn.Sequential(
            nn.Conv1d(1, 1, 1, bias=False),
            nn.Conv1d(1, 2, 1, bias=False),
            nn.BatchNorm1d(2, affine=False),
        ),
        (1, 2),
    ),
    # [2] forward hooks (and pre-hooks) dropped by canonicalization, folds and merges
    "hooked_relu": lambda: _case(
        _net(
            {"c0": conv(2, 2, 3, padding=1), "a0": nn.ReLU, "c1": conv(2, 2, 1)},
            [_m(0, "c0"), _m(1, "a0"), _m(2, "c1")],
            {"a0": [Hook("output", 0.5, 0.25)]},
        ),
        (1, 2, 5, 5),
    ),
    "hooked_identity": lambda: _case(
        _net(
            {"c0": conv(2, 2, 3, padding=1), "i0": nn.Identity, "c1": conv(2, 2, 1)},
            [_m(0, "c0"), _m(1, "i0"), _m(2, "c1")],
            {"i0": [Hook("output", -1.0, 0.25)]},
        ),
        (1, 2, 5, 5),
    ),
    "hooked_dropout_prehook": lambda: _case(
        _net(
            {"c0": conv(2, 2, 3, padding=1), "d0": lambda: nn.Dropout(0.5), "c1": conv(2, 2, 1)},
            [_m(0, "c0"), _m(1, "d0"), _m(2, "c1")],
            {"d0": [Hook("input", 2.0)]},
        ),
        (1, 2, 5, 5),
    ),
    "hooked_conv_bn": lambda: _case(
        _net(
            {"c0": conv(2, 3, 3, padding=1), "b0": lambda: nn.BatchNorm2d(3)},
            [_m(0, "c0"), _m(1, "b0")],
            {"c0": [Hook("output", 2.0)]},
        ),
        (1, 2, 5, 5),
    ),
    "hooked_conv_conv": lambda: _case(
        _net(
            {"c0": conv(1, 1, 1, bias=False), "c1": conv(1, 1, 1, bias=False)},
            [_m(0, "c0"), _m(1, "c1")],
            {"c0": [Hook("output", 0.5)]},
        ),
        (1, 1, 5, 5),
    ),
    "hooked_bn_inplace_and_observer": lambda: _case(
        _net(
            {"c0": conv(2, 3, 3, padding=1), "b0": lambda: nn.BatchNorm2d(3), "c1": conv(3, 3, 1)},
            [_m(0, "c0"), _m(1, "b0"), _m(2, "c1")],
            {"b0": [Hook("output_inplace", -1.0)], "c1": [Hook("observe")]},
        ),
        (1, 2, 5, 5),
    ),
    "hooked_linear_chain": lambda: _case(
        _net(
            {"f0": lambda: nn.Linear(3, 4), "f1": lambda: nn.Linear(4, 2)},
            [_m(0, "f0"), _m(1, "f1")],
            {"f0": [Hook("output", 0.5)]},
        ),
        (2, 3),
    ),
    "hooked_conv_below_one": lambda: _case(
        _net(
            {
                "c0": conv(2, 2, 3, padding=1),
                "a0": nn.ReLU,
                "c1": conv(2, 2, 3, padding=1),
                "c2": conv(2, 2, 1),
            },
            [_m(0, "c0"), _m(1, "a0"), _m(2, "c1"), _m(3, "c2")],
            {"c1": [Hook("output", 0.5)]},
        ),
        (1, 2, 6, 6),
    ),
    # [3] the model writes its input in place: x.mul_(2.0), x.relu_(), nn.ReLU(inplace=True)
    "writes_input_then_conv_bn": lambda: _case(
        _net(
            {"c0": conv(2, 2, 3, padding=1), "b0": lambda: nn.BatchNorm2d(2)},
            [Step("inplace", (0,), ("mul_", 2.0)), _m(1, "c0"), _m(2, "b0")],
        ),
        (1, 2, 5, 5),
    ),
    "writes_input_then_linear": lambda: _case(
        nn.Sequential(InplaceOp("mul_", 2.0), nn.Linear(1, 1, bias=False)), (1, 1)
    ),
    "writes_input_pool_linear": lambda: _case(
        _net(
            {"fc0": lambda: nn.Linear(5, 1)},
            [
                Step("inplace", (0,), ("mul_", 2.0)),
                Step("global_pool", (1,)),
                Step("flatten", (2,)),
                _m(3, "fc0"),
            ],
        ),
        (1, 5, 6, 9),
    ),
    "inplace_relu_on_input_then_bn": lambda: _case(
        nn.Sequential(nn.ReLU(inplace=True), nn.BatchNorm2d(1)), (1, 1, 5, 5)
    ),
    # [3, 4] the first layer's input written between two layers, and read again later
    "write_between_linears": lambda: _case(
        _net(
            {"f0": lambda: nn.Linear(4, 8), "f1": lambda: nn.Linear(8, 3)},
            [_m(0, "f0"), Step("inplace", (0,), ("mul_", 2.0)), _m(1, "f1")],
        ),
        (2, 4),
    ),
    "write_between_convs_read_later": lambda: _case(
        _net(
            {"c0": conv(2, 2, 1), "c1": conv(2, 2, 1)},
            [_m(0, "c0"), Step("inplace", (0,), ("mul_", 2.0)), _m(1, "c1"), Step("add", (3, 0))],
        ),
        (1, 2, 4, 4),
    ),
    # [5] residual forks at a pruned unit: h = act([bn](conv_a(x))); out = [f](conv_b(h)) + h
    "fork_at_pruned_unit": lambda: _case(
        _net(
            {
                "ca": conv(3, 3, 3, padding=1),
                "ba": lambda: nn.BatchNorm2d(3),
                "aa": nn.SiLU,
                "cb": conv(3, 3, 3, padding=1),
                "ab": nn.Tanh,
            },
            [_m(0, "ca"), _m(1, "ba"), _m(2, "aa"), _m(3, "cb"), _m(4, "ab"), Step("add", (5, 3))],
        ),
        (1, 3, 6, 6),
    ),
    "fork_plain": lambda: _case(
        _net(
            {"ca": conv(2, 2, 3, padding=1), "aa": nn.ReLU, "cb": conv(2, 2, 3, padding=1)},
            [_m(0, "ca"), _m(1, "aa"), _m(2, "cb"), Step("add", (2, 3))],
        ),
        (1, 2, 6, 6),
    ),
    "fork_1x1_then_padded_conv": lambda: _case(
        _net(
            {
                "ca": conv(2, 2, 3, padding=1),
                "ba": lambda: nn.BatchNorm2d(2),
                "aa": nn.ReLU,
                "cb": conv(2, 2, 1),
                "cc": conv(2, 2, 3, padding=1),
            },
            [_m(0, "ca"), _m(1, "ba"), _m(2, "aa"), _m(3, "cb"), Step("add", (4, 3)), _m(5, "cc")],
        ),
        (1, 2, 6, 6),
    ),
    "fork_projection_then_padded_conv": lambda: _case(
        _net(
            {
                "ca": conv(2, 2, 3, padding=1),
                "ba": lambda: nn.BatchNorm2d(2),
                "aa": nn.ReLU,
                "cb": conv(2, 3, 1),
                "pr": conv(2, 3, 1),
                "cc": conv(3, 3, 3, padding=1),
            },
            [
                _m(0, "ca"),
                _m(1, "ba"),
                _m(2, "aa"),
                _m(3, "cb"),
                _m(3, "pr"),
                Step("add", (4, 5)),
                _m(6, "cc"),
            ],
        ),
        (1, 2, 6, 6),
    ),
    # [9] RepVGG: relu(bn(conv3x3(x)) + bn(conv1x1(x)) + bn(x)), and a BN with no conv before it
    "repvgg_block": lambda: _case(
        _net(
            {
                "c3": conv(3, 3, 3, padding=1, bias=False),
                "b3": lambda: nn.BatchNorm2d(3),
                "c1": conv(3, 3, 1, bias=False),
                "b1": lambda: nn.BatchNorm2d(3),
                "bi": lambda: nn.BatchNorm2d(3),
            },
            [
                _m(0, "c3"),
                _m(1, "b3"),
                _m(0, "c1"),
                _m(3, "b1"),
                _m(0, "bi"),
                Step("add", (2, 4)),
                Step("add", (6, 5)),
                Step("relu", (7,)),
            ],
        ),
        (1, 3, 6, 6),
    ),
    "bn_on_the_input": lambda: _case(
        _net(
            {"b0": lambda: nn.BatchNorm2d(2), "c0": conv(2, 3, 3, padding=1)},
            [_m(0, "b0"), _m(1, "c0")],
        ),
        (1, 2, 5, 5),
    ),
    # [6] a residual add of 1-D tensors (a linear layer on an unbatched input)
    "add_of_1d_tensors": lambda: _case(
        _net({"f0": lambda: nn.Linear(4, 4)}, [_m(0, "f0"), Step("add", (1, 0))]), (4,)
    ),
    # (new) a model with no latency at all: budget < 1 divided by zero in optimize
    "identity_only": lambda: _case(nn.Sequential(nn.Identity()), (1, 1, 5, 5)),
}

#: Cases for the budget < 1 property, with the (budget, methods) that reach the bug.
BELOW_ONE = {
    "fork_at_pruned_unit": (0.5, ("merge", "prune")),
    "fork_plain": (0.5, ("merge", "prune")),
    "fork_1x1_then_padded_conv": (0.5, ("merge", "prune")),
    "fork_projection_then_padded_conv": (0.5, ("merge", "prune")),
    "hooked_conv_below_one": (0.5, ("merge",)),
    "writes_input_then_conv_bn": (0.5, ("merge", "prune")),
    "write_between_convs_read_later": (0.5, ("merge", "prune")),
    "identity_only": (0.5, ("merge",)),
    "repvgg_block": (0.5, ("merge", "prune", "drop")),
}
#: Cases for the chain property (nn.Sequential models).
CHAINS = (
    "unbatched_conv1d_bn",
    "unbatched_conv2d_bn1d",
    "unbatched_conv_chain_bn",
    "writes_input_then_linear",
    "inplace_relu_on_input_then_bn",
    "identity_only",
)


def with_examples(names, extra=None):
    """Decorate a property with the named hand-written cases as ``@example`` s (``extra``
    maps a name to the further arguments of its example)."""

    def decorate(test):
        for name in reversed(list(names)):
            test = example(EXAMPLES[name](), *(extra or {}).get(name, ()))(test)
        return test

    return decorate


# ------------------------------------------------------------------------------------------
# Hostile properties
# ------------------------------------------------------------------------------------------


def check_exact(model, x, step):
    out = guarded(model, x, step)
    if out is not None:
        assert_equivalent(out, model, x)  # the original model, run eagerly on a copy of x
        before = x.clone()
        assert_equivalent(out, model, x)  # running the result does not write the input either
        assert torch.equal(x, before)


@settings(max_examples=1000 if LONG else 80)
@with_examples(EXAMPLES)
@given(graphs(dtype=torch.float64, **HOSTILE))
def test_hostile_graphs_budget_one_is_the_original_or_a_clean_error(case):
    model, x = case
    check_exact(
        model,
        x,
        lambda: fxcompress.optimize(model, 1.0, example_inputs=x, latency="flops", progress=False),
    )


@settings(max_examples=800 if LONG else 60)
@with_examples(EXAMPLES)
@given(graphs(dtype=torch.float64, **HOSTILE))
def test_hostile_graphs_merge_and_fold_batchnorm_are_the_original(case):
    model, x = case
    gm = guarded(model, x, lambda: fxcompress.capture(model, x))
    if gm is None:
        return
    assert_equivalent(gm, model, x)
    check_exact(model, x, lambda: merge(gm))
    check_exact(model, x, lambda: fold_batchnorm(gm))


@settings(max_examples=800 if LONG else 80)
@with_examples(BELOW_ONE, BELOW_ONE)
@given(graphs(max_steps=6, dtype=torch.float64, **HOSTILE), st.floats(0.05, 0.999), METHODS)
def test_hostile_graphs_below_one_relaxed_equals_merged_or_a_clean_error(case, budget, methods):
    model, x = case
    kw = {"latency": "flops", "methods": methods, "progress": False}
    plan = guarded(model, x, lambda: make_plan(model, budget, x, **kw))
    if plan is None:
        return
    assert plan.predicted_ms <= budget * plan.original_ms * (1 + 1e-9)
    relaxed = guarded(model, x, lambda: fxcompress.relax(model, plan, x))
    if relaxed is None:
        return
    before = x.clone()
    assert_equivalent(merge(relaxed), relaxed, x)
    out = guarded(model, x, lambda: fxcompress.optimize(model, budget, example_inputs=x, **kw))
    if out is not None:
        assert_equivalent(out, relaxed, x)
    assert torch.equal(x, before)


def hostile_chains():
    conv = st.sampled_from((1, 2)).flatmap(
        lambda ndim: conv_chains(ndim=ndim, max_convs=3, dtype=torch.float64, **HOSTILE)
    )
    linear = linear_chains(max_layers=3, dtype=torch.float64, **HOSTILE)
    return st.one_of(conv, linear)


@settings(max_examples=600 if LONG else 80)
@with_examples(CHAINS)
@given(hostile_chains())
def test_hostile_chains_are_the_original_or_a_clean_error(case):
    """Conv chains (1-D and 2-D) and linear chains with hooks, in-place layers and unbatched
    inputs (a BatchNorm after an unbatched conv normalises a spatial axis): optimize at 1.0,
    merge and fold_batchnorm."""
    model, x = case
    check_exact(
        model,
        x,
        lambda: fxcompress.optimize(model, 1.0, example_inputs=x, latency="flops", progress=False),
    )
    gm = guarded(model, x, lambda: fxcompress.capture(model, x))
    if gm is None:
        return
    check_exact(model, x, lambda: merge(gm))
    check_exact(model, x, lambda: fold_batchnorm(gm))


def _site_activation(model, first):
    """The step index of the activation after the layer module ``first`` (through BatchNorm,
    Dropout and Identity modules, each value read once), or None."""
    calls = [i for i, s in enumerate(model.steps, start=1) if s.op == "module" and s.arg == first]
    if len(calls) != 1:
        return None
    v = calls[0]
    while True:
        users = [i for i, s in enumerate(model.steps, start=1) if v in s.inputs]
        if len(users) != 1 or users[0] in model.outputs:
            return None
        v = users[0]
        step = model.steps[v - 1]
        if step.op in ("relu", "relu_method"):
            return v
        if step.op != "module":
            return None
        module = model.get_submodule(step.arg)
        if not isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.Dropout, nn.Identity)):
            return v


def _linearised(model, firsts):
    """``model`` with the activation after each layer in ``firsts`` replaced by ``x * 1.0``."""
    ref = copy.deepcopy(model)
    steps = list(ref.steps)
    for first in firsts:
        v = _site_activation(model, first)
        steps[v - 1] = Step("scale", steps[v - 1].inputs, 1.0)
    ref.steps = tuple(steps)
    return ref


EXAMPLES["write_between_linears_with_activation"] = lambda: _case(
    _net(
        {"f0": lambda: nn.Linear(4, 8), "a0": nn.ReLU, "f1": lambda: nn.Linear(8, 3)},
        [_m(0, "f0"), _m(1, "a0"), Step("inplace", (0,), ("mul_", 2.0)), _m(2, "f1")],
    ),
    (2, 4),
)


def _unbatched_collapse_site():
    """Item 1 in collapse: conv -> BatchNorm1d(H) -> relu -> 1x1 conv on a (C, H, W) input with
    C == H: the BN normalises H, so it must not be folded into the conv per channel."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GeneratedModel(
            {
                "c0": nn.Conv2d(2, 4, 1),
                "b0": nn.BatchNorm1d(4),
                "a0": nn.ReLU(),
                "c1": nn.Conv2d(4, 3, 1),
            },
            [_m(0, "c0"), _m(1, "b0"), _m(2, "a0"), _m(3, "c1")],
            unbatched=True,
        )
    return _case(model, (2, 4, 6))


@settings(max_examples=400 if LONG else 30)
@example(EXAMPLES["write_between_linears_with_activation"](), 0)
@example(EXAMPLES["hooked_relu"](), 0)
@example(_unbatched_collapse_site(), 0)
@given(
    st.one_of(
        graphs(dtype=torch.float64, head=True, inplace=True),
        graphs(dtype=torch.float64, head=True, unbatched=True),
        graphs(dtype=torch.float64, head=True, **HOSTILE),
    ),
    st.integers(0, 2**8 - 1),
)
def test_hostile_graphs_collapse_at_slope_1_is_exact_or_a_clean_error(case, mask):
    """LayerCollapse on hostile graphs: ``prepare`` keeps the function, and ``apply`` with the
    chosen sites' slopes at 1 equals the original model with those activations replaced by the
    identity (item 4: a collapsed run's layer must read its input where the first layer did)."""
    model, x = case
    prepared = guarded(model, x, lambda: collapse.prepare(model, x, sites="all"))
    if prepared is None:
        return
    assert_equivalent(prepared, model, x)  # every slope at 0: the original function
    sites = prepared.meta["fxcompress.collapse.sites"]
    eligible = [site for site in sites if _site_activation(model, site.first) is not None]
    assume(eligible)  # (models without a site still checked prepare above)
    chosen = [site for i, site in enumerate(eligible) if mask >> (i % 8) & 1] or eligible
    event(f"sites linearised: {min(len(chosen), 2)}{'+' if len(chosen) >= 2 else ''}")
    with torch.no_grad():
        for site in chosen:
            prepared.get_submodule(site.name).slope.fill_(1.0)
    out = guarded(model, x, lambda: collapse.apply(prepared, tol=0.0))
    if out is None:
        return
    reference = _linearised(model, [site.first for site in chosen])
    before = x.clone()
    assert_equivalent(out, reference, x)
    assert torch.equal(x, before)


@pytest.mark.parametrize("seed", range(3))
def test_shared_modules_called_twice_stay_exact(seed):
    """A conv called twice with a BN after one call site only (torch.fx fuser bug class)."""
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    bn = torch.nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = conv, bn

        def forward(self, x):
            return self.conv(torch.relu(self.bn(self.conv(x))))

    m = M().eval()
    x = torch.randn(1, 4, 6, 6)
    for b in (1.0, 0.5):
        try:
            out = fxcompress.optimize(m, b, example_inputs=x, latency="flops", progress=False)
        except InfeasibleBudget:
            continue
        if b == 1.0:
            assert_equivalent(out, m, x)
