"""The command line (run as a subprocess) and save/load round trips."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import fxcompress
from fxcompress import cli
from fxcompress.io import load, load_plan, save, save_plan


def _run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fxcompress", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


TINYNET = """
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
    )


def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 16, 16, generator=g) for _ in range(2)]


not_data = 3
"""


def test_cli_optimize_user_factory_data_plot_and_report(tmp_path) -> None:
    (tmp_path / "tinynet.py").write_text(TINYNET)
    out = tmp_path / "m.pt2"
    proc = _run(
        "optimize",
        "tinynet:build",
        "--budget",
        "0.7",
        "--input-shape",
        "1,3,16,16",
        "--latency",
        "flops",
        "--data",
        "tinynet:batches",
        "--out",
        str(out),
        "--plot",
        str(tmp_path / "m.png"),
        "--quiet",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "fxcompress report" in proc.stdout
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["predicted_ms"] <= 0.7 * report["original_ms"]
    assert report["front"], "a plan below 1.0 carries its Pareto front"
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"
    x = torch.randn(2, 3, 16, 16)
    # the saved program is the compressed model: its parameter count is the report's
    program = torch.export.load(str(out))
    n_params = sum(p.numel() for p in program.module().parameters())
    assert n_params == report["params_after"] < report["params_before"]
    assert load(out)(x[:1]).shape == (1, 8, 16, 16)

    shown = _run("report", str(out.with_suffix(".report.json")), "--plot", str(tmp_path / "r.png"))
    assert shown.returncode == 0, shown.stderr
    assert f"| {report['params_before']:,} | {report['params_after']:,} |" in shown.stdout
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_cli_optimize_torchvision_exact(tmp_path) -> None:
    out = tmp_path / "r18.pt2"
    proc = _run(
        "optimize",
        "torchvision:resnet18",
        "--budget",
        "1.0",
        "--input-shape",
        "1,3,32,32",
        "--latency",
        "flops",
        "--out",
        str(out),
        "--quiet",
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.with_suffix(".report.json").read_text())
    resnet18 = torchvision.models.resnet18()
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in resnet18.modules())
    assert sum(e["kind"] == "fold_bn" for e in report["events"]) == n_bn
    bn_params = sum(
        p.numel()
        for m in resnet18.modules()
        if isinstance(m, nn.BatchNorm2d)
        for p in m.parameters()
    )
    convs_without_bias = sum(
        m.out_channels for m in resnet18.modules() if isinstance(m, nn.Conv2d) and m.bias is None
    )
    # folding turns each BN's (gamma, beta) into one conv bias
    assert report["params_after"] == report["params_before"] - bn_params + convs_without_bias
    assert load(out)(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


def test_cli_bad_input_subprocess_one_line_nonzero() -> None:
    proc = _run("optimize", "torchvision:nope", "--budget", "0.5", "--input-shape", "1,3,8,8")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "fxcompress: error: unknown torchvision model 'nope'"
    ]


def _opt(model: str, *extra: str, budget: str = "0.5", shape: str = "1,3,8,8") -> tuple:
    return ("optimize", model, "--budget", budget, "--input-shape", shape, *extra)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (_opt("torchvision:resnet18", "--latency", "flops", budget="1.5"), "budget=1.5"),
        (_opt("torchvision:resnet18", shape="a,b"), "--input-shape"),
        (_opt("tinynet:nothing"), "tinynet:nothing"),
        (_opt("tinynet:build", "--data", "tinynet:not_data"), "iterable of batches"),
        (_opt("tinynet:build", "--data", "missing.pt"), "no such file: missing.pt"),
        (_opt("tinynet:build", "--plot", "r.svg"), "'.png'"),
        (_opt("model.onnx"), "torchvision:NAME"),
        (("report", "/nonexistent.json"), "no such file"),
        (("report", "notareport.json"), "not a report"),
    ],
)
def test_cli_bad_input_one_line_nonzero(args, needle, tmp_path, monkeypatch, capsys) -> None:
    (tmp_path / "tinynet.py").write_text(TINYNET)
    (tmp_path / "notareport.json").write_text("[1, 2]")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert cli.main(list(args)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("fxcompress: error: ")
    assert needle in err[0]


def test_cli_plot_without_matplotlib_names_the_extra(tmp_path, monkeypatch, capsys) -> None:
    report = fxcompress.Report(budget=0.5, original_ms=2.0, predicted_ms=1.0)
    path = tmp_path / "r.report.json"
    path.write_text(report.to_json())
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert cli.main(["report", str(path), "--plot", str(tmp_path / "r.png")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "fxcompress[plot]" in line
    assert not (tmp_path / "r.png").exists()


def test_cli_refuses_pickled_models_without_flag(tmp_path, capsys) -> None:
    path = tmp_path / "m.pt"
    torch.save(nn.Sequential(nn.Conv2d(3, 4, 3)), path)
    argv = ["optimize", str(path), "--budget", "1.0", "--input-shape", "1,3,8,8"]
    assert cli.main([*argv, "--latency", "flops"]) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    ok = _run(
        "optimize",
        str(path),
        "--budget",
        "1.0",
        "--input-shape",
        "1,3,8,8",
        "--latency",
        "flops",
        "--allow-pickle",
        "--quiet",
    )
    assert ok.returncode == 0, ok.stderr


class _Payload:
    """Unpickling this would write a marker file: the CLI must never get that far."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_cli_refuses_a_pickled_data_payload(tmp_path, capsys) -> None:
    marker = tmp_path / "ran.txt"
    path = tmp_path / "data.pt"
    torch.save([_Payload(marker)], path)
    argv = ["optimize", "torchvision:resnet18", "--budget", "1.0", "--input-shape", "1,3,32,32",
            "--latency", "flops", "--data", str(path), "--quiet"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "cannot read --data" in err
    assert str(path) in err
    assert not marker.exists()


def test_cli_methods_flag_reaches_the_planner(tmp_path, capsys) -> None:
    argv = ["optimize", "torchvision:resnet18", "--budget", "0.45", "--input-shape", "1,3,32,32",
            "--latency", "flops", "--quiet"]
    assert cli.main([*argv, "--methods", "merge,prune,drop"]) == 0
    assert "drop" in capsys.readouterr().out
    assert cli.main([*argv, "--methods", "merge,skip"]) == 2
    err = capsys.readouterr().err
    assert "skip" in err
    assert "drop" in err


def test_console_script_help() -> None:
    script = Path(sys.executable).with_name("fxcompress")  # installed by the package's entry point
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for command in ("optimize", "report", "latency"):
        assert command in proc.stdout


def test_cli_subcommand_help_lists_options(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["optimize", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "--budget",
        "--input-shape",
        "--data",
        "--device",
        "--cache-dir",
        "--out",
        "--plot",
    ):
        assert option in text


def test_save_load_pt2_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
    ).eval()
    x = torch.randn(1, 3, 16, 16)
    gm = fxcompress.optimize(model, 0.7, example_inputs=x, latency="flops")
    path = save(gm, tmp_path / "m.pt2")
    assert torch.allclose(load(path)(x), gm(x), atol=1e-6)


def test_plan_and_weights_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
    ).eval()
    x = torch.randn(1, 3, 16, 16)
    plan = fxcompress.plan(model, 0.7, x, latency="flops")
    relaxed = fxcompress.relax(model, plan)
    with torch.no_grad():
        for p in relaxed.parameters():
            p.mul_(1.1)  # "fine-tuned"
    save_plan(relaxed, tmp_path / "plan")
    # the files are JSON and a plain state_dict: loadable with weights_only=True
    json.loads((tmp_path / "plan" / "plan.json").read_text())
    torch.load(tmp_path / "plan" / "state.pt", weights_only=True)
    merged = load_plan(model, tmp_path / "plan")
    with torch.no_grad():
        ref = relaxed.eval()(x)
        assert float((merged(x) - ref).abs().max() / ref.abs().max()) <= 1e-5


