"""The documentation's examples run, its links and files exist, and the facts it states that code
can check — signatures and defaults, command-line options, extras, benchmark results — match the
code.
"""

from __future__ import annotations

import ast
import doctest
import importlib.util
import inspect
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
#: every Markdown file a user reads: the docs, the README and the benchmarks' README
ALL_PAGES = [*PAGES, ROOT / "README.md", ROOT / "benchmarks" / "README.md"]
RESULTS = ROOT / "benchmarks" / "results"
#: pages whose examples run outside the repository (``test_example_runs_outside_the_repo``)
RUN_OUTSIDE = [DOCS / "testing.md"]
WITH_EXAMPLES = [p for p in PAGES if re.search(r"^\s*>>> ", p.read_text(), re.MULTILINE)]
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def _prose(text: str) -> str:
    """``text`` without its fenced code blocks."""
    return FENCE.sub("", text)


def _rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


# --------------------------------------------------------------------------- examples


def test_some_pages_have_examples() -> None:
    assert DOCS / "quickstart.md" in WITH_EXAMPLES
    assert all(p in WITH_EXAMPLES for p in RUN_OUTSIDE)


@pytest.mark.parametrize(
    "page", [p for p in WITH_EXAMPLES if p not in RUN_OUTSIDE], ids=lambda p: p.name
)
def test_doc_examples_run(page: Path) -> None:
    result = doctest.testfile(
        str(page),
        module_relative=False,
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
        raise_on_error=False,
        verbose=False,
    )
    assert result.attempted > 0
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {page}"


# The example runs as a user would run it: in a fresh directory, outside pytest and without this
# repository's conftest (whose hypothesis profile has no deadline), with hypothesis's defaults;
# only derandomised, so that the models it draws are the same on every run.
_OUTSIDE_DRIVER = """
import doctest, sys
import hypothesis
hypothesis.settings.register_profile("derandomized", derandomize=True)
hypothesis.settings.load_profile("derandomized")
result = doctest.testfile(sys.argv[1], module_relative=False,
                          optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
print(f"attempted={result.attempted} failed={result.failed}")
sys.exit(1 if result.failed or not result.attempted else 0)
"""


def test_hypothesis_profiles_as_documented() -> None:
    """docs/testing.md's example counts are those of the profiles tests/conftest.py registers."""
    from hypothesis import settings

    text = (DOCS / "testing.md").read_text()
    line = re.search(r"Hypothesis profiles .*?(?=\n- )", text, re.DOTALL).group(0)
    documented = {
        name: int(count)
        for name, count in re.findall(r"`(\w+)` \((?:default: derandomised, )?(\d+)", line)
    }
    assert set(documented) == {"ci", "dev", "long"}
    for name, count in documented.items():
        assert settings.get_profile(name).max_examples == count, name
    assert settings.get_profile("ci").derandomize


