"""Tests of fxcompress.latency: op specs, the analytic model, measuring and the on-disk cache."""

from __future__ import annotations

import json
import logging
import math
import os
import time

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from fxcompress.errors import InvalidArgument
from fxcompress.latency.analytic import BYTES_PER_MS, MACS_PER_MS, OVERHEAD_MS, analytic_ms
from fxcompress.latency.cache import CACHE_FORMAT
from fxcompress.latency.measure import ForwardTimer
from fxcompress.latency.spec import ACTIVATIONS, OpSpec
from fxcompress.latency.table import SAVE_EVERY, LatencyTable

LOGGER = "fxcompress.latency"

CONV = OpSpec("conv", (1, 3, 8, 8), out_channels=8, kernel_size=3, padding=1)
ACT = OpSpec("act", (1, 16), activation="relu")
ADD = OpSpec("add", (1, 4, 4, 4))
LINEAR = OpSpec("linear", (2, 32), out_channels=16)


class FakeTimer:
    """A table's ``timer=``: counts calls, returns 1, 2, 3, ... ms."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.calls: list[tuple[int, ...]] = []
        self.fail_after = fail_after

    def __call__(self, module, inputs, *, repeats, warmup, sync):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RuntimeError("timer must not be called")
        self.calls.append(tuple(inputs[0].shape))
        return float(len(self.calls))


@pytest.fixture
def timer():
    return FakeTimer()


def forbid_timing() -> FakeTimer:
    """A timer for tables that must never time anything."""
    return FakeTimer(fail_after=0)


def tmp_files(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


# --------------------------------------------------------------------------------------------
# OpSpec


@pytest.mark.parametrize(
    ("op", "shape", "macs"),
    [
        # 3x3 same conv: 1*8*(8*8) outputs, each 3*9 MACs
        (CONV, (1, 8, 8, 8), 8 * 64 * 27),
        # strided, dilated, no bias: out = (10 - 2*2 - 1)//2 + 1 = 3
        (
            OpSpec("conv", (2, 4, 10, 10), out_channels=6, kernel_size=3, stride=2, dilation=2),
            (2, 6, 3, 3),
            2 * 6 * 9 * 4 * 9,
        ),
        # depthwise
        (
            OpSpec("conv", (1, 8, 5, 5), out_channels=8, kernel_size=3, padding=1, groups=8),
            (1, 8, 5, 5),
            8 * 25 * 9,
        ),
        # negative padding crops: H 9 -> 7 -> 5 outputs; W 9 + 2 -> 9 outputs
        (
            OpSpec("conv", (1, 3, 9, 9), out_channels=4, kernel_size=3, padding=(-1, 1)),
            (1, 4, 5, 9),
            4 * 45 * 27,
        ),
        # 1-d and 3-d
        (OpSpec("conv", (1, 2, 7), out_channels=3, kernel_size=(2,)), (1, 3, 6), 3 * 6 * 4),
        (
            OpSpec("conv", (1, 2, 3, 4, 5), out_channels=2, kernel_size=(1, 2, 3)),
            (1, 2, 3, 3, 3),
            2 * 27 * 2 * 6,
        ),
        (LINEAR, (2, 16), 2 * 32 * 16),
        (OpSpec("linear", (3, 5, 7), out_channels=2, bias=False), (3, 5, 2), 15 * 14),
        (ACT, (1, 16), 0),
        (OpSpec("add", (2, 3), activation="relu"), (2, 3), 0),
    ],
)
def test_output_shape_and_macs_by_hand(op, shape, macs):
    assert op.output_shape() == shape
    assert op.macs() == macs
    module, x = op.build()
    with torch.inference_mode():
        assert tuple(module(x).shape) == shape


def test_bytes_moved_by_hand():
    # input 192 + output 512 + weights 8*3*9 + bias 8, float32
    assert CONV.bytes_moved() == (192 + 512 + 216 + 8) * 4
    # two inputs and one output, float16, plus the prelu slope
    assert OpSpec("add", (2, 5), dtype="float16", activation="prelu").bytes_moved() == 31 * 2
    assert OpSpec("linear", (4, 8), out_channels=2, bias=False).bytes_moved() == (32 + 8 + 16) * 4


@st.composite
def conv_args(draw):
    nd = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2, 3]))
    return {
        "input_shape": (
            draw(st.integers(1, 2)),
            groups * draw(st.integers(1, 3)),
            *draw(st.lists(st.integers(1, 9), min_size=nd, max_size=nd)),
        ),
        "out_channels": groups * draw(st.integers(1, 3)),
        "groups": groups,
        "kernel_size": tuple(draw(st.lists(st.integers(1, 4), min_size=nd, max_size=nd))),
        "stride": tuple(draw(st.lists(st.integers(1, 3), min_size=nd, max_size=nd))),
        "padding": tuple(draw(st.lists(st.integers(-2, 2), min_size=nd, max_size=nd))),
        "dilation": tuple(draw(st.lists(st.integers(1, 2), min_size=nd, max_size=nd))),
        "bias": draw(st.booleans()),
        "activation": draw(st.sampled_from([None, *ACTIVATIONS])),
    }


@given(conv_args())
def test_conv_matches_module(args):
    spatial = [
        (size + 2 * p - d * (k - 1) - 1) // s + 1
        for size, k, s, p, d in zip(
            args["input_shape"][2:],
            args["kernel_size"],
            args["stride"],
            args["padding"],
            args["dilation"],
        )
    ]
    if min(spatial) < 1:
        with pytest.raises(InvalidArgument, match="spatial size"):
            OpSpec("conv", **args)
        return
    op = OpSpec("conv", **args)
    module, x = op.build()
    with torch.inference_mode():
        out = module(x)
    assert tuple(out.shape) == op.output_shape()
    weight = module.conv.weight
    assert op.macs() == weight.numel() * math.prod(out.shape[2:]) * x.shape[0]
    params = sum(p.numel() for p in module.parameters())
    assert op.bytes_moved() == (x.numel() + out.numel() + params) * 4


@given(
    st.lists(st.integers(1, 5), min_size=1, max_size=3),
    st.integers(1, 8),
    st.booleans(),
)
def test_linear_matches_module(shape, out_features, bias):
    op = OpSpec("linear", tuple(shape), out_channels=out_features, bias=bias)
    module, x = op.build()
    with torch.inference_mode():
        out = module(x)
    assert tuple(out.shape) == op.output_shape()
    assert op.macs() == module[0].weight.numel() * math.prod(shape[:-1])


def test_key_is_pinned_canonical_json():
    assert ACT.key() == (
        '{"activation":"relu","bias":true,"dilation":[],"dtype":"float32","groups":1,'
        '"input_shape":[1,16],"kernel_size":[],"kind":"act","out_channels":0,"padding":[],'
        '"stride":[]}'
    )
    assert json.loads(CONV.key()) == CONV.to_dict()


def test_equivalent_spellings_are_equal():
    a = OpSpec("conv", (1, 3, 8, 8), out_channels=8, kernel_size=3, padding=1)
    b = OpSpec(
        "conv",
        [1, 3, 8, 8],
        dtype="float",
        out_channels=8,
        kernel_size=(3, 3),
        stride=(1, 1),
        padding=[1, 1],
        dilation=1,
    )
    assert a == b
    assert hash(a) == hash(b)
    assert a.key() == b.key()
    assert OpSpec("act", (2,), dtype="torch.half", activation="tanh").dtype == "float16"


def test_keys_distinct_for_distinct_specs():
    base = {"input_shape": (1, 4, 8, 8), "out_channels": 4, "kernel_size": 3}
    variants = [
        {},
        {"input_shape": (2, 4, 8, 8)},
        {"dtype": "float16"},
        {"out_channels": 8},
        {"kernel_size": 1},
        {"stride": 2},
        {"padding": 1},
        {"padding": -1},
        {"dilation": 2},
        {"groups": 2},
        {"groups": 4},
        {"bias": False},
        {"activation": "relu"},
        {"activation": "relu6"},
    ]
    specs = [OpSpec("conv", **{**base, **v}) for v in variants]
    specs += [ACT, ADD, LINEAR, OpSpec("act", (1, 16), activation="gelu")]
    assert len({s.key() for s in specs}) == len(specs)
    assert len(set(specs)) == len(specs)


@pytest.mark.parametrize("op", [CONV, ACT, ADD, LINEAR, OpSpec("add", (3,), activation="mish")])
def test_dict_round_trip(op):
    data = json.loads(json.dumps(op.to_dict()))
    back = OpSpec.from_dict(data)
    assert back == op
    assert back.key() == op.key()
    assert isinstance(back.input_shape, tuple)


@pytest.mark.parametrize(
    ("data", "shown"),
    [
        ({"kind": "act", "input_shape": [1], "activation": "relu", "colour": 1}, "colour"),
        ({"input_shape": [1]}, "kind"),
        ([1, 2], "[1, 2]"),
    ],
)
def test_from_dict_rejects_bad_data(data, shown):
    with pytest.raises(InvalidArgument, match=shown):
        OpSpec.from_dict(data)


@pytest.mark.parametrize(
    ("kwargs", "shown"),
    [
        ({"kind": "pool", "input_shape": (1, 2)}, "'pool'"),
        ({"kind": "act", "input_shape": (1, 0), "activation": "relu"}, r"\(1, 0\)"),
        ({"kind": "act", "input_shape": (1, 2)}, "None"),
        ({"kind": "act", "input_shape": (1, 2), "activation": "swish"}, "'swish'"),
        ({"kind": "add", "input_shape": (1, 2), "dtype": "int64"}, "'int64'"),
        ({"kind": "add", "input_shape": (1, 2), "out_channels": 3}, "3"),
        ({"kind": "add", "input_shape": (1, 2), "bias": "yes"}, "'yes'"),
        ({"kind": "linear", "input_shape": (1, 2)}, "0"),
        ({"kind": "linear", "input_shape": (1, 2), "out_channels": 2, "stride": (2,)}, r"\(2,\)"),
        ({"kind": "conv", "input_shape": (1, 2, 5, 5), "out_channels": 2}, "kernel_size"),
        ({"kind": "conv", "input_shape": (1, 2), "out_channels": 2, "kernel_size": 1}, r"\(1, 2\)"),
        (
            {
                "kind": "conv",
                "input_shape": (1, 4, 5, 5),
                "out_channels": 6,
                "kernel_size": 1,
                "groups": 4,
            },
            "groups=4",
        ),
        (
            {
                "kind": "conv",
                "input_shape": (1, 2, 5, 5),
                "out_channels": 2,
                "kernel_size": 3,
                "stride": 0,
            },
            r"\(0, 0\)",
        ),
        (
            {
                "kind": "conv",
                "input_shape": (1, 2, 5, 5),
                "out_channels": 2,
                "kernel_size": (3, 3, 3),
            },
            r"\(3, 3, 3\)",
        ),
        (
            {
                "kind": "conv",
                "input_shape": (1, 2, 5, 5),
                "out_channels": 2,
                "kernel_size": 3,
                "padding": -2,
            },
            "spatial size",
        ),
        (
            {"kind": "conv", "input_shape": (1, 2, 5, 5), "out_channels": 2.0, "kernel_size": 3},
            "2.0",
        ),
    ],
)
def test_invalid_specs(kwargs, shown):
    with pytest.raises(InvalidArgument, match=shown):
        OpSpec(**kwargs)


def test_build_is_deterministic_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    m1, x1 = CONV.build()
    m2, x2 = CONV.build()
    assert torch.equal(state, torch.random.get_rng_state())
    assert torch.equal(x1, x2)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p1, p2)
    assert not m1.training
    _, other = OpSpec("conv", (1, 3, 8, 8), out_channels=8, kernel_size=3).build()
    assert not torch.equal(x1, other)  # seeded per spec


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation_builds_and_runs(activation):
    for op in (
        OpSpec("act", (1, 3, 4), activation=activation),
        OpSpec("conv", (1, 2, 4), out_channels=2, kernel_size=1, activation=activation),
    ):
        module, x = op.build()
        with torch.inference_mode():
            out = module(x)
        assert tuple(out.shape) == op.output_shape()
        assert torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------
# flops mode


def test_flops_mode_is_the_documented_formula_and_never_times():
    table = LatencyTable(mode="flops", timer=forbid_timing())
    ops = [CONV, ACT, ADD, LINEAR]
    values = table.many(ops)
    for op, ms in zip(ops, values):
        expected = op.macs() / MACS_PER_MS + op.bytes_moved() / BYTES_PER_MS + OVERHEAD_MS
        assert ms == pytest.approx(expected)
        assert table(op) == ms == analytic_ms(op)
    assert analytic_ms(CONV) == pytest.approx(13824 / 2e7 + 3712 / 5e6 + 0.005)


def test_flops_mode_is_monotonic_in_macs():
    table = LatencyTable(mode="flops", timer=forbid_timing())
    convs = [
        OpSpec("conv", (1, 16, 14, 14), out_channels=c, kernel_size=k, padding=k // 2)
        for c in (8, 16, 32)
        for k in (1, 3, 5)
    ]
    convs.sort(key=OpSpec.macs)
    values = table.many(convs)
    assert values == sorted(values)
    assert len(set(values)) == len(values)


# --------------------------------------------------------------------------------------------
# measure mode


def test_measures_tiny_ops_with_positive_finite_values():
    table = LatencyTable(repeats=3, warmup=1)
    values = table.many([CONV, ACT, ADD, LINEAR])
    assert all(math.isfinite(v) and v > 0 for v in values)
    assert len(table.entries) == 4


def test_time_forward_loops_small_ops_and_takes_median():
    calls = []
    module = nn.Identity()
    module.register_forward_hook(lambda *_: calls.append(1))
    ms = ForwardTimer()(module, (torch.zeros(1),), repeats=3, warmup=2, sync=lambda: None)
    assert ms > 0
    assert math.isfinite(ms)
    # warm-up, three calibration calls, then three runs of several calls each
    assert len(calls) > 2 + 3 + 3 * 2


def test_time_forward_stops_slow_ops_early():
    """A slow op (a large batch) is timed for a bounded time, not ``repeats`` full calls."""
    timer = ForwardTimer(max_op_s=0.05, max_warmup_s=0.01)
    calls = []

    class Slow(nn.Module):
        def forward(self, x):
            calls.append(1)
            time.sleep(0.02)
            return x

    ms = timer(Slow(), (torch.zeros(1),), repeats=30, warmup=5, sync=lambda: None)
    assert ms >= 20
    # one warm-up call, three calibration calls, then the minimum of five timed runs
    assert len(calls) == 1 + 3 + timer.min_repeats


def test_second_lookup_hits_memory(timer):
    table = LatencyTable(timer=timer, repeats=3, warmup=1)
    first = table(CONV)
    timer.fail_after = len(timer.calls)
    assert table(CONV) == first
    assert table.many([CONV, CONV]) == [first, first]
    assert CONV in table
    assert ACT not in table


def test_many_measures_each_missing_op_once_in_order(timer):
    table = LatencyTable(timer=timer, repeats=3, warmup=1)
    table(ACT)
    values = table.many([CONV, ACT, LINEAR, CONV, ADD])
    assert timer.calls == [ACT.input_shape, CONV.input_shape, LINEAR.input_shape, ADD.input_shape]
    assert values == [2.0, 1.0, 3.0, 2.0, 4.0]


def test_many_shows_progress_when_asked(timer, capsys):
    table = LatencyTable(timer=timer, progress=True)
    table.many([CONV, ACT])
    assert "latency" in capsys.readouterr().err
    LatencyTable(timer=timer, progress=False).many([CONV, ACT])
    assert capsys.readouterr().err == ""


def test_entries_view_is_read_only(timer):
    table = LatencyTable(timer=timer)
    table(ACT)
    with pytest.raises(TypeError):
        table.entries["x"] = 1.0  # type: ignore[index]
    assert dict(table.entries) == {ACT.key(): 1.0}


def test_threads_set_while_measuring_and_restored():
    seen = []
    real = ForwardTimer()

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    before = torch.get_num_threads()
    assert LatencyTable().threads == before
    table = LatencyTable(threads=before + 1, repeats=1, warmup=0, timer=spy)
    table(ACT)
    table.measure_module(nn.ReLU(), (torch.zeros(3),))
    assert seen == [before + 1, before + 1]
    assert torch.get_num_threads() == before


def test_threads_restored_when_timing_fails():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="must not be called"):
        LatencyTable(threads=before + 1, timer=FakeTimer(fail_after=0))(ACT)
    assert torch.get_num_threads() == before


def test_measure_module_is_not_cached_and_restores_modes(tmp_path):
    table = LatencyTable(repeats=3, warmup=1, cache_dir=tmp_path)
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.BatchNorm1d(8))
    model[1].eval()
    ms = table.measure_module(model, (torch.zeros(2, 8),))
    assert math.isfinite(ms)
    assert ms > 0
    assert [m.training for m in model.modules()] == [True, True, False, True]
    assert len(table.entries) == 0
    assert list(tmp_path.iterdir()) == []
    assert LatencyTable(mode="flops", repeats=1).measure_module(nn.ReLU(), torch.zeros(2)) > 0


def test_measure_module_rejects_bad_arguments():
    table = LatencyTable(repeats=1)
    with pytest.raises(InvalidArgument, match="'relu'"):
        table.measure_module("relu", (torch.zeros(1),))  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match=r"\[1\]"):
        table.measure_module(nn.ReLU(), [1])  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="meta"):
        table.measure_module(nn.Linear(2, 2, device="meta"), (torch.zeros(1, 2),))


# --------------------------------------------------------------------------------------------
# cache


def test_cache_persists_across_instances(tmp_path, timer):
    first = LatencyTable(timer=timer, cache_dir=tmp_path)
    values = first.many([CONV, ACT])
    assert first.cache_path is not None
    assert first.cache_path.parent == tmp_path
    assert first.cache_path.name.startswith("latency-")
    timer.fail_after = len(timer.calls)
    second = LatencyTable(timer=timer, cache_dir=tmp_path)
    assert second.many([CONV, ACT]) == values
    data = json.loads(first.cache_path.read_text())
    assert data["format"] == CACHE_FORMAT
    assert data["env"] == first.env
    assert data["entries"] == {CONV.key(): values[0], ACT.key(): values[1]}
    assert tmp_files(tmp_path) == []


def test_cache_file_depends_on_environment(tmp_path, timer):
    a = LatencyTable(timer=timer, cache_dir=tmp_path, threads=1)
    b = LatencyTable(timer=timer, cache_dir=tmp_path, threads=2)
    assert a.cache_path != b.cache_path
    a(ACT)
    LatencyTable(timer=timer, cache_dir=tmp_path, threads=2)(ACT)
    assert len(timer.calls) == 2  # threads=2 did not reuse the threads=1 value
    assert a.env["torch"] == torch.__version__
    assert a.env["device"] == "cpu"


def test_flops_mode_ignores_cache_dir(tmp_path):
    table = LatencyTable(mode="flops", cache_dir=tmp_path / "cache", timer=forbid_timing())
    assert table.cache_path is None
    table.many([CONV, ACT])
    assert not (tmp_path / "cache").exists()
    assert table.env["flops_model"] == {
        "bytes_per_ms": BYTES_PER_MS,
        "macs_per_ms": MACS_PER_MS,
        "overhead_ms": OVERHEAD_MS,
    }


@pytest.mark.parametrize(
    ("field", "value"),
    [("torch", "0.0.1"), ("threads", 99), ("device", "cuda:0"), ("device_name", "Other CPU")],
)
def test_cache_from_another_environment_is_ignored(tmp_path, timer, caplog, field, value):
    table = LatencyTable(timer=timer, cache_dir=tmp_path)
    env = {**table.env, field: value}
    table.cache_path.write_text(
        json.dumps({"format": CACHE_FORMAT, "env": env, "entries": {ACT.key(): 123.0}})
    )
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        fresh = LatencyTable(timer=timer, cache_dir=tmp_path)
    assert field in caplog.text
    assert str(table.cache_path) in caplog.text
    assert len(fresh.entries) == 0
    assert fresh(ACT) == 1.0  # measured, not the foreign 123.0
    data = json.loads(table.cache_path.read_text())
    assert data["env"] == table.env
    assert data["entries"] == {ACT.key(): 1.0}


@pytest.mark.parametrize(
    "content",
    [
        # truncated
        '{"format": ' + str(CACHE_FORMAT) + ', "env": {"device": "cpu"}, "entries": {"a": 1.0',
        "not json at all",
        "",
        "[1, 2, 3]",
        '{"format": 99, "env": {}, "entries": {}}',
        '{"format": ' + str(CACHE_FORMAT) + ', "env": [], "entries": {}}',
        "[" * 100_000,  # deeper than the recursion limit (crashed json.loads before)
        '{"format": 1, "entries": {"a": ' + "1" * 5000 + "}}",  # beyond int's digit limit
        b"\xff\xfe\x00garbage",  # not UTF-8
    ],
)
def test_corrupted_cache_warns_and_is_rebuilt(tmp_path, timer, caplog, content):
    path = LatencyTable(timer=timer, cache_dir=tmp_path).cache_path
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        table = LatencyTable(timer=timer, cache_dir=tmp_path)
    assert str(path) in caplog.text
    assert len(table.entries) == 0
    assert table(ACT) == 1.0
    data = json.loads(path.read_text())
    assert data == {"format": CACHE_FORMAT, "env": table.env, "entries": {ACT.key(): 1.0}}


def test_invalid_cache_entries_are_dropped(tmp_path, caplog):
    table = LatencyTable(cache_dir=tmp_path)
    entries = {"ok": 2.5, "neg": -1.0, "zero": 0, "str": "fast", "nan": float("nan"), "b": True}
    table.cache_path.write_text(
        json.dumps({"format": CACHE_FORMAT, "env": table.env, "entries": entries})
    )
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        fresh = LatencyTable(cache_dir=tmp_path)
    assert "5 invalid entries" in caplog.text
    assert dict(fresh.entries) == {"ok": 2.5}


def test_concurrent_tables_merge_entries(tmp_path, timer):
    a = LatencyTable(timer=timer, cache_dir=tmp_path)
    b = LatencyTable(timer=timer, cache_dir=tmp_path)  # created before a saved anything
    x = a(CONV)
    y = b(ACT)
    data = json.loads(a.cache_path.read_text())
    assert data["entries"] == {CONV.key(): x, ACT.key(): y}
    assert b(CONV) == x  # b picked up a's entry while saving
    assert len(timer.calls) == 2
    assert [p.name for p in tmp_path.iterdir()] == [a.cache_path.name]


def test_failed_write_leaves_no_partial_file(tmp_path, timer, monkeypatch, caplog):
    table = LatencyTable(timer=timer, cache_dir=tmp_path)
    table(ACT)
    before = table.cache_path.read_text()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        table.save()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        table(CONV)  # the automatic save only warns
    assert "disk full" in caplog.text
    assert table.cache_path.read_text() == before
    assert tmp_files(tmp_path) == []


def test_interrupted_many_resumes(tmp_path):
    ops = [OpSpec("act", (1, n), activation="relu") for n in range(1, 13)]
    with pytest.raises(RuntimeError):
        LatencyTable(cache_dir=tmp_path, timer=FakeTimer(fail_after=10)).many(ops)
    resumed = FakeTimer()
    table = LatencyTable(cache_dir=tmp_path, timer=resumed)
    assert len(table.entries) == 10
    table.many(ops)
    assert resumed.calls == [(1, 11), (1, 12)]


def test_many_saves_every_few_values(tmp_path):
    # progress reaches the disk while many() runs, not only on the way out (a killed process)
    on_disk = []

    def spying_timer(*args, **kwargs):
        path = table.cache_path
        on_disk.append(len(json.loads(path.read_text())["entries"]) if path.exists() else 0)
        return 1.0

    table = LatencyTable(cache_dir=tmp_path, timer=spying_timer)
    every = SAVE_EVERY
    table.many([OpSpec("add", (n,)) for n in range(1, every + 3)])
    assert on_disk == [0] * every + [every, every]
    assert len(json.loads(table.cache_path.read_text())["entries"]) == every + 2


def test_save_and_load_round_trip(tmp_path, timer):
    table = LatencyTable(timer=timer, threads=1)
    table.many([CONV, ACT])
    path = table.save(tmp_path / "sub" / "table.json")
    loaded = LatencyTable.load(path)
    assert dict(loaded.entries) == dict(table.entries)
    assert (loaded.mode, loaded.device, loaded.threads) == ("measure", torch.device("cpu"), 1)
    assert loaded.env == table.env
    assert tmp_files(path.parent) == []


def test_load_from_another_environment_warns_and_starts_empty(tmp_path, caplog):
    path = tmp_path / "table.json"
    env = {**LatencyTable(mode="flops").env, "torch": "1.0"}
    path.write_text(json.dumps({"format": CACHE_FORMAT, "env": env, "entries": {ACT.key(): 1.0}}))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        loaded = LatencyTable.load(path)
    assert "'1.0'" in caplog.text
    assert loaded.mode == "flops"
    assert len(loaded.entries) == 0


@pytest.mark.parametrize("content", ["{trunc", '{"format": 1, "env": {}, "entries": {}}'])
def test_load_rejects_bad_files(tmp_path, content):
    path = tmp_path / "table.json"
    path.write_text(content)
    with pytest.raises(InvalidArgument, match=r"table\.json"):
        LatencyTable.load(path)
    with pytest.raises(InvalidArgument, match=r"missing\.json"):
        LatencyTable.load(tmp_path / "missing.json")


# --------------------------------------------------------------------------------------------
# argument checking


@pytest.mark.parametrize(
    ("kwargs", "shown"),
    [
        ({"mode": "fast"}, "'fast'"),
        ({"mode": 1}, "1 of type int"),
        ({"device": "not-a-device"}, "'not-a-device'"),
        ({"device": 3}, "3 of type int"),
        ({"device": "meta"}, "'meta'"),
        ({"threads": 0}, "0"),
        ({"threads": "2"}, "'2' of type str"),
        ({"repeats": 0}, "0"),
        ({"repeats": True}, "True"),
        ({"repeats": 2.5}, "2.5 of type float"),
        ({"warmup": -1}, "-1"),
        ({"progress": "yes"}, "'yes'"),
        ({"cache_dir": 5}, "5 of type int"),
        ({"timer": 5}, "5 of type int"),
    ],
)
def test_invalid_table_arguments(kwargs, shown):
    with pytest.raises(InvalidArgument, match=shown):
        LatencyTable(**kwargs)


def test_cache_dir_must_be_a_directory(tmp_path):
    afile = tmp_path / "file"
    afile.write_text("")
    with pytest.raises(InvalidArgument, match="file"):
        LatencyTable(cache_dir=afile)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_cuda_is_rejected_for_measuring_only():
    with pytest.raises(InvalidArgument, match="'cuda'"):
        LatencyTable(device="cuda")
    assert LatencyTable(mode="flops", device="cuda").device.type == "cuda"


def test_invalid_lookups():
    table = LatencyTable(mode="flops")
    with pytest.raises(InvalidArgument, match="'conv'"):
        table("conv")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="single op"):
        table.many(ACT)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="None"):
        table.many([ACT, None])  # type: ignore[list-item]
    with pytest.raises(InvalidArgument, match="cache_dir"):
        table.save()


_WRITER = """
import sys
from fxcompress.latency import LatencyTable, OpSpec

def fake(module, inputs, **kwargs):
    return float(inputs[0].shape[-1])  # the value is a function of the op: checkable

table = LatencyTable(cache_dir=sys.argv[1], threads=1, timer=fake)
for n in range(int(sys.argv[2]), int(sys.argv[2]) + 40):
    table(OpSpec("add", (1, n)))  # saves after every new value
"""


def test_two_processes_writing_at_once_never_corrupt_or_mix_entries(tmp_path):
    """Two processes fill one cache file concurrently (each save re-reads and merges): the file
    stays valid JSON, every entry it holds has its writer's value, and a new table reads it."""
    import subprocess
    import sys

    procs = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), str(start)])
        for start in (1, 1001)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    (path,) = [p for p in tmp_path.iterdir() if p.suffix == ".json"]
    data = json.loads(path.read_text())
    assert data["entries"], "nothing was written"
    for key, value in data["entries"].items():
        n = json.loads(key)["input_shape"][-1]
        assert value == float(n), key  # never a wrong entry
    assert tmp_files(tmp_path) == []
    table = LatencyTable(cache_dir=tmp_path, threads=1)
    assert table.cache_path == path
    assert dict(table.entries) == data["entries"]
