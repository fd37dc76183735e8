"""Tests of fxcompress.capture.

References are independent of the code under test: shapes come from forward hooks on the
original model, equivalence from running the original model, shared modules from the program of
a generated model.
"""

from __future__ import annotations

import copy
import inspect
import operator

import pytest
import torch
from hypothesis import given
from torch import fx, nn

from fxcompress import CaptureError, FxCompressError, InvalidArgument, capture
from fxcompress.testing import GeneratedModel, assert_equivalent, models


def hooked_shapes(model: nn.Module, x: torch.Tensor) -> dict[str, list[tuple[int, ...]]]:
    """Output shapes of every leaf submodule call, recorded by hooks on the original model."""
    shapes: dict[str, list[tuple[int, ...]]] = {}
    handles = []
    for name, mod in model.named_modules():
        if name and not list(mod.children()):
            handles.append(
                mod.register_forward_hook(
                    lambda m, i, o, name=name: shapes.setdefault(name, []).append(tuple(o.shape))
                )
            )
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return shapes


# ------------------------------------------------------------------------------------------
# Shapes, copies, shared modules
# ------------------------------------------------------------------------------------------


@given(models(multiple_outputs=True))
def test_shapes_are_recorded_on_every_node(case):
    model, x = case
    gm = capture(model, x)
    expected = hooked_shapes(model, x)
    seen: dict[str, list[tuple[int, ...]]] = {}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "call_module", "call_function", "call_method"):
            meta = node.meta.get("tensor_meta")
            assert meta is not None, node.format_node()
            if node.op == "placeholder":
                assert tuple(meta.shape) == tuple(x.shape)
                assert meta.dtype == x.dtype
        if node.op == "call_module":
            seen.setdefault(str(node.target), []).append(tuple(node.meta["tensor_meta"].shape))
    assert seen == expected
    assert_equivalent(gm, model, x)


@given(models())
def test_shared_modules_are_listed(case):
    model, x = case
    names = [s.arg for s in model.steps if s.op == "module"]
    expected = sorted(
        n for n in set(names) if names.count(n) > 1 and list(model.get_submodule(n).parameters())
    )
    assert list(capture(model, x).meta["fxcompress.shared"]) == expected


def test_shared_module_detection_ignores_parameterless_modules():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)
            self.act = nn.ReLU()
            self.other = nn.Conv2d(2, 2, 1)

        def forward(self, x):
            return self.act(self.conv(self.act(self.conv(self.other(x)))))

    gm = capture(Net(), torch.randn(1, 2, 5, 5))
    assert gm.meta["fxcompress.shared"] == ("conv",)


def test_capture_is_an_eval_deep_copy_and_leaves_the_model_alone():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.ReLU(), nn.Conv2d(4, 2, 1)
    )
    model.train()
    model[1].eval()  # a mixed training state must survive as it is
    x = torch.randn(2, 3, 6, 6)
    flags = [m.training for m in model.modules()]
    before = copy.deepcopy(model.state_dict())

    gm = capture(model, x)

    assert [m.training for m in model.modules()] == flags
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(m.training for m in gm.modules())
    model_ptrs = {p.data_ptr() for p in model.state_dict().values()}
    assert not model_ptrs & {p.data_ptr() for p in gm.state_dict().values()}
    with torch.no_grad():
        for p in gm.parameters():
            p.add_(1.0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_capture_does_not_write_the_callers_inputs():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)

        def forward(self, x):
            x.relu_()
            return self.conv(x)

    x = torch.randn(1, 2, 4, 4)
    original = x.clone()
    gm = capture(InPlace(), x)
    assert torch.equal(x, original)
    assert gm.graph.find_nodes(op="call_method", target="relu_")


# ------------------------------------------------------------------------------------------
# Untraceable models
# ------------------------------------------------------------------------------------------


class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return -x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 3, padding=1)
        self.block = nn.Sequential(nn.ReLU(), Gate())

    def forward(self, x):
        return self.block(self.stem(x)) * 2


GATE_LINE = inspect.getsourcelines(Gate.forward)[1] + 1


def test_untraceable_submodule_is_named_with_class_line_and_fix():
    with pytest.raises(CaptureError) as info:
        capture(Net(), torch.randn(1, 3, 4, 4))
    message = str(info.value)
    assert "'block.1'" in message
    assert "Gate" in message
    assert f"{__file__}:{GATE_LINE}" in message
    assert "if x.sum() > 0:" in message
    assert "leaf_modules=('block.1',)" in message
    assert "leaf_modules=(Gate,)" in message
    assert isinstance(info.value, FxCompressError)


@pytest.mark.parametrize("leaf", ["block.1", Gate])
def test_leaf_modules_make_it_traceable(leaf):
    model = Net().eval()
    x = torch.randn(1, 3, 4, 4)
    gm = capture(model, x, leaf_modules=(leaf,))
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"][-1] == "block.1"
    for sign in (1.0, -1.0):  # both sides of the data-dependent branch still work
        y = torch.full((1, 3, 4, 4), sign) + 0.1 * torch.randn(1, 3, 4, 4)
        assert_equivalent(gm, model, y)


def test_untraceable_top_level_forward():
    class Top(nn.Module):
        def forward(self, x):
            return x if x.max() > 0 else -x

    with pytest.raises(CaptureError, match=r"top-level module \(Top\).*leaf_modules"):
        capture(Top(), torch.randn(2))


