"""Tests of fxcompress.canonicalize: every spelling of an activation becomes one canonical
functional call, in-place writes that someone observes stay, no-op layers go; the reference is
always the original model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from torch import fx, nn

from fxcompress import canonicalize, capture
from fxcompress.testing import ACTIVATION_MODULES, assert_equivalent, models


class Around(nn.Module):
    """conv -> activation (in the given spelling) -> conv."""

    def __init__(self, act):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 2, 1)
        if isinstance(act, nn.Module):
            self.act = act
            self.fn = None
        else:
            self.fn = act

    def forward(self, x):
        y = self.conv1(x)
        y = self.act(y) if self.fn is None else self.fn(y)
        return self.conv2(y)


# (spelling, canonical function, canonical keyword arguments); written out by hand
SPELLINGS = [
    ("nn.ReLU", nn.ReLU(), F.relu, {}),
    ("nn.ReLU(inplace)", nn.ReLU(inplace=True), F.relu, {}),
    ("F.relu", F.relu, F.relu, {}),
    ("F.relu(inplace)", lambda y: F.relu(y, inplace=True), F.relu, {}),
    ("F.relu(y, True)", lambda y: F.relu(y, True), F.relu, {}),
    ("F.relu_", F.relu_, F.relu, {}),
    ("torch.relu", torch.relu, F.relu, {}),
    ("torch.relu_", torch.relu_, F.relu, {}),
    ("Tensor.relu", lambda y: y.relu(), F.relu, {}),
    ("Tensor.relu_", lambda y: y.relu_(), F.relu, {}),
    ("nn.ReLU6", nn.ReLU6(), F.relu6, {}),
    ("nn.ReLU6(inplace)", nn.ReLU6(inplace=True), F.relu6, {}),
    ("F.relu6", F.relu6, F.relu6, {}),
    ("F.hardtanh(0, 6)", lambda y: F.hardtanh(y, 0, 6), F.relu6, {}),
    ("F.hardtanh(0., 6., True)", lambda y: F.hardtanh(y, 0.0, 6.0, True), F.relu6, {}),
    ("nn.Hardtanh(0, 6)", nn.Hardtanh(0.0, 6.0), F.relu6, {}),
    ("nn.Hardtanh", nn.Hardtanh(), F.hardtanh, {}),
    ("F.hardtanh(-1, 1)", lambda y: F.hardtanh(y, -1.0, 1.0), F.hardtanh, {}),
    (
        "nn.Hardtanh(-2, 3)",
        nn.Hardtanh(-2.0, 3.0),
        F.hardtanh,
        {"min_val": -2.0, "max_val": 3.0},
    ),
    ("nn.GELU", nn.GELU(), F.gelu, {}),
    ("F.gelu(approximate='none')", lambda y: F.gelu(y, approximate="none"), F.gelu, {}),
    ("nn.GELU(tanh)", nn.GELU(approximate="tanh"), F.gelu, {"approximate": "tanh"}),
    ("F.gelu(tanh)", lambda y: F.gelu(y, approximate="tanh"), F.gelu, {"approximate": "tanh"}),
    ("nn.LeakyReLU", nn.LeakyReLU(), F.leaky_relu, {}),
    ("nn.LeakyReLU(0.2)", nn.LeakyReLU(0.2), F.leaky_relu, {"negative_slope": 0.2}),
    (
        "F.leaky_relu(0.2, True)",
        lambda y: F.leaky_relu(y, 0.2, True),
        F.leaky_relu,
        {"negative_slope": 0.2},
    ),
    ("nn.ELU(0.5)", nn.ELU(0.5), F.elu, {"alpha": 0.5}),
    ("F.elu", F.elu, F.elu, {}),
    ("nn.Hardswish", nn.Hardswish(), F.hardswish, {}),
    ("F.hardswish(inplace)", lambda y: F.hardswish(y, inplace=True), F.hardswish, {}),
    ("nn.Hardsigmoid", nn.Hardsigmoid(), F.hardsigmoid, {}),
    ("nn.SiLU", nn.SiLU(), F.silu, {}),
    ("nn.SiLU(inplace)", nn.SiLU(inplace=True), F.silu, {}),
    ("F.silu", F.silu, F.silu, {}),
    ("nn.Mish", nn.Mish(), F.mish, {}),
    ("nn.Sigmoid", nn.Sigmoid(), torch.sigmoid, {}),
    ("torch.sigmoid", torch.sigmoid, torch.sigmoid, {}),
    ("F.sigmoid", F.sigmoid, torch.sigmoid, {}),
    ("Tensor.sigmoid", lambda y: y.sigmoid(), torch.sigmoid, {}),
    ("Tensor.sigmoid_", lambda y: y.sigmoid_(), torch.sigmoid, {}),
    ("nn.Tanh", nn.Tanh(), torch.tanh, {}),
    ("Tensor.tanh", lambda y: y.tanh(), torch.tanh, {}),
    ("F.tanh", F.tanh, torch.tanh, {}),
]


def activation_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    conv1 = next(n for n in gm.graph.nodes if n.target == "conv1")
    conv2 = next(n for n in gm.graph.nodes if n.target == "conv2")
    (act,) = list(conv2.all_input_nodes)
    assert act is not conv1
    return [act]


@pytest.mark.parametrize(
    ("spelling", "act", "function", "kwargs"), SPELLINGS, ids=[s[0] for s in SPELLINGS]
)
def test_every_spelling_becomes_the_canonical_functional(spelling, act, function, kwargs):
    torch.manual_seed(0)
    model = Around(act).eval()
    x = torch.randn(2, 3, 5, 5) * 4  # reach both sides of every kink (hardtanh, relu6, ...)
    gm = capture(model, x)
    code_before = gm.code
    out = canonicalize(gm)

    (node,) = activation_nodes(out)
    assert node.op == "call_function"
    assert node.target is function
    assert node.args == (next(n for n in out.graph.nodes if n.target == "conv1"),)
    assert dict(node.kwargs) == kwargs
    assert not any(n.op == "call_module" and n.target == "act" for n in out.graph.nodes)
    assert_equivalent(out, model, x)
    assert gm.code == code_before  # the input GraphModule is not modified


def test_canonical_graphs_are_a_fixed_point():
    model = Around(nn.GELU(approximate="tanh")).eval()
    x = torch.randn(1, 3, 4, 4)
    once = canonicalize(capture(model, x))
    twice = canonicalize(once)
    assert twice.code == once.code


class ReadAgain(nn.Module):
    """An in-place activation whose written tensor is observed afterwards, in several ways."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.conv1 = nn.Conv2d(3, 4, 1)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.conv1(x)
        if self.how == "module":
            z = self.relu(y)
            return self.conv2(z) + y
        if self.how == "functional":
            z = F.relu(y, inplace=True)
            return self.conv2(z), y
        if self.how == "statement":
            y.relu_()  # result unused: only the write matters
            return self.conv2(y)
        if self.how == "view":
            y[:, :2].relu_()  # writes half of y through a view
            return self.conv2(y)
        if self.how == "view_read_later":
            flat = y.flatten(1)
            z = torch.relu_(y)
            return self.conv2(z).flatten(1) + flat
        if self.how == "input":
            x.relu_()  # writes the caller's tensor
            return self.conv1(x)
        raise AssertionError(self.how)