@pytest.mark.parametrize("page", RUN_OUTSIDE, ids=lambda p: p.name)
def test_example_runs_outside_the_repo(page: Path, tmp_path: Path) -> None:
    blocks = re.findall(r"^```python\n(.*?)^```", page.read_text(), re.MULTILINE | re.DOTALL)
    examples = [b for b in blocks if b.lstrip().startswith(">>>")]
    assert examples, f"no >>> example in {page.name}"
    (tmp_path / "example.txt").write_text("\n".join(examples))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYPOTHESIS")}
    proc = subprocess.run(
        [sys.executable, "-c", _OUTSIDE_DRIVER, "example.txt"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "failed=0" in proc.stdout


# --------------------------------------------------------------------------- links and files


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for heading in re.findall(r"^#{1,6} (.+)$", _prose(page.read_text()), re.MULTILINE):
        slug = _slug(heading)
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


@pytest.mark.parametrize("page", ALL_PAGES, ids=_rel)
def test_relative_links_exist(page: Path) -> None:
    links = re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", _prose(page.read_text()))
    missing, bad_anchors = [], []
    for target, anchor in links:
        if "://" in target or target.startswith("mailto:"):
            continue
        path = (page.parent / target).resolve() if target else page
        if not path.exists():
            missing.append(target)
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            bad_anchors.append(f"{target}#{anchor}")
    assert not missing, f"{_rel(page)} links to missing files: {missing}"
    assert not bad_anchors, f"{_rel(page)} links to missing headings: {bad_anchors}"


def test_slug_matches_github() -> None:
    assert _slug("`fxcompress.testing` (needs hypothesis)") == "fxcompresstesting-needs-hypothesis"
    assert _slug("Accuracy at measured speed") == "accuracy-at-measured-speed"
    assert _slug("`Budget(fraction=None, latency_ms=None)`") == "budgetfractionnone-latency_msnone"


_PATH = re.compile(
    r"(?<![\w./$-])((?:benchmarks|docs|fxcompress|tests|examples|results)/[\w./-]*\w)"
    r"(?:\.\{([\w,]+)\})?"
)


def _named_paths(page: Path) -> list[tuple[str, Path]]:
    """Every repository path a page names (``a/b.{md,png}`` expanded), with where it points."""
    out = []
    for path, suffixes in _PATH.findall(page.read_text()):
        if any(part.startswith(".") for part in path.split("/")):
            continue  # caches (benchmarks/.cache/...) are not committed
        names = [f"{path}.{s}" for s in suffixes.split(",")] if suffixes else [path]
        for name in names:
            # ``results/...`` is relative to benchmarks/, everything else to the repository
            base = ROOT / "benchmarks" if name.startswith("results/") else ROOT
            out.append((name, base / name))
    return out


@pytest.mark.parametrize("page", ALL_PAGES, ids=_rel)
def test_named_files_exist(page: Path) -> None:
    named = _named_paths(page)
    missing = [name for name, path in named if not path.exists()]
    assert not missing, f"{_rel(page)} names files that do not exist: {missing}"


def test_named_paths_are_found() -> None:
    found = dict(_named_paths(ROOT / "benchmarks" / "README.md"))
    assert found["results/accuracy.jsonl"] == RESULTS / "accuracy.jsonl"
    found = dict(_named_paths(DOCS / "collapse.md"))
    assert {"benchmarks/results/collapse.md", "benchmarks/results/collapse.json"} <= set(found)


def test_every_results_file_is_cited() -> None:
    """A results file nothing links to or names is stale (or its docs are missing)."""
    cited = {path.resolve() for page in ALL_PAGES for _, path in _named_paths(page)}
    for page in ALL_PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)", _prose(page.read_text())):
            cited.add((page.parent / target).resolve())
    stems = {p.with_suffix("") for p in cited if p.parent == RESULTS}
    orphans = [p.name for p in sorted(RESULTS.iterdir()) if p.with_suffix("") not in stems]
    assert not orphans, f"results files cited nowhere: {orphans}"


# --------------------------------------------------------------------------- API reference


def test_api_reference_names_every_public_name() -> None:
    import fxcompress.plots
    import fxcompress.testing

    text = (DOCS / "api.md").read_text()
    names = [
        *fxcompress.__all__,
        *fxcompress.testing.__all__,
        *fxcompress.plots.__all__,
    ]
    missing = [n for n in names if not re.search(rf"`(fxcompress\.)?{n}\b", text)]
    assert not missing, f"docs/api.md does not describe {missing}"


def _namespaces() -> list[ModuleType]:
    """The modules whose public names docs/api.md documents (in the order names resolve)."""
    import fxcompress.depth.planner
    import fxcompress.io
    import fxcompress.plots
    import fxcompress.progress
    import fxcompress.testing

    return [
        fxcompress,
        fxcompress.io,
        fxcompress.testing,
        fxcompress.plots,
        fxcompress.progress,
        fxcompress.depth.planner,
    ]


def _resolve(dotted: str) -> Any:
    """The public object ``dotted`` names (``LatencyTable.measure_module`` too), or None."""
    head, *rest = dotted.removeprefix("fxcompress.").split(".")
    for module in _namespaces():
        if head in getattr(module, "__all__", ()):
            obj = getattr(module, head)
            for attr in rest:
                obj = getattr(obj, attr, None)
            return obj
    return None


_SIGNATURE_AT_LINE_START = re.compile(
    r"^(?:#{1,6} )?`([A-Za-z_][\w.]*)\(([^`]*)\)(?: -> ([^`]+))?`", re.MULTILINE
)
_SIGNATURE_CELL = re.compile(r"\| `([A-Za-z_][\w.]*)\(([^`]*)\)(?: -> ([^`]+))?` \|")


def _documented_signatures() -> list[tuple[str, str, str | None]]:
    """``(name, parameters, return annotation)`` of every signature docs/api.md states: a code span
    opening a heading or a line, or filling a table cell, whose name is a public object (an
    elided call such as ``Budget(speedup=...)`` is not a signature)."""
    text = _prose((DOCS / "api.md").read_text())
    found = _SIGNATURE_AT_LINE_START.findall(text) + _SIGNATURE_CELL.findall(text)
    return [
        (name, params, ret or None)
        for name, params, ret in found
        if _resolve(name) and "..." not in params
    ]


def _bare(annotation: str) -> str:
    """``torch.fx.GraphModule`` -> ``GraphModule``: annotations compared without module paths."""
    return re.sub(r"\b\w+\.", "", annotation.replace(" ", "")).strip("'\"")


_DEFAULTS_NAMESPACE = {"torch": torch, "nn": nn, "cross_entropy": F.cross_entropy}


def _signature_mismatches(name: str, params: str, ret: str | None) -> list[str]:
    real = inspect.signature(_resolve(name))
    wanted = [
        p
        for p in real.parameters.values()
        if not p.name.startswith("_") and p.name not in ("self", "cls")
    ]
    args = ast.parse(f"def f({params}): pass").body[0].args
    documented = [(a.arg, inspect.Parameter.POSITIONAL_OR_KEYWORD) for a in args.args]
    documented += [(a.arg, inspect.Parameter.KEYWORD_ONLY) for a in args.kwonlyargs]
    defaults = dict(
        zip([a.arg for a in args.args][len(args.args) - len(args.defaults) :], args.defaults)
    )
    defaults.update({a.arg: d for a, d in zip(args.kwonlyargs, args.kw_defaults) if d})
    problems = []
    if [n for n, _ in documented] != [p.name for p in wanted]:
        problems.append(f"parameters {[n for n, _ in documented]} != {[p.name for p in wanted]}")
        return problems
    for (pname, kind), p in zip(documented, wanted):
        if kind != p.kind:
            problems.append(f"{pname} is {p.kind.description}, documented as {kind.description}")
        if (pname in defaults) != (p.default is not inspect.Parameter.empty):
            problems.append(f"{pname}: default {p.default!r} documented as {pname in defaults}")
        elif pname in defaults:
            value = eval(ast.unparse(defaults[pname]), dict(_DEFAULTS_NAMESPACE))
            if not (value is p.default or value == p.default):
                problems.append(f"{pname}: default {p.default!r}, documented {value!r}")
    annotation = real.return_annotation
    compared = ret is not None and annotation is not inspect.Signature.empty
    if compared and _bare(ret) != _bare(str(annotation)):
        problems.append(f"returns {annotation}, documented {ret}")
    return problems


def test_documented_signatures_are_found() -> None:
    names = {name for name, _, _ in _documented_signatures()}
    assert {"optimize", "make_plan", "Distill", "LatencyTable", "solve", "models"} <= names


def test_api_signatures_match_the_code() -> None:
    """Every signature docs/api.md states has the real parameters, kinds, defaults, return."""
    problems = []
    for name, params, ret in _documented_signatures():
        problems += [f"{name}: {p}" for p in _signature_mismatches(name, params, ret)]
    assert not problems, "docs/api.md disagrees with the code:\n" + "\n".join(problems)


def test_signature_check_catches_drift() -> None:
    """The comparison above fails on a wrong default, a missing argument or a wrong kind."""
    assert _signature_mismatches("solve", "problem, budget, *, resolution=2000", None) == []
    assert _signature_mismatches("solve", "problem, budget, *, resolution=2000", "Solution") == []
    assert _signature_mismatches("solve", "problem, budget, *, resolution=1000", None)
    assert _signature_mismatches("solve", "problem, budget", None)
    assert _signature_mismatches("solve", "problem, budget, resolution=2000", None)
    assert _signature_mismatches("solve", "problem, budget, *, resolution=2000", "Plan")


def test_every_public_function_has_a_documented_signature() -> None:
    required = [
        (n, getattr(m, n))
        for m in _namespaces()
        for n in getattr(m, "__all__", ())
        if inspect.isfunction(getattr(m, n))
    ]
    classes = ("Budget", "Distill", "LatencyTable", "OpSpec")  # the ones users construct
    required += [(n, getattr(fxcompress, n)) for n in classes]
    documented = [_resolve(name) for name, _, _ in _documented_signatures()]
    missing = [n for n, obj in required if not any(obj is d for d in documented)]
    assert not missing, f"docs/api.md states no signature for {missing}"


def test_make_plan_arguments_as_documented() -> None:
    """api.md: make_plan takes optimize's arguments minus some, plus others (named there)."""
    text = (DOCS / "api.md").read_text()
    match = re.search(r"its arguments minus (.*?), plus (.*?) \(", text, re.DOTALL)
    assert match, "api.md no longer says which arguments make_plan lacks"
    minus, plus = (set(re.findall(r"`(\w+)`", group)) for group in match.groups())

    def public(fn: Any) -> set[str]:
        return {p for p in inspect.signature(fn).parameters if not p.startswith("_")}

    assert public(fxcompress.optimize) - public(fxcompress.make_plan) == minus
    assert public(fxcompress.make_plan) - public(fxcompress.optimize) == plus


def test_optimize_raises_as_documented() -> None:
    """The errors api.md lists for optimize are fxcompress's, and include its docstring's."""
    text = (DOCS / "api.md").read_text()
    section = text.split("Raises (all", 1)[1].split("\n\n", 2)[1]
    listed = re.findall(r"^- `(\w+)`", section, re.MULTILINE)
    assert listed, "api.md lists no errors for optimize"
    assert set(listed) <= set(fxcompress.errors.__all__)
    doc = inspect.getdoc(fxcompress.optimize).split("Raises\n------\n", 1)[1].split("\n\n")[0]
    in_docstring = set(re.findall(r"^(\w+)$", doc, re.MULTILINE))
    assert in_docstring <= set(listed), f"api.md omits {in_docstring - set(listed)}"


def test_infeasible_minimum_is_a_fraction_whatever_the_budget() -> None:
    """api.md: ``.minimum`` is a fraction of the original latency, also for latency_ms budgets."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
    ).eval()
    x = torch.randn(1, 3, 8, 8)
    minima = []
    for budget in (0.01, fxcompress.Budget(latency_ms=1e-9), fxcompress.Budget(speedup=100.0)):
        with pytest.raises(fxcompress.InfeasibleBudget) as info:
            fxcompress.optimize(model, budget, x, latency="flops", progress=False)
        minima.append(info.value.minimum)
        assert f"({info.value.minimum:.3g} of the original" in str(info.value)
    assert 0 < minima[0] < 1
    assert minima == [minima[0]] * 3


# --------------------------------------------------------------------------- command line


def _parsers() -> tuple[Any, dict[str, Any]]:
    import argparse

    from fxcompress.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return parser, dict(sub.choices)


def _options(parser: Any) -> dict[str, Any]:
    """Option string or positional dest -> action, without help and sub-commands."""
    import argparse

    out = {}
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        for key in action.option_strings or [action.dest]:
            out[key] = action
    return out


def _cli_tables() -> dict[str, dict[str, str]]:
    """docs/api.md's command-line tables: command ('' for global) -> option -> default cell."""
    text = (DOCS / "api.md").read_text().split("## Command line", 1)[1]
    text = re.split(r"^## ", text, flags=re.MULTILINE)[0]
    tables: dict[str, dict[str, str]] = {}
    command = ""
    for line in text.splitlines():
        heading = re.match(r"^### `fxcompress (\w+)", line)
        if heading:
            command = heading.group(1)
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("| `") or len(cells) < 3:
            continue
        for span in re.findall(r"`([^`]+)`", cells[0]):
            token = span.split()[0]
            key = token if token.startswith("-") else token.lower()
            tables.setdefault(command, {})[key] = cells[1]
    return tables


def _default_problem(option: str, action: Any, cell: str) -> str | None:
    if cell == "required":
        ok = action.required
    elif cell == "optional":
        ok = not action.required and action.nargs == "?"
    elif cell == "off":
        ok = action.const is True and action.default is False
    elif cell == "none":
        ok = action.default is None and not action.required
    else:
        ok = not action.required and cell.strip("`") == str(action.default)
    return None if ok else f"{option}: default {action.default!r}, documented {cell!r}"


def test_cli_options_are_documented_as_they_are() -> None:
    """Each command's table in api.md lists exactly the parser's options, with their defaults."""
    parser, commands = _parsers()
    tables = _cli_tables()
    assert set(tables) == {"", *commands}, f"api.md documents commands {set(tables)}"
    top = _options(parser)
    problems = []
    for command, sub in [("", parser), *commands.items()]:
        options = _options(sub)
        if command:
            options = {k: a for k, a in options.items() if k not in top}  # in the global table
        documented = tables[command]
        if set(documented) != set(options):
            problems.append(
                f"fxcompress {command}: undocumented {sorted(set(options) - set(documented))}, "
                f"documented but absent {sorted(set(documented) - set(options))}"
            )
        for key in set(documented) & set(options):
            problem = _default_problem(key, options[key], documented[key])
            if problem:
                problems.append(f"fxcompress {command} {problem}")
    assert not problems, "\n".join(problems)


def _shell_commands(page: Path) -> list[str]:
    """The ``fxcompress ...`` command lines of a page's bash blocks (continuations joined)."""
    commands = []
    for block in re.findall(r"^```(?:bash|sh|shell)\n(.*?)^```", page.read_text(), re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip().startswith("fxcompress "):
                commands.append(line.strip())
    return commands


def test_documented_command_lines_parse() -> None:
    """Every ``fxcompress`` command line in a bash block is accepted by the real parser."""
    from fxcompress.cli import build_parser

    commands = [(page, c) for page in ALL_PAGES for c in _shell_commands(page)]
    assert len(commands) >= 5
    for page, command in commands:
        argv = shlex.split(command, comments=True)[1:]
        try:
            build_parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"{_rel(page)}: the parser rejects {command!r}")


#: pages whose bare ``--option`` spans are another tool's (pytest's, the benchmark scripts')
_NOT_CLI = {"testing.md", "benchmarks.md", "collapse.md", "fusion.md", "lowrank.md"}


def _is_cli_page(page: Path) -> bool:
    """Whether a bare ``--option`` span on ``page`` means an option of ``fxcompress``."""
    return page == ROOT / "README.md" or (page.parent == DOCS and page.name not in _NOT_CLI)


def test_options_named_in_prose_exist() -> None:
    """``fxcompress CMD --opt`` and bare ``--opt`` spans name options the parser has."""
    parser, commands = _parsers()
    everywhere = {"-h", "--help"}.union(_options(parser), *(_options(s) for s in commands.values()))
    problems = []
    for page in ALL_PAGES:
        for span in re.findall(r"`([^`\n]+)`", _prose(page.read_text())):
            words = span.split()
            if words[0] == "fxcompress":
                sub = commands.get(words[1]) if len(words) > 1 else None
                known = {"-h", "--help", *_options(parser), *(_options(sub) if sub else everywhere)}
            elif words[0].startswith("--") and _is_cli_page(page):
                known = everywhere
            else:
                continue
            flags = [w for w in words if re.fullmatch(r"--?[a-z][\w-]*", w)]
            problems += [f"{_rel(page)}: `{span}`" for f in flags if f not in known]
    assert not problems, "options that do not exist:\n" + "\n".join(problems)


# --------------------------------------------------------------------------- extras


def _pyproject_extras() -> dict[str, set[str]]:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {
        extra: {re.match(r"[\w.\-]+(\[[^\]]*\])?", r).group(0).lower() for r in reqs}
        for extra, reqs in project["optional-dependencies"].items()
    }


def test_readme_extras_table_matches_pyproject() -> None:
    text = (ROOT / "README.md").read_text()
    table = dict(re.findall(r"^\| `(\w+)` \| ([^|]+) \|", text, re.MULTILINE))
    documented = {k: {p.strip().lower() for p in v.split(",")} for k, v in table.items()}
    assert documented == _pyproject_extras()


def test_extras_named_in_docs_exist() -> None:
    extras = _pyproject_extras()
    problems = []
    for page in ALL_PAGES:
        text = page.read_text()
        for name in re.findall(r"`(\w+)` extra", text):
            if name not in extras:
                problems.append(f"{_rel(page)}: the `{name}` extra")
        for spec, comment in re.findall(r"pip install [^\n#]*?\[([\w,]+)\][^\n#]*(#[^\n]*)?", text):
            problems += [f"{_rel(page)}: [{e}]" for e in spec.split(",") if e not in extras]
            for name, packages in re.findall(r"(\w+): ([\w\-\[\], ]+?)(?:;|$)", comment):
                listed = {p.strip().lower() for p in packages.split(",")}
                if extras.get(name) != listed:
                    problems.append(f"{_rel(page)}: {name}: {sorted(listed)}")
    assert not problems, f"extras that differ from pyproject.toml: {problems}"


# --------------------------------------------------------------------------- benchmark results


@pytest.mark.parametrize("log", sorted(RESULTS.glob("*.jsonl")), ids=lambda p: p.name)
def test_committed_logs_are_json_lines(log: Path) -> None:
    bad = []
    for number, line in enumerate(log.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
        except ValueError:
            bad.append(number)
            continue
        if not isinstance(row, dict):
            bad.append(number)
    assert not bad, f"{log.name}: lines {bad} are not JSON objects"


def _bench(name: str) -> ModuleType:
    path = ROOT / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_docs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_depth_results_render_from_their_log(tmp_path: Path, capsys: Any, monkeypatch) -> None:
    """depth.md is what bench_depth.py renders from depth.jsonl, and its stdout is JSON lines."""
    pytest.importorskip("torchvision")
    bench = _bench("bench_depth")
    out = tmp_path / "depth.md"
    argv = ["bench_depth.py", "--from-log", str(RESULTS / "depth.jsonl"), "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    threads = torch.get_num_threads()
    try:
        bench.main()
    finally:
        torch.set_num_threads(threads)
    assert out.read_text() == (RESULTS / "depth.md").read_text()
    assert capsys.readouterr().out == ""  # messages go to stderr

    (tmp_path / "bad.jsonl").write_text(
        '{"resnet34_end_to_end": {}}\nwrote benchmarks/results/depth.md\n'
    )
    with pytest.raises(SystemExit, match=r"bad\.jsonl:2 is not a JSON line"):
        bench.read_log(tmp_path / "bad.jsonl")


def test_runtimes_results_render_from_their_log(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("torchvision")
    bench = _bench("bench_runtimes")
    out = tmp_path / "runtimes.md"
    monkeypatch.setattr(sys, "argv", ["bench_runtimes.py", "--from-log", "--out", str(out)])
    threads = torch.get_num_threads()
    try:
        bench.main()
    finally:
        torch.set_num_threads(threads)
    assert out.read_text() == (RESULTS / "runtimes.md").read_text()


def test_bench_runtimes_times_with_the_low_quantile() -> None:
    """bench_runtimes' ratios come from fxcompress.latency.timing.paired_timing, as the docs say."""
    pytest.importorskip("torchvision")
    bench = _bench("bench_runtimes")
    calls = {"a": 0, "b": 0}

    def count(side: str):
        def run() -> None:
            calls[side] += 1

        return run

    a_ms, b_ms, ratio, _ = bench.paired(count("a"), count("b"), 3)
    assert a_ms > 0
    assert b_ms > 0
    assert ratio == pytest.approx(b_ms / a_ms)
    assert min(calls.values()) >= 3
    source = inspect.getsource(bench)
    assert "paired_timing" in source
    assert "statistics.median" not in source


def test_lowrank_defaults_produce_the_committed_table() -> None:
    """bench_lowrank.py's defaults run the parts and budgets of results/lowrank.json, and its
    tables render to the committed lowrank.md."""
    pytest.importorskip("torchvision")
    bench = _bench("bench_lowrank")
    args = bench.build_parser().parse_args([])
    results = json.loads((RESULTS / "lowrank.json").read_text())
    assert set(args.parts) == set(results) - {"timing"}

    def ordered(values: Any) -> list:
        return list(dict.fromkeys(values))

    digits = results["digits"]
    assert ordered(r["fraction"] for r in digits["rows"]) == args.fractions
    assert ordered(r["method"] for r in digits["rows"]) == list(bench.METHODS)
    assert digits["epochs"] == args.epochs
    assert ordered(r["fraction"] for r in results["latency"]["rows"]) == args.latency_fractions
    assert ordered(r["model"] for r in results["torchvision"]) == args.models
    assert ordered(r["fraction"] for r in results["torchvision"]) == args.tv_fractions
    assert bench.render(results) == (RESULTS / "lowrank.md").read_text()
    source = inspect.getsource(bench)
    assert "paired_timing" in source
    assert "statistics.median" not in source
