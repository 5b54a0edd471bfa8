"""The fault-injection harness at CI scale: the job killed -9 mid-run and on a disk that fills, each
ending with the clean run's committed view and little work redone (benchmarks/fault_injection.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.fault_injection import main

pytestmark = pytest.mark.slow
COMMIT_EVERY_N = 2
BATCH = 4  # windows per model call in the harness's runs (JOB_ARGS)


def test_killed_driver_and_full_disk_lose_nothing_and_redo_at_most_a_part(tmp_path: Path) -> None:
    argv = [
        "faults",
        "--work",
        str(tmp_path),
        "--short",
        "6",
        "--long",
        "1",
        "--kills",
        "1",
        "--kill-by",
        "0.5",
    ]
    out = main([*argv, "--commit-every-n", str(COMMIT_EVERY_N), "--cases", "driver", "disk"])
    driver, disk = out["cases"]
    assert driver["same_view"], driver
    assert [r["exit_status"] for r in driver["runs"]][-1] == 0
    assert len(driver["runs"]) == 2 and driver["runs"][0]["exit_status"] == -9  # killed, then finished
    # At most the part in flight, plus what the driver had not yet been handed by Ray: one model call.
    assert all(n <= COMMIT_EVERY_N + BATCH for n in driver["redone"]), driver
    if disk["note"].startswith("skipped"):
        pytest.skip(disk["note"])
    first, final = disk["runs"]
    assert first["exit_status"] == 1 and "No space left on device" in first["tail"], first
    assert str(tmp_path / "disk") in first["tail"]
    assert final["exit_status"] == 0 and disk["same_view"], disk