@pytest.mark.parametrize(
    "how", ["module", "functional", "statement", "view", "view_read_later", "input"]
)
def test_observed_in_place_activations_stay_in_place(how):
    model = ReadAgain(how).eval()
    x = torch.randn(2, 3, 4, 4)
    out = canonicalize(capture(model, x))
    # reference: the original model (given its own copy of the input, which it may write)
    with torch.no_grad():
        expected = model(x.clone())
        x_for_graph = x.clone()
        got = out(x_for_graph)
    assert_equivalent(lambda _: got, lambda _: expected, x)
    if how == "input":
        assert torch.equal(x_for_graph, x.relu())  # the write into the input survives


def test_unobserved_in_place_activation_becomes_out_of_place():
    model = Around(nn.ReLU(inplace=True)).eval()
    out = canonicalize(capture(model, torch.randn(1, 3, 4, 4)))
    assert not any(n.op == "call_module" and n.target == "act" for n in out.graph.nodes)


class WithNoOps(nn.Module):
    def __init__(self, explicit_training=False):
        super().__init__()
        self.explicit_training = explicit_training
        self.conv = nn.Conv2d(3, 4, 1)
        self.drop = nn.Dropout(0.5)
        self.drop2d = nn.Dropout2d(0.3)
        self.alpha = nn.AlphaDropout(0.2)
        self.ident = nn.Identity()

    def forward(self, x):
        y = self.ident(self.drop(self.conv(x)))
        y = self.alpha(self.drop2d(y))
        y = F.dropout(y, 0.5, self.training)
        if self.explicit_training:
            y = F.dropout(y, 0.5, training=True)  # random even in eval mode: not a no-op
        return y


def test_dropout_and_identity_are_removed_in_eval():
    model = WithNoOps()
    model.train()  # capture makes an eval copy; the caller's flag stays
    x = torch.randn(2, 3, 4, 4)
    out = canonicalize(capture(model, x))
    ops = [(n.op, n.target) for n in out.graph.nodes if n.op not in ("placeholder", "output")]
    assert ops == [("call_module", "conv")]
    assert [e["kind"] for e in out.meta["fxcompress.events"]].count("drop") == 5
    assert_equivalent(out, model, x)
    assert model.training


def test_dropout_kept_when_asked_or_when_it_really_drops():
    x = torch.randn(2, 3, 4, 4)
    kept = canonicalize(capture(WithNoOps(), x), drop_dropout=False)
    assert {"drop", "drop2d", "alpha", "ident"} <= {
        n.target for n in kept.graph.nodes if n.op == "call_module"
    }
    live = canonicalize(capture(WithNoOps(explicit_training=True), x, check=False))
    assert any(
        n.op == "call_function" and n.target is F.dropout and n.kwargs.get("training") is True
        for n in live.graph.nodes
    )


MODULE_ACTIVATIONS = tuple(type(make()) for make in ACTIVATION_MODULES)


@given(models())
def test_random_models_keep_their_outputs(case):
    model, x = case
    gm = capture(model, x)
    reference = copy.deepcopy(gm)
    out = canonicalize(gm)
    assert_equivalent(out, model, x)
    assert_equivalent(gm, reference, x)  # the input is not modified
    assert gm.code == reference.code
    # generated models only apply activations to fresh tensors: none stays a module/method call
    for node in out.graph.nodes:
        if node.op == "call_module":
            assert not isinstance(out.get_submodule(str(node.target)), MODULE_ACTIVATIONS)
        assert not (node.op == "call_method" and node.target in ("relu", "relu_"))
