"""Run progress: the tally of recordings whose windows all left the model stage (the progress lines
themselves, logged from a real tally actor during a run, are checked in tests/test_job_archive.py)."""

from __future__ import annotations

import pytest

from workers.progress import Tally


def test_a_recording_is_done_when_its_last_window_is_in_whatever_the_order() -> None:
    tally = Tally()
    tally.add([("long", 3, "ok", 70.0), ("short", 1, "ok", 5.0), ("bad", 0, "error", 0.0)])
    assert tally.counts() == (2, 1, 5.0)  # long has 1 of 3 windows; an error row is a whole recording
    tally.add([("silent", 0, "empty", 9.0), ("long", 3, "error", 70.0)])  # a window failed in the model
    assert tally.counts() == (3, 1, 14.0)
    tally.add([("long", 3, "ok", 70.0)])
    assert tally.counts() == pytest.approx((4, 2, 84.0))
    assert not tally.pending