def test_progress_bars_follow_the_progress_flag(capsys) -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
    ).eval()
    x = torch.randn(1, 3, 12, 12)
    kw = {"example_inputs": x, "data": [torch.randn(2, 3, 12, 12)], "latency": "flops"}
    fxcompress.optimize(model, 0.7, progress=True, **kw)
    assert "fxcompress scoring" in capsys.readouterr().err
    fxcompress.optimize(model, 0.7, progress=False, **kw)
    assert "fxcompress" not in capsys.readouterr().err
    # default (None): only on a terminal; pytest's captured stderr is not one
    fxcompress.optimize(model, 0.7, **kw)
    assert "fxcompress" not in capsys.readouterr().err


def test_track_yields_everything_with_or_without_a_bar(capsys) -> None:
    from fxcompress.progress import track

    assert list(track(iter(range(5)), desc="finetune", enabled=True)) == list(range(5))
    assert "fxcompress finetune" in capsys.readouterr().err
    assert list(track([1, 2], desc="finetune", enabled=False)) == [1, 2]
    assert capsys.readouterr().err == ""


def test_cli_accepts_exported_program_and_says_it_is_not_rewritten(tmp_path, caplog) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    x = torch.randn(1, 3, 8, 8)
    torch.export.save(torch.export.export(model, (x,)), str(tmp_path / "m.pt2"))
    out = tmp_path / "out.pt2"
    argv = ["optimize", str(tmp_path / "m.pt2"), "--budget", "1.0", "--input-shape", "1,3,8,8"]
    assert cli.main([*argv, "--latency", "flops", "--quiet", "--out", str(out)]) == 0
    assert "not recognised for rewriting" in caplog.text
    # what was written computes what the exported program computes
    torch.testing.assert_close(load(out)(x), model(x))


