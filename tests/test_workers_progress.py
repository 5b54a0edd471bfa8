"""Run progress: the tally of recordings whose windows all left the model stage, and a dead tally
actor costing only the lines (the lines themselves, logged from a real tally actor during a run, are
checked in tests/test_job_archive.py)."""

from __future__ import annotations

import time

import pytest

from workers.progress import ProgressLog, Tally, eta
from workers.ray_run import TallyActor, actor_counts


def test_a_recording_is_done_when_its_last_window_is_in_whatever_the_order() -> None:
    tally = Tally()
    tally.add([("long", 3, "ok", 70.0), ("short", 1, "ok", 5.0), ("bad", 0, "error", 0.0)])
    # long has 1 of 3 windows (a third of a recording in flight); an error row is a whole recording
    assert tally.counts() == pytest.approx((2, 1, 5.0, 1 / 3))
    tally.add([("silent", 0, "empty", 9.0), ("long", 3, "error", 70.0)])  # a window failed in the model
    assert tally.counts() == pytest.approx((3, 1, 14.0, 2 / 3))
    tally.add([("long", 3, "ok", 70.0)])
    assert tally.counts() == pytest.approx((4, 2, 84.0, 0.0))
    assert not tally.pending


@pytest.mark.usefixtures("ray_local")
def test_a_dead_tally_actor_costs_progress_lines_never_the_run(caplog: pytest.LogCaptureFixture) -> None:
    import ray

    tally = TallyActor.remote()
    ray.get(tally.add.remote([("a", 1, "ok", 1.0)]))
    ray.kill(tally)
    with ProgressLog(actor_counts(tally), planned=2, every_s=0.05) as progress:
        time.sleep(0.3)  # the loop's polls fail: one warning, then silence
    assert not progress._thread.is_alive()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith("progress lines stopped: ")


def test_eta_is_unknown_until_work_is_done_then_the_rate_so_far() -> None:
    assert eta(40.0, 0.0, 2) == "unknown"
    assert eta(40.0, 0.5, 2) == "120 s"  # half of one of two recordings in 40 s: 1.5 left at that rate
    assert eta(40.0, 2.0, 2) == "0 s"
