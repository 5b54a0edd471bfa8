"""The in-process executor: a single-machine run with no Ray imported at all gives the Ray run's
tables, keeps its committed parts when the driver is killed, logs progress, and stops its cutting
thread when the run stops early; ``--executor auto`` picks it only where no cluster is involved."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.inputs import list_recordings
from pipeline.publish import committed_manifests, read_committed
from schemas.job_config import JobConfig, JobConfigError
from tests.conftest import tone_bursts, write_wav
from workers import in_process
from workers.archive_job import run_archive, uses_ray

ROOT = Path(__file__).resolve().parent.parent
# The job as a user runs it, on a machine where Ray cannot be imported (the GPU machines have none).
NO_RAY = "import runpy, sys; sys.modules['ray'] = None; sys.argv[0] = {job!r}; runpy.run_path({job!r}, run_name='__main__')"


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("archive")
    for i in range(3):
        write_wav(root / f"r{i}.wav", tone_bursts(4.0 + 3 * i))
    write_wav(root / "long.wav", tone_bursts(35.0))  # two windows
    write_wav(root / "silence.wav", np.zeros(16000, dtype=np.float32))
    (root / "broken.wav").write_bytes(b"RIFF....WAVEfmt nothing else")
    return root


def _job(archive: Path, output: Path, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    script = NO_RAY.format(job=str(ROOT / "jobs" / "transcribe_archive.py"))
    cmd = [
        sys.executable,
        "-c",
        script,
        "--input",
        str(archive),
        "--output",
        str(output),
        "--batch-size",
        "1",
    ]
    return subprocess.Popen(
        [*cmd, *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _rows(output: Path, name: str) -> list[dict]:
    keep = ("recording_id", "audio_seconds", "windows", "audio_tokens_in", "generated_tokens")
    rows = []
    for row in read_committed(output, name).to_pylist():
        if name == "stats":  # timings, devices and nodes differ between runs; the counts must not
            row = {k: row[k] for k in keep}
        rows.append({k: v for k, v in row.items() if k != "run_id"})
    return sorted(rows, key=lambda r: r["recording_id"])


def test_auto_runs_in_process_only_without_a_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    # First in the module: the last test's cluster is not up yet (a connected driver means Ray).
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not uses_ray(JobConfig("in", "out"))
    assert uses_ray(JobConfig("in", "out", model_actors=2))
    assert uses_ray(JobConfig("in", "out", executor="ray"))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # a submitted job
    assert uses_ray(JobConfig("in", "out"))
    assert not uses_ray(JobConfig("in", "out", executor="in-process"))
    with pytest.raises(JobConfigError, match="--model-actors > 1 needs Ray"):
        JobConfig("in", "out", executor="in-process", model_actors=2)
    with pytest.raises(JobConfigError, match="--executor 'dask'"):
        JobConfig("in", "out", executor="dask")


def test_a_run_that_stops_early_leaves_no_cutting_thread(archive: Path) -> None:
    config = JobConfig(str(archive), "unused", batch_size=1)
    window_kwargs = {"sample_rate": 16000, "max_window_s": 30.0, "overlap_s": 3.0, "max_duration_s": 60.0}
    predictor = {"model_name": "whisper-tiny.en", "request": {"task": "asr"}, "reduction": {"method": "none"}}
    batches, counts = in_process.window_texts(list_recordings(archive), config, window_kwargs, predictor)
    first = next(batches)
    assert first.num_rows == 1 and counts()[0] == 1  # broken.wav's error row: a whole recording
    batches.close()  # the run stopped (a failed commit, say) with the cutter mid-way
    assert not [t for t in threading.enumerate() if t.name == "cut-windows"]


@pytest.mark.slow
def test_killed_in_process_run_resumes_without_ray_to_the_ray_runs_tables(
    ray_local: None, archive: Path, tmp_path: Path
) -> None:
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    run_archive(JobConfig(str(archive), str(reference), batch_size=1, executor="ray"))

    victim = _job(archive, killed, "--commit-every-n", "1")
    deadline = time.monotonic() + 180
    while not committed_manifests(killed):  # the first part: the run is mid-way
        assert victim.poll() is None and time.monotonic() < deadline, victim.stdout.read()
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    kept = sum(len(m.recordings) for m in committed_manifests(killed))
    assert 0 < kept < 6

    resumed = _job(archive, killed, "--progress-every-s", "0.5")
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert "plan and the in-process run ready" in out
    assert f"progress: {6 - kept}/{6 - kept} recordings" in out
    assert f"skipped (done before) {kept}" in out.splitlines()[-1]
    for name in ("results", "errors", "stats"):
        assert _rows(killed, name) == _rows(reference, name), name
    manifest = committed_manifests(killed)[-1]
    assert manifest.config["executor"] == "auto" and "ray" not in manifest.versions