def test_cli_latency_builds_then_shows_a_json_table(tmp_path, monkeypatch, capsys) -> None:
    (tmp_path / "tinynet.py").write_text(TINYNET)
    monkeypatch.syspath_prepend(str(tmp_path))
    cache = tmp_path / "cache"
    argv = ["latency", "tinynet:build", "--input-shape", "1,3,8,8", "--cache-dir", str(cache)]
    assert cli.main(argv) == 0
    (path,) = cache.glob("*.json")
    entries = json.loads(path.read_text())["entries"]
    assert entries
    assert f"entries: {len(entries)}" in capsys.readouterr().out
    # inspecting reads the same table back and lists its entries, slowest first
    assert cli.main(["latency", "--cache-dir", str(cache), "--show"]) == 0
    shown = capsys.readouterr().out.splitlines()[1:]
    ms = [float(line.split()[0]) for line in shown]
    assert len(ms) == min(len(entries), 50)
    assert ms == sorted(ms, reverse=True)


def test_cli_pt_data_with_targets_and_device(tmp_path, monkeypatch, capsys) -> None:
    (tmp_path / "tinynet.py").write_text(TINYNET)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.save((torch.randn(8, 3, 8, 8), torch.randint(0, 8, (8,))), tmp_path / "calib.pt")
    out = tmp_path / "m.pt2"
    argv = [*_opt("tinynet:build", "--data", str(tmp_path / "calib.pt"), budget="0.7")]
    argv += ["--device", "cpu", "--latency", "flops", "--out", str(out)]
    assert cli.main(argv) == 0
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["predicted_ms"] <= 0.7 * report["original_ms"]
    assert "saved" in capsys.readouterr().out


# --------------------------------------------------------------------------- issue 15


TESTS = Path(__file__).resolve().parent


@pytest.fixture
def cli_data(monkeypatch):
    """tests/_cli_data.py, importable as ``_cli_data:factory`` (as a user's module would be)."""
    monkeypatch.syspath_prepend(str(TESTS))
    import _cli_data

    return _cli_data


