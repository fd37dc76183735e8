"""``Report.to_markdown``: budgets as they were asked, re-plans as a table, named decisions."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from torch import fx, nn

import fxcompress
from fxcompress import Budget, Report


def _budget_line(report: Report) -> str:
    (line,) = [ln for ln in report.to_markdown().splitlines() if ln.startswith("- budget:")]
    return line


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"budget": 0.6}, "≤ 60 % of the original latency"),
        (
            {"budget": math.nan, "target": {"speedup": 2.0}, "original_ms": 10.0},
            "2× speed-up (≤ 50 % of the original latency)",
        ),
        ({"budget": Budget(speedup=2.0)}, "2× speed-up (≤ 50 % of the original latency)"),
        ({"budget": Budget(speedup=4)}, "4× speed-up (≤ 25 % of the original latency)"),
        (
            {"budget": Budget(latency_ms=12.0), "original_ms": 20.0},
            "latency ≤ 12 ms (≤ 60 % of the original latency)",
        ),
        ({"budget": Budget(latency_ms=12.0)}, "latency ≤ 12 ms"),
        ({"budget": math.nan, "target": {"latency_ms": 12.5}}, "latency ≤ 12.5 ms"),
        ({"budget": Budget(params=0.5)}, "≤ 50 % of the parameters"),
        ({"budget": Budget(macs=0.25)}, "≤ 25 % of the MACs"),
        ({"budget": math.nan}, "not recorded"),
    ],
)
def test_budget_is_rendered_the_way_it_was_asked(kwargs, expected) -> None:
    report = Report(**kwargs)
    line = _budget_line(report)
    assert line.startswith(f"- budget: {expected};"), line
    assert "nan" not in line
    # and it survives the JSON round trip the CLI's `report` command takes
    again = Report.from_dict(report.to_dict())
    assert _budget_line(again) == line


def test_budget_fraction_in_the_dict_follows_the_target() -> None:
    assert Report(budget=Budget(speedup=2.0)).to_dict()["budget"] == 0.5
    d = Report(budget=math.nan, target={"latency_ms": 5.0}, original_ms=20.0).to_dict()
    assert d["budget"] == 0.25  # the plots draw the budget line from it
    assert d["target"] == {"latency_ms": 5.0}


def test_optimize_with_a_speedup_budget_renders_no_nan() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
    ).eval()
    x = torch.randn(1, 3, 12, 12)
    out = fxcompress.optimize(model, Budget(speedup=1.25), example_inputs=x, latency="flops")
    line = _budget_line(out.meta["fxcompress"])
    assert "nan" not in line
    assert line.startswith("- budget: 1.25× speed-up (≤ 80 % of the original latency);"), line


REPLANS = [
    {
        "measured_ratio": 0.712,
        "goal_ratio": 0.6,
        "new_budget_ms": 5.5,
        "direction": "tighter",
        "how": "secant",
        "repeats": 0,
    },
    {
        "measured_ratio": 0.55,
        "goal_ratio": 0.6,
        "new_budget_ms": 5.8,
        "direction": "looser",
        "how": "bisect",
        "repeats": 2,
    },
]


def test_replans_are_a_table_not_raw_dicts() -> None:
    report = Report(budget=0.6, original_ms=10.0, final_ms=6.1, replans=REPLANS)
    text = report.to_markdown()
    assert "{" not in text
    assert "'measured_ratio'" not in text
    lines = text.splitlines()
    header = lines.index("## Re-plans")
    assert lines[header + 2].startswith("| attempt | measured ratio | goal | re-planned for")
    assert lines[header + 4] == "| 1 | 0.712 | 0.600 | 5.500 ms (0.550) | n/a | tighter | secant |"
    assert lines[header + 5] == (
        "| 2 | 0.550 | 0.600 | 5.800 ms (0.580) | n/a | looser | "
        "bisect (after 2 budgets giving measured plans) |"
    )
    assert "- re-planned 2× (measured latency missed the budget)" in lines


def test_replans_render_with_missing_fields() -> None:
    text = Report(budget=0.6, replans=[{"how": "step", "new_predicted_ms": 4.0}]).to_markdown()
    assert "| 1 | n/a | n/a | n/a | 4.000 ms | n/a | step |" in text


def _named_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(
            [
                ("stem", nn.Conv2d(3, 8, 3, padding=1)),
                ("stem_bn", nn.BatchNorm2d(8)),
                ("stem_act", nn.ReLU()),
                ("mid", nn.Conv2d(8, 8, 3, padding=1)),
                ("mid_act", nn.ReLU()),
                ("last", nn.Conv2d(8, 8, 3, padding=1)),
                ("last_act", nn.ReLU()),
                ("pool", nn.AdaptiveAvgPool2d(1)),
                ("flat", nn.Flatten()),
                ("head", nn.Linear(8, 4)),
            ]
        )
    ).eval()


@pytest.fixture(scope="module")
def compressed() -> tuple[nn.Module, fx.GraphModule]:
    model = _named_model()
    x = torch.randn(1, 3, 12, 12)
    data = [torch.randn(2, 3, 12, 12)]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        out = fxcompress.optimize(
            model, 0.6, example_inputs=x, data=data, latency="flops", progress=False
        )
    return model, out


def test_decisions_name_layers_merged_kernel_activations_and_pruned(compressed) -> None:
    model, out = compressed
    report = out.meta["fxcompress"]
    merged = [d for d in report.decisions if d["key"] != "keep"]
    assert merged, "budget 0.6 merges something"
    modules = dict(model.named_modules())
    result_convs = [m for m in out.modules() if isinstance(m, nn.Conv2d)]
    for d in merged:
        # first and last name layers of the original model
        assert isinstance(modules[d["first"]], (nn.Conv2d, nn.Linear))
        assert isinstance(modules[d["last"]], (nn.Conv2d, nn.Linear))
        # the activations said to be removed are activation modules of the original model
        assert d["activations_removed"]
        assert all(isinstance(modules[a], nn.ReLU) for a in d["activations_removed"])
        # pruned layers are layers of the original model, named as modules
        assert all(isinstance(modules[p], nn.Conv2d) for p in d["pruned_layers"])
        # the merged layer the report describes is in the result
        m = d["merged"]
        assert any(
            list(c.kernel_size) == m["kernel_size"]
            and c.in_channels == m["in_channels"]
            and c.out_channels == m["out_channels"]
            for c in result_convs
        ), (m, result_convs)
    # the removed activations are gone from the result: count ReLUs independently
    relus = sum(n.target is torch.relu or getattr(n.target, "__name__", "") == "relu"
                for n in out.graph.nodes)  # fmt: skip
    removed = sum(len(d["activations_removed"]) for d in merged)
    assert relus == 3 - removed

    text = report.to_markdown()
    table = text[text.index("## Merged segments") :]
    for d in merged:
        kernel = "×".join(map(str, d["merged"]["kernel_size"]))
        row = next(ln for ln in table.splitlines() if ln.startswith(f"| {d['chain']} "))
        assert d["first"] in row
        assert f"one {kernel} conv" in row
        for a in d["activations_removed"]:
            assert a in row


def test_parts_left_as_they_are_are_named_with_why(compressed) -> None:
    _, out = compressed
    report = out.meta["fxcompress"]
    text = report.to_markdown()
    section = text[text.index("## Parts left as they are") :]
    for node, reason in report.kept:
        line = next(ln for ln in section.splitlines() if ln.startswith(f"- {reason} ("))
        assert node in line
    assert "adaptive_avg_pool2d" in section or "pool" in section
    assert "chains end there and it runs unchanged" in section
    kept_by_plan = [d for d in report.decisions if d["key"] == "keep"]
    if kept_by_plan:
        assert "kept by the plan" in section
        assert all(d["first"] in section for d in kept_by_plan)


def test_old_reports_without_names_still_render() -> None:
    d = {"chain": "chain0", "start": 6, "stop": 7, "key": "merge", "pruned": []}
    text = Report(budget=0.5, decisions=[d, {**d, "start": 7, "stop": 8, "key": "keep"}])
    rows = [ln for ln in text.to_markdown().splitlines() if ln.startswith("| chain0 6–7")]
    assert rows == ["| chain0 6–7 | items 6–7 | merge | — | — |"]


def test_residual_decision_names_the_block() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
            self.act1 = nn.ReLU()
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x + self.conv2(self.act1(self.conv1(x))))

    model = nn.Sequential(nn.Conv2d(3, 8, 1), Block(), Block()).eval()
    gm = fxcompress.canonicalize(fxcompress.capture(model, torch.randn(1, 3, 8, 8)))
    (chain,) = fxcompress.analyze(gm).roots
    n = len(chain.items)
    (d,) = Report.decisions_of(gm, [(chain.name, 1, n, "merge", ())], [(1.0, 0.5)])
    assert (d["first"], d["last"]) == ("1.conv1", "2.conv2")
    assert d["layers"] == 4
    # each block's inner activation, and the first block's final relu (inside the segment)
    first_act, block_relu, second_act = d["activations_removed"]
    assert (first_act, second_act) == ("1.act1", "2.act1")
    assert block_relu.startswith("relu")
    assert block_relu.endswith(" (in 1)")
    assert d["merged"]["kernel_size"] == [9, 9]


# ----------------------------------------------------------------------- the report protocol


def _method_results() -> dict[str, fx.GraphModule]:
    """One small result of every method (its report under its meta key)."""
    from fxcompress import collapse, fusion, lowrank

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 64), nn.GELU(), nn.Linear(64, 8)).eval()
    x = torch.randn(2, 8)
    prepared = collapse.prepare(mlp, x)
    with torch.no_grad():
        prepared.get_submodule("0_act").slope.fill_(0.98)

    class Res(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.fc2(torch.relu(self.fc1(x)))

    blocks = nn.Sequential(*(Res() for _ in range(4))).eval()
    return {
        "depth": fxcompress.optimize(mlp, 1.0, example_inputs=x, latency="flops"),
        "lowrank": lowrank.decompose(mlp, 0.5, x),
        "collapse": collapse.apply(prepared, tol=0.05),
        "fusion": fusion.fuse(blocks, 0.5, example_inputs=x),
    }


def test_every_method_follows_the_contract_and_its_report_the_protocol() -> None:
    import importlib
    import json

    from fxcompress.method import CONTRACTS
    from fxcompress.report import MethodReport

    results = _method_results()
    assert set(results) == set(CONTRACTS)
    for name, contract in CONTRACTS.items():
        module, _, cls_name = contract.report.rpartition(".")
        cls = getattr(importlib.import_module(module), cls_name)
        gm = results[name]
        report = gm.meta[contract.key]
        assert isinstance(report, cls), name
        assert isinstance(report, MethodReport), name
        assert not gm.training, name
        d = json.loads(json.dumps(report.to_dict()))
        again = cls.from_dict(d)
        assert again.to_dict() == report.to_dict(), name
        assert again.to_markdown() == report.to_markdown(), name
        entry_module, _, entry = contract.entry.rpartition(".")
        assert callable(getattr(importlib.import_module(entry_module), entry)), name
