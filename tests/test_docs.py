"""The documentation's examples run, and its links point at files that exist."""

from __future__ import annotations

import doctest
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = sorted(DOCS.glob("*.md"))
WITH_EXAMPLES = [p for p in PAGES if re.search(r"^\s*>>> ", p.read_text(), re.MULTILINE)]


def test_some_pages_have_examples() -> None:
    assert DOCS / "quickstart.md" in WITH_EXAMPLES


@pytest.mark.parametrize("page", WITH_EXAMPLES, ids=lambda p: p.name)
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


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_exist(page: Path) -> None:
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text())
    missing = [
        link for link in links if "://" not in link and not (page.parent / link).resolve().exists()
    ]
    assert not missing, f"{page.name} links to missing files: {missing}"


def test_api_reference_names_every_public_name() -> None:
    import fxcompress
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