def test_trace_that_computes_something_else_is_refused():
    """torch.fx traces ``a += b`` on a proxy as ``a + b`` bound to a new name, so a model that
    reads the updated tensor through another name traces to a different function."""

    class Alias(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(2, 2, 1)
            self.b = nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x):
            y = self.a(x)
            alias = y
            y += self.b(y)
            return self.a(alias)

    model = Alias().eval()
    x = torch.randn(1, 2, 5, 5)
    with pytest.raises(CaptureError, match="does not compute what the model computes"):
        capture(model, x)
    gm = capture(model, x, check=False)  # the documented escape hatch
    assert gm.graph.find_nodes(op="call_function", target=operator.add)


# ------------------------------------------------------------------------------------------
# Bad arguments
# ------------------------------------------------------------------------------------------

MODEL = nn.Sequential(nn.Conv2d(3, 4, 3))


@pytest.mark.parametrize(
    ("inputs", "fragment"),
    [
        (None, "example_inputs=None (type=NoneType)"),
        ((), "example_inputs=() (type=tuple)"),
        ("x", "example_inputs='x' (type=str)"),
        (3, "example_inputs=3 (type=int)"),
        ((torch.ones(1, 3, 4, 4), "a"), "example_inputs[1]='a' (type=str)"),
        ([[torch.ones(1)], {"k": 1.5}], "example_inputs[1]['k']=1.5 (type=float)"),
    ],
)
def test_bad_example_inputs_name_the_value_and_type(inputs, fragment):
    with pytest.raises(InvalidArgument) as info:
        capture(MODEL, inputs)
    assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)


def test_too_many_inputs_and_wrong_shapes():
    with pytest.raises(InvalidArgument, match="2 tensors but the model's forward takes 1"):
        capture(MODEL, (torch.ones(1, 3, 4, 4), torch.ones(1)))
    with pytest.raises(CaptureError, match="failed on the example inputs"):
        capture(MODEL, torch.ones(1, 5, 4, 4))


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"model": "resnet"}, "model='resnet' (type=str)"),
        ({"leaf_modules": (3,)}, "3 (type=int)"),
        ({"leaf_modules": ("nope",)}, "'nope', which is not a submodule"),
    ],
)
def test_bad_model_and_leaf_modules(kwargs, fragment):
    args = {"model": MODEL, "example_inputs": torch.ones(1, 3, 4, 4), **kwargs}
    with pytest.raises(InvalidArgument) as info:
        capture(args.pop("model"), args.pop("example_inputs"), **args)
    assert fragment in str(info.value)


def test_generated_models_capture_as_graph_modules():
    model = GeneratedModel({"c": nn.Conv2d(1, 1, 1)}, [])
    gm = capture(model, torch.ones(1, 1, 2, 2))
    assert isinstance(gm, fx.GraphModule)
    assert gm.meta["fxcompress.shared"] == ()


# --------------------------------------------------------------------------- hooks (issue 15)


def _plus_one(module, inputs, output):
    return output + 1


def test_hooked_submodules_are_opaque_leaves_listed_with_their_hooks():
    from fxcompress.graph.capture import Hooked

    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), nn.ReLU(), nn.Conv2d(4, 4, 1)
    ).eval()
    model[0].register_forward_hook(_plus_one)  # a block: traced through, its hook would be lost
    model[1].register_forward_pre_hook(lambda m, i: (i[0] - 0.5,))
    x = torch.randn(1, 3, 8, 8)
    gm = capture(model, x)
    assert_equivalent(gm, model, x)
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert calls == ["0", "1", "2"]  # nothing inside the hooked block is traced
    assert isinstance(gm.get_submodule("0"), Hooked)
    assert isinstance(gm.get_submodule("1"), Hooked)
    hooked = gm.meta["fxcompress.hooked"]
    assert hooked["0"] == ["forward hook _plus_one"]
    assert hooked["1"][0].startswith("forward pre-hook ")
    assert "2" not in hooked
    # a hooked module captured again (e.g. an optimize result) stays as it is
    again = capture(gm, x)
    assert_equivalent(again, model, x)
    assert set(again.meta["fxcompress.hooked"]) == {"0", "1"}
    assert not isinstance(again.get_submodule("0").module, Hooked)


def test_a_model_that_cannot_be_copied_gets_a_capture_error():
    """weight_norm leaves a computed weight, which deepcopy refuses (a raw RuntimeError before)."""
    model = nn.Sequential(nn.utils.weight_norm(nn.Conv2d(3, 4, 3)), nn.ReLU())
    with pytest.raises(CaptureError, match=r"cannot be copied.*remove_weight_norm"):
        capture(model, torch.randn(1, 3, 8, 8))


def test_a_wrong_shape_error_is_one_line_with_the_cause_and_prints_nothing(capfd):
    with pytest.raises(CaptureError) as info:
        capture(MODEL, torch.ones(1, 5, 4, 4))
    message = str(info.value)
    assert "expected input[1, 5, 4, 4] to have 3 channels, but got 5 channels" in message
    assert "\n" not in message
    assert info.value.__cause__ is None
    assert capfd.readouterr().err == ""
