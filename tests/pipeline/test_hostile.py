"""Hostile and unusual inputs (issue 8): each input class gets either the exact result or a clear
error naming the value; nothing is unpickled when plans, reports and tables are loaded."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress import CaptureError, InfeasibleBudget, InvalidArgument
from fxcompress.testing import assert_equivalent


def conv_bn(cin: int = 3, cout: int = 4) -> nn.Sequential:
    bn = nn.BatchNorm2d(cout)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), bn)


def exact(model, inputs, **kw):
    return fxcompress.optimize(model, 1.0, example_inputs=inputs, latency="flops", **kw)


class NestedOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = conv_bn(), conv_bn(4, 4)

    def forward(self, x):
        y = self.a(x)
        return {"logits": self.b(y), "aux": (y, [y.mean()])}


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = conv_bn(), conv_bn(2, 4)

    def forward(self, x, y, scale=None):  # keyword input with a default
        out = self.a(x) + self.b(y)
        return out if scale is None else out * scale


def test_nested_dict_tuple_list_outputs_are_exact():
    model = NestedOutputs().eval()
    x = torch.randn(2, 3, 8, 8)
    assert_equivalent(exact(model, x), model, x)


def test_several_inputs_and_a_keyword_input_left_at_its_default():
    model = TwoInputs().eval()
    inputs = (torch.randn(1, 3, 6, 6), torch.randn(1, 2, 6, 6))
    out = exact(model, inputs)
    assert_equivalent(out, model, inputs)


@pytest.mark.parametrize(
    ("dtype", "rtol"), [(torch.float64, 1e-9), (torch.float16, 2e-2), (torch.bfloat16, 1e-1)]
)
def test_other_dtypes(dtype, rtol):
    model = nn.Sequential(conv_bn(), nn.ReLU(), conv_bn(4, 4)).eval().to(dtype)
    x = torch.randn(1, 3, 8, 8, dtype=dtype)
    out = exact(model, x)
    assert all(p.dtype == dtype for p in out.parameters())
    assert_equivalent(out, model, x, rtol=rtol)


def test_channels_last_model_and_input():
    model = nn.Sequential(conv_bn(), nn.ReLU(), conv_bn(4, 4)).eval()
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    assert_equivalent(exact(model, x), model, x)


def test_parameters_on_another_device_than_the_inputs_is_a_clear_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3)).to("meta")
    with pytest.raises((CaptureError, InvalidArgument)) as info:
        exact(model, torch.randn(1, 3, 8, 8))
    assert "meta" in str(info.value) or "device" in str(info.value)


def test_frozen_parameters():
    model = nn.Sequential(conv_bn(), nn.ReLU(), conv_bn(4, 4)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(1, 3, 8, 8)
    assert_equivalent(exact(model, x), model, x)
    assert not any(p.requires_grad for p in model.parameters())  # the caller's flags stay


def test_model_without_any_conv_or_linear():
    model = nn.Sequential(nn.ReLU(), nn.MaxPool2d(2), nn.Flatten()).eval()
    x = torch.randn(1, 3, 8, 8)
    assert_equivalent(exact(model, x), model, x)
    with pytest.raises(InfeasibleBudget):
        fxcompress.optimize(model, 0.5, example_inputs=x, latency="flops")


def test_empty_data_iterable_names_the_problem():
    with pytest.raises(InvalidArgument, match="empty"):
        fxcompress.optimize(conv_bn(), 0.5, data=[], latency="flops")
    with pytest.raises(InvalidArgument, match="empty"):
        fxcompress.optimize(conv_bn(), 0.5, data=iter(()), latency="flops")


def test_data_batches_that_are_not_tensors_name_the_problem():
    model = nn.Sequential(conv_bn(), nn.ReLU(), conv_bn(4, 4), nn.ReLU(), conv_bn(4, 4)).eval()
    x = torch.randn(1, 3, 8, 8)
    del x  # batches of another shape than example_inputs: see the issue note (api.py)
    with pytest.raises(InvalidArgument, match="data batches"):
        fxcompress.optimize(model, 0.5, data=[object()], latency="flops")


@pytest.mark.parametrize("bad", [{"fraction": 2.0}, {"speedup": 0.5}, {"latency_ms": -1.0}, {}])
def test_budget_objects_out_of_range_name_the_value(bad):
    with pytest.raises(InvalidArgument) as info:
        fxcompress.Budget(**bad)
    for value in bad.values():
        assert repr(value) in str(info.value)


# ------------------------------------------------------------------------------ nothing unsafe


class _Boom:
    def __reduce__(self):
        return (exec, ("import builtins; builtins.FXCOMPRESS_PWNED = True",))


def _forbid_pickle(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)


def test_plans_reports_and_tables_load_without_unpickling(tmp_path, monkeypatch):
    model = nn.Sequential(conv_bn(), nn.ReLU(), conv_bn(4, 4)).eval()
    x = torch.randn(1, 3, 8, 8)
    plan = fxcompress.plan(model, 0.7, x, latency="flops")
    out = fxcompress.optimize(model, 0.7, example_inputs=x, latency="flops")
    table = fxcompress.LatencyTable(mode="flops")
    table(fxcompress.OpSpec("add", (1, 8)))
    table_path = table.save(tmp_path / "table.json")
    report_json = out.meta["fxcompress"].to_json()
    _forbid_pickle(monkeypatch)
    assert fxcompress.Plan.from_json(plan.to_json()) == plan
    assert json.loads(report_json)["budget"] == 0.7
    assert dict(fxcompress.LatencyTable.load(table_path).entries) == dict(table.entries)


def test_saved_plan_weights_with_a_code_payload_are_refused(tmp_path):
    import builtins

    model = nn.Sequential(conv_bn(), nn.ReLU(), conv_bn(4, 4)).eval()
    x = torch.randn(1, 3, 8, 8)
    relaxed = fxcompress.relax(model, fxcompress.plan(model, 0.7, x, latency="flops"))
    fxcompress.save_plan(relaxed, tmp_path)
    torch.save({"payload": _Boom()}, tmp_path / "state.pt")  # a malicious state file
    with pytest.raises(pickle.UnpicklingError):
        fxcompress.load_plan(model, tmp_path)
    assert not hasattr(builtins, "FXCOMPRESS_PWNED")


def test_a_model_with_no_priced_work_meets_any_flops_budget():
    # found by the fuzzer: original_ms == 0 under latency="flops" divided by zero
    model = nn.Sequential(nn.Identity()).eval()
    x = torch.randn(2, 3)
    out = fxcompress.optimize(model, 0.5, example_inputs=x, latency="flops")
    assert_equivalent(out, model, x)


@pytest.mark.parametrize("conv", [nn.Conv1d, nn.Conv2d])
def test_unbatched_input_below_one_names_the_conv_and_the_fix(conv):
    # found by the fuzzer: the latency table's own shape error ("kernel_size must have 1
    # entries") reached the caller instead of the cause
    model = nn.Sequential(conv(2, 4, 3, padding=1), nn.ReLU(), conv(4, 4, 3, padding=1)).eval()
    x = torch.randn(2, *([6] * (2 if conv is nn.Conv2d else 1)))
    with pytest.raises(InvalidArgument, match=r"unbatched input of shape .*unsqueeze\(0\)"):
        fxcompress.optimize(model, 0.5, example_inputs=x, latency="flops")
