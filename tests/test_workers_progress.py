"""The archive run's progress lines: throttled, always the last one, counts and ETA."""

from __future__ import annotations

import logging

import pytest

from workers.archive_job import Progress


def test_progress_lines_are_throttled_and_the_last_always_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="workers.archive_job")
    progress = Progress(planned=4, every_s=3600.0)
    progress.add(1, 0, 30.0)
    progress.add(2, 1, 60.0)
    assert not caplog.records  # within the interval and not done
    progress.add(1, 0, 90.0)
    (record,) = caplog.records
    assert "progress: 4/4 recordings (1 failed), 0.050 h of audio" in record.getMessage()
    assert "ETA 0 s" in record.getMessage()


def test_progress_every_batch_when_the_interval_is_zero(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="workers.archive_job")
    progress = Progress(planned=10, every_s=0.0)
    progress.add(2, 0, 10.0)
    progress.add(3, 0, 10.0)
    assert [r.getMessage().split(" recordings")[0] for r in caplog.records] == [
        "progress: 2/10",
        "progress: 5/10",
    ]
