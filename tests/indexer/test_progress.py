"""Progress of a run as its log lines say it, in the log mode used off a terminal."""

from __future__ import annotations

import logging
import re

import pytest

from indexer.progress import Progress


def test_the_count_moves_with_the_work_and_acknowledgements_trail_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="indexer.progress")
    progress = Progress(5, "indexing", mode="log", every_s=0, acknowledgements=True)
    progress.advance(2)  # encoded and sent: the search service has acknowledged none yet
    progress.advance(1)
    progress.acknowledge(2)
    progress.advance(2)
    progress.acknowledge(3)
    lines = [re.sub(r" \(.*?\)", "", record.getMessage()) for record in caplog.records]
    assert lines == [
        "indexing: 2/5 img, 0 acknowledged",
        "indexing: 3/5 img, 0 acknowledged",
        "indexing: 3/5 img, 2 acknowledged",
        "indexing: 5/5 img, 2 acknowledged",
        "indexing: 5/5 img, 5 acknowledged",
    ]


def test_lines_come_every_interval_and_at_the_end(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="indexer.progress")
    progress = Progress(3, "hashing", unit="file", mode="log", every_s=3600)
    progress.advance(2)
    progress.advance(1)
    [line] = [record.getMessage() for record in caplog.records]
    assert re.fullmatch(r"hashing: 3/3 file \([\d.]+ file/s, ETA 0 s\)", line), line


def test_closing_logs_the_acknowledgements_that_came_after_the_last_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="indexer.progress")
    progress = Progress(3, "indexing", mode="log", every_s=3600, acknowledgements=True)
    progress.advance(3)  # the work's last line, before the search service acknowledged it
    progress.acknowledge(3)
    progress.close()
    progress.close()  # nothing new: no line
    lines = [re.sub(r" \(.*?\)", "", record.getMessage()) for record in caplog.records]
    assert lines == ["indexing: 3/3 img, 0 acknowledged", "indexing: 3/3 img, 3 acknowledged"]