def _tiny_opt(*extra: str, budget: str = "0.6") -> list[str]:
    return [
        "optimize", "_cli_data:build", "--budget", budget, "--input-shape", "1,3,8,8",
        "--latency", "flops", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize(("flag", "dest"), [("-v", "verbose"), ("--verbose", "verbose"),
                                            ("--quiet", "quiet")])  # fmt: skip
def test_cli_verbose_and_quiet_before_or_after_the_subcommand(flag, dest) -> None:
    parser = cli.build_parser()
    opt = _tiny_opt()
    for argv in (
        [flag, *opt],
        [*opt, flag],
        [flag, "report", "r.json"],
        ["report", "r.json", flag],
        ["latency", "--cache-dir", "c", flag],
    ):
        assert getattr(parser.parse_args(argv), dest) is True, argv
    assert getattr(parser.parse_args(opt), dest) is False


def test_cli_optimize_runs_with_flags_after_the_subcommand(cli_data, capsys) -> None:
    assert cli.main(_tiny_opt("-v", "--quiet", budget="1.0")) == 0
    assert "# fxcompress report" in capsys.readouterr().out


def test_cli_finetune_distill_is_optimize_with_distill(tmp_path, cli_data, capsys) -> None:
    out = tmp_path / "m.pt2"
    argv = _tiny_opt("--quiet", "--finetune", "distill", "--train-data", "_cli_data:train_batches")
    assert cli.main([*argv, "--epochs", "2", "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["stage_seconds"]["finetune"] > 0
    # the reference: the Python API with fxcompress.Distill on the same model, input and data
    model = cli_data.build()
    x = torch.randn(1, 3, 8, 8)  # what the CLI drew right after build() seeded the RNG
    kw = {"example_inputs": x, "latency": "flops", "progress": False}
    batches = cli_data.train_batches()
    ref = fxcompress.optimize(
        model, 0.6, finetune=fxcompress.Distill(model, batches, epochs=2, progress=False), **kw
    )
    untrained = fxcompress.optimize(model, 0.6, **kw)
    xb = torch.randn(8, 3, 8, 8)  # the program was saved from a batch of 1
    got = load(out)(xb)
    with torch.no_grad():
        torch.testing.assert_close(got, ref(xb))
        assert not torch.allclose(got, untrained(xb), atol=1e-3)  # the fine-tune did something


def test_cli_plan_candidates_with_a_generator_of_batches(tmp_path, cli_data, caplog) -> None:
    caplog.set_level(logging.INFO, logger="fxcompress.distill")
    out = tmp_path / "m.pt2"
    argv = _tiny_opt("--quiet", "--finetune", "distill", "--train-data", "_cli_data:train_stream")
    argv += ["--epochs", "2", "--plan-candidates", "2", "--trial-epochs", "1", "--out", str(out)]
    assert cli.main(argv) == 0
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["trials"], "plan_candidates=2 records its trials"
    assert sum(t["chosen"] for t in report["trials"]) == 1
    # the one-shot generator is fetched again for each epoch: 4 batches, 2 epochs
    assert "distilled for 8 steps (2 epochs)" in caplog.text
    assert "distilled for 4 steps (1 epochs)" in caplog.text  # the trial


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (("--finetune", "distill", "--train-data", "nocolon"),
         ("'nocolon'", "package.module:factory")),
        (("--finetune", "distill", "--train-data", "_cli_data:missing"),
         ("'_cli_data:missing'", "package.module:factory")),
        (("--finetune", "distill", "--train-data", "no_such_module_15:f"),
         ("'no_such_module_15:f'", "package.module:factory")),
        (("--finetune", "distill", "--train-data", "_cli_data:not_a_function"),
         ("'_cli_data:not_a_function'", "int", "package.module:factory")),
        (("--finetune", "distill", "--train-data", "_cli_data:needs_an_argument"),
         ("'_cli_data:needs_an_argument'", "no arguments")),
        (("--finetune", "distill", "--train-data", "_cli_data:one_tensor"),
         ("'_cli_data:one_tensor'", "returned a Tensor", "iterable of batches")),
        (("--finetune", "distill", "--train-data", "train.pt"),
         ("'train.pt'", "package.module:factory")),
        (("--finetune", "distill"), ("--train-data package.module:factory",)),
        (("--train-data", "_cli_data:train_batches"), ("--finetune distill",)),
        (("--epochs", "3"), ("--epochs", "--finetune distill")),
        (("--plan-candidates", "2"), ("--plan-candidates 2", "--finetune distill")),
        (("--finetune", "distill", "--train-data", "_cli_data:train_batches", "--trial-epochs",
          "1"), ("--trial-epochs", "--plan-candidates K")),
    ],
)  # fmt: skip
def test_cli_finetune_errors_name_the_value_and_the_form(extra, needles, cli_data, capsys):
    assert cli.main(_tiny_opt(*extra)) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("fxcompress: error: ")
    for needle in needles:
        assert needle in line, line


@pytest.mark.parametrize("flag", ["--epochs", "--plan-candidates", "--trial-epochs"])
def test_cli_counts_must_be_positive(flag, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(_tiny_opt(flag, "0"))
    assert exc.value.code == 2
    assert f"{flag} takes a positive integer, got '0'" in capsys.readouterr().err


_STAGE = re.compile(r"(?P<desc>.+?): (?P<done>\d+)(/(?P<total>\d+))? done in [\d.]+ s")


def _stage_lines(caplog) -> list[re.Match]:
    lines = [r.getMessage() for r in caplog.records if r.name == "fxcompress.progress"]
    matches = [_STAGE.fullmatch(line) for line in lines]
    assert all(matches), lines
    return matches


def test_progress_off_a_terminal_is_a_logged_line_per_stage(capsys, caplog) -> None:
    caplog.set_level(logging.INFO, logger="fxcompress.progress")
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
    ).eval()
    kw = {"example_inputs": torch.randn(1, 3, 12, 12), "data": [torch.randn(2, 3, 12, 12)]}
    fxcompress.optimize(model, 0.7, latency="flops", **kw)  # progress=None; not a terminal here
    assert "\r" not in capsys.readouterr().err
    (scoring,) = [m for m in _stage_lines(caplog) if m["desc"] == "scoring"]
    assert int(scoring["done"]) == int(scoring["total"]) > 0
    caplog.clear()
    fxcompress.optimize(model, 0.7, latency="flops", progress=False, **kw)
    assert _stage_lines(caplog) == []


def test_track_logs_one_line_off_a_terminal(capsys, caplog) -> None:
    from fxcompress.progress import bar, track

    caplog.set_level(logging.INFO, logger="fxcompress.progress")
    assert list(track(iter(range(5)), desc="finetune")) == list(range(5))
    assert list(track([1, 2, 3], desc="distill 1/2")) == [1, 2, 3]
    with bar(total=4, desc="fusion (share)", enabled=None) as b:
        for _ in range(4):
            b.update()
    got = [(m["desc"], m["done"], m["total"]) for m in _stage_lines(caplog)]
    assert got == [("finetune", "5", None), ("distill 1/2", "3", "3"), ("fusion (share)", "4", "4")]
    assert capsys.readouterr().err == ""


def test_demo_logs_stages_instead_of_drawing_bars(cli_data, monkeypatch, capsys, caplog) -> None:
    from fxcompress import demo

    monkeypatch.setattr(
        torchvision.models, "cli_tiny", lambda weights=None: cli_data.build(), raising=False
    )
    stages = logging.getLogger("fxcompress.progress")
    previous = stages.level
    stages.setLevel(logging.WARNING)  # as in a fresh process: the demo turns the lines on
    argv = ["--model", "cli_tiny", "--size", "8", "--latency", "flops", "--budget", "0.6"]
    try:
        assert demo.main(argv) == 0
    finally:
        stages.setLevel(previous)
    out, err = capsys.readouterr()
    assert "## budget 0.6" in out
    assert "\r" not in err  # no carriage-return bar updates in a log
    assert "scoring" in {m["desc"] for m in _stage_lines(caplog)}


def test_pyproject_license_is_an_spdx_expression(tmp_path) -> None:
    tomllib = pytest.importorskip("tomllib")
    root = TESTS.parent
    meta = tomllib.loads((root / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "Apache-2.0"  # PEP 639; the table form is deprecated
    (setuptools_req,) = [r for r in meta["build-system"]["requires"] if r.startswith("setuptools")]
    assert setuptools_req == "setuptools>=77"  # the first setuptools that reads SPDX strings
    # the installed setuptools builds the metadata from it without a deprecation warning
    (tmp_path / "src" / "fxcompress").mkdir(parents=True)
    (tmp_path / "src" / "fxcompress" / "__init__.py").write_text("")
    (tmp_path / "src" / "fxcompress" / "py.typed").write_text("")
    for name in ("pyproject.toml", "README.md"):
        (tmp_path / "src" / name).write_text((root / name).read_text())
    script = (
        "import pathlib, warnings\n"
        "from setuptools import build_meta\n"
        "from setuptools.warnings import SetuptoolsDeprecationWarning\n"
        "warnings.simplefilter('error', SetuptoolsDeprecationWarning)\n"
        "d = build_meta.prepare_metadata_for_build_wheel('..')\n"
        "print(pathlib.Path('..', d, 'METADATA').read_text())\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path / "src",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "License-Expression: Apache-2.0" in proc.stdout.splitlines()
