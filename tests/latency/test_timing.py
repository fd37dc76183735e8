"""Paired timing of whole networks and the closed loop's choice of the next budget."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, example, given
from hypothesis import strategies as st
from torch import nn

from fxcompress.errors import InvalidArgument
from fxcompress.latency.timing import paired_timing
from fxcompress.pipeline.closed_loop import next_target


def test_a_network_doing_far_more_work_is_timed_slower() -> None:
    small = nn.Linear(256, 256)
    big = nn.Sequential(*[nn.Linear(256, 256) for _ in range(40)])
    t = paired_timing(small, big, (torch.zeros(8, 256),), pairs=5)
    assert t.ratio > 4
    assert t.pairs == 5
    assert t.spread >= 0


def test_flags_and_threads_are_restored() -> None:
    net = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).train()
    net[1].eval()
    threads = torch.get_num_threads()
    paired_timing(net, nn.Identity(), (torch.zeros(1, 4),), pairs=3, threads=threads + 1)
    assert net.training
    assert net[0].training
    assert not net[1].training
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("kw", [{"pairs": 2}, {"pairs": 3.5}, {"warmup": -1}])
def test_bad_arguments_are_named(kw) -> None:
    with pytest.raises(InvalidArgument, match=next(iter(kw))):
        paired_timing(nn.Identity(), nn.Identity(), (torch.zeros(1),), **kw)


ratios = st.floats(0.05, 2.0)
targets = st.floats(1.0, 100.0)


@given(st.lists(st.tuples(targets, ratios), min_size=1, max_size=6), ratios)
def test_next_target_interpolates_between_bracketing_attempts(history, aim) -> None:
    got = next_target(history, aim)
    below = [h for h in history if h[1] <= aim]
    above = [h for h in history if h[1] > aim]
    if below and above:
        (t0, _r0), (t1, _r1) = max(below, key=lambda h: h[1]), min(above, key=lambda h: h[1])
        assert min(t0, t1) - 1e-9 <= got <= max(t0, t1) + 1e-9
    else:
        # no bracket: move from the nearest attempt towards aim (tighter when it was too slow),
        # by its proportional step, or along a rising line through two attempts (at most 4x that)
        t, r = sorted(history, key=lambda h: abs(h[1] - aim))[0]
        proportional = t * aim / r
        assert abs(got - t) <= 4 * abs(proportional - t) + 1e-9 * t
        assert (got <= t) == (r >= aim) or got == pytest.approx(t)
        if len({h[0] for h in history}) == 1:
            assert got == pytest.approx(proportional)


@given(st.floats(0.2, 0.6), st.floats(0.1, 2.0), st.floats(0.05, 0.2), st.floats(10.0, 50.0))
@example(offset=0.5, slope=0.5, aim=0.1, t0=10.0)  # the closest attempt is 4x short: clamped
def test_next_target_extrapolates_a_rising_line_on_one_side(offset, slope, aim, t0) -> None:
    # measured ratio = offset + slope * target / 100: a part of the latency no plan removes, so
    # scaling in proportion falls short; two attempts above aim extrapolate down their line
    def r(t: float) -> float:
        return offset + slope * t / 100

    history = [(t0 * 2, r(t0 * 2)), (t0, r(t0))]
    assume(aim < r(0.0) + slope * t0 / 100 * 0.999)
    got = next_target(history, aim)
    exact = (aim - offset) * 100 / slope
    proportional = t0 * aim / r(t0)
    assert proportional > exact  # proportional steps would stop short of aim
    reach = 4 * abs(proportional - t0)
    assert got == pytest.approx(exact if t0 - exact <= reach else t0 - reach)


@given(st.floats(0.5, 2.0), st.floats(0.1, 0.9), st.floats(10.0, 50.0))
def test_next_target_hits_a_linear_response_exactly(slope, aim, t0) -> None:
    # measured ratio = slope * target / 100: two bracketing attempts pin the answer down
    history = [(t0, slope * t0 / 100), (t0 * 3, slope * t0 * 3 / 100)]
    assume(history[0][1] <= aim < history[1][1])
    assert next_target(history, aim) == pytest.approx(aim * 100 / slope)
