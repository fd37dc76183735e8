"""Report plots draw the report's numbers: Pareto front, chosen and measured points, segments."""

from __future__ import annotations

import sys

import matplotlib.image  # the `plot` extra
import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.plots import plot_report, report_figure


@pytest.fixture(scope="module")
def report() -> fxcompress.Report:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
    ).eval()  # fmt: skip
    x = torch.randn(1, 3, 16, 16)
    out = fxcompress.optimize(model, 0.6, example_inputs=x, latency="flops", progress=False)
    return out.meta["fxcompress"]


def _line(ax, label):
    (line,) = [ln for ln in ax.get_lines() if ln.get_label() == label]
    return [float(v) for v in line.get_xdata()], [float(v) for v in line.get_ydata()]


def test_front_panel_draws_the_reports_front_and_chosen_point(report) -> None:
    assert report.front
    assert report.decisions
    front_ax, _ = report_figure(report).axes
    xs, ys = _line(front_ax, "front (predicted)")
    assert sorted(zip(xs, ys)) == sorted(tuple(p) for p in report.front)
    assert _line(front_ax, "chosen (predicted)") == ([report.predicted_ms], [report.damage])
    assert _line(front_ax, "budget 0.6")[0] == [0.6 * report.original_ms] * 2
    # flops mode measures nothing: no measured point
    assert all(ln.get_label() != "measured result" for ln in front_ax.get_lines())


def test_measured_point_and_dict_input() -> None:
    d = fxcompress.Report(
        budget=0.5, original_ms=10.0, final_ms=4.6, predicted_ms=4.8, damage=0.2,
        front=[[4.0, 0.5], [4.8, 0.2], [10.0, 0.0]],
    ).to_dict()  # fmt: skip
    front_ax, _ = report_figure(d).axes
    assert _line(front_ax, "measured result") == ([4.6], [0.2])


def test_segment_panel_bars_are_kept_and_planned_ms(report) -> None:
    _, seg_ax = report_figure(report).axes
    kept, planned = seg_ax.containers
    assert [b.get_width() for b in kept] == [d["ms_kept"] for d in report.decisions]
    assert [b.get_width() for b in planned] == [d["ms_planned"] for d in report.decisions]
    labels = [t.get_text() for t in seg_ax.get_yticklabels()]
    merged = [d["key"] != "keep" for d in report.decisions]
    assert [lab.endswith("*") for lab in labels] == merged


def test_exact_only_report_still_plots(tmp_path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    out = fxcompress.optimize(model, 1.0, example_inputs=torch.randn(1, 3, 8, 8), latency="flops")
    path = plot_report(out.meta["fxcompress"], tmp_path / "exact.png")
    image = matplotlib.image.imread(path)
    assert image.ndim == 3
    assert min(image.shape[:2]) > 100


def test_bad_path_and_missing_matplotlib(report, tmp_path, monkeypatch) -> None:
    with pytest.raises(fxcompress.InvalidArgument, match=r"'\.png'"):
        plot_report(report, tmp_path / "r.svg")
    with pytest.raises(fxcompress.InvalidArgument, match="Report"):
        plot_report([1, 2], tmp_path / "r.png")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ModuleNotFoundError, match=r"fxcompress\[plot\]"):
        plot_report(report, tmp_path / "r.png")
    assert not (tmp_path / "r.png").exists()
