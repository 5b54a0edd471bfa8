"""The archive run commits in parts as recordings finish, survives a dead progress actor, keeps the
committed view true (a file changed back, two sources for one id) and refuses an output it cannot
write; on a real local Ray cluster with the real Whisper tiny.en and the examples' speech."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from benchmarks.fault_injection import descendants, find
from pipeline.publish import committed_manifests, read_committed
from schemas.job_config import JobConfig
from tests.conftest import tone_bursts, write_wav
from workers.archive_job import RunSummary, run_archive

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The examples' four short recordings (6-14 s of speech each)."""
    root = tmp_path_factory.mktemp("speech")
    for name in ("intro.wav", "standup.flac", "announcement.mp3", "library.ogg"):
        shutil.copy(EXAMPLES / name, root / name)
    return root


def _texts(output: Path) -> dict[str, str]:
    return {r["recording_id"]: r["text"] for r in read_committed(output, "results").to_pylist()}


def test_parts_commit_during_the_run_and_a_killed_progress_actor_costs_only_its_lines(
    speech: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="workers.progress")
    config = JobConfig(str(speech), str(tmp_path), batch_size=1, commit_every_n=1, progress_every_s=0.2)
    result: list[RunSummary] = []
    run = threading.Thread(target=lambda: result.append(run_archive(config)))
    run.start()
    deadline = time.monotonic() + 300
    while not committed_manifests(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.05)
    first = committed_manifests(tmp_path)
    assert [len(m.recordings) for m in first] == [1]  # readable at once, before the other recordings
    assert len(read_committed(tmp_path, "results")) == 1
    tally = find(descendants(os.getpid()), "ray::Tally")
    assert tally, "no progress actor seen"
    os.kill(tally[0], signal.SIGKILL)
    run.join(300)
    assert result and (result[0].ok, result[0].failed) == (4, 0)  # the dead actor failed nothing
    assert [m.part for m in committed_manifests(tmp_path)] == [0, 1, 2, 3]
    assert sorted(_texts(tmp_path)) == sorted(p.name for p in speech.iterdir())
    assert any("progress lines stopped" in r.getMessage() for r in caplog.records)


def test_a_file_changed_back_is_processed_again_and_a_second_source_for_an_id_is_an_error(
    tmp_path: Path,
) -> None:
    """A -> B -> A shows A's transcript again; another folder's a.wav into the same output is an errors
    row naming both sources, and the first folder's result stays what a rerun of it finds."""
    one, two, out = tmp_path / "one", tmp_path / "two", tmp_path / "out"
    one.mkdir()
    a = (EXAMPLES / "intro.wav").read_bytes()
    (one / "a.wav").write_bytes(a)
    run_archive(JobConfig(str(one), str(out)))
    text_a = _texts(out)["a.wav"]
    write_wav(one / "a.wav", tone_bursts(4.0))
    assert run_archive(JobConfig(str(one), str(out))).planned == 1
    assert _texts(out)["a.wav"] != text_a
    (one / "a.wav").write_bytes(a)
    assert run_archive(JobConfig(str(one), str(out))).planned == 1  # A again: not in the done-set
    assert _texts(out) == {"a.wav": text_a}

    shutil.copytree(EXAMPLES, two, ignore=shutil.ignore_patterns("*.py", "*.jsonl"))
    shutil.copy(EXAMPLES / "standup.flac", two / "a.wav")
    mixed = run_archive(JobConfig(str(two), str(out)))
    assert (mixed.planned, mixed.failed) == (6, 1)  # the other five are new ids: processed
    (error,) = read_committed(out, "errors").to_pylist()
    assert (error["recording_id"], error["stage"]) == ("a.wav", "plan")
    assert f"already committed from {one / 'a.wav'}, now given by {two / 'a.wav'}" in error["error"]
    assert run_archive(JobConfig(str(one), str(out))).planned == 1  # the first source takes it back
    assert _texts(out)["a.wav"] == text_a


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare to mount a read-only folder")
def test_an_output_folder_that_cannot_be_written_is_refused_before_any_work(
    speech: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    job = Path(__file__).resolve().parents[1] / "jobs" / "transcribe_archive.py"
    script = (
        f"mount -t tmpfs -o ro tmpfs {out} || exit 99; {sys.executable} {job} --input {speech} --output {out}"
    )
    run = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True)
    if run.returncode == 99:
        pytest.skip(f"cannot mount a read-only tmpfs here: {run.stderr.strip()}")
    assert run.returncode == 2, run.stderr
    assert f"refused: --output {out}: cannot write there (Read-only file system)" in run.stderr
    assert "Traceback" not in run.stderr
