"""Logged progress (off a terminal): a line per finished stage, and while a long stage runs, a line
every ``LOG_EVERY_S`` seconds with the steps done and left and the time they should still take."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from fxcompress import progress
from fxcompress.progress import _Counter, bar, track


class _Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_long_stage_logs_steps_left_and_an_estimate_of_the_time_left(caplog) -> None:
    clock = _Clock()
    counter = _Counter("scoring", 5, every=10.0, clock=clock)
    with caplog.at_level(logging.INFO, logger="fxcompress.progress"):
        for _ in range(5):
            clock.now += 6.0  # each step takes 6 s: lines at 12 s and 24 s (every 10 s at most)
            counter.update()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "scoring: 2/5 done in 12.0 s, 3 left, about 18 s to go",
        "scoring: 4/5 done in 24.0 s, 1 left, about 6 s to go",
    ]


def test_a_stage_without_a_total_says_it_is_still_running(caplog) -> None:
    clock = _Clock()
    counter = _Counter("fine-tuning", None, every=1.0, clock=clock)
    with caplog.at_level(logging.INFO, logger="fxcompress.progress"):
        clock.now += 2.0
        counter.update(3)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["fine-tuning: 3 done in 2.0 s, still running"]


def test_short_stages_log_only_their_end(caplog, monkeypatch, tmp_path) -> None:
    with (
        (tmp_path / "stderr").open("w") as stderr,  # not a terminal: logged progress
        caplog.at_level(logging.INFO, logger="fxcompress.progress"),
    ):
        monkeypatch.setattr("sys.stderr", stderr)
        with bar(total=3, desc="scoring", enabled=None) as b:
            for _ in range(3):
                b.update()
        assert sum(track(range(4), desc="batches")) == 6
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert messages[0].startswith("scoring: 3/3 done in ")
    assert messages[1].startswith("batches: 4/4 done in ")


def test_api_md_states_the_logging_interval() -> None:
    api = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    stated = re.search(r"`LOG_EVERY_S` = (\d+(?:\.\d+)?) seconds", api)
    assert stated, "docs/api.md no longer states LOG_EVERY_S"
    assert float(stated.group(1)) == progress.LOG_EVERY_S
