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
import torch

from pipeline.inputs import list_recordings
from pipeline.publish import committed_manifests, crashed, read_committed
from schemas.job_config import JobConfig, JobConfigError
from tests.conftest import (
    ROOT,
    alone_in_flight,
    committed_rows,
    killed_and_resumed,
    start_job,
    tone_bursts,
    write_wav,
)
from workers import in_process
from workers.archive_job import run_archive, uses_ray

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
    return start_job([sys.executable, "-c", script], archive, output, env, *extra)


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


def test_a_run_that_stops_early_leaves_no_cutting_thread_and_num_cpus_caps_threads(archive: Path) -> None:
    config = JobConfig(str(archive), "unused", batch_size=1, num_cpus=1)
    window_kwargs = {"sample_rate": 16000, "max_window_s": 30.0, "overlap_s": 3.0, "max_duration_s": 60.0}
    predictor = {"model_name": "whisper-tiny.en", "request": {"task": "asr"}, "reduction": {"method": "none"}}
    threads = torch.get_num_threads()
    try:
        started: list[str] = []
        batches, counts = in_process.window_texts(
            list_recordings(archive), config, window_kwargs, predictor, started.append
        )
        first, second = next(batches), next(batches)
        assert started[:2] == ["broken.wav", "long.wav"]  # each recording named as its cutting starts
        assert first.num_rows == 1 and counts()[0] == 1  # broken.wav's error row: a whole recording
        assert second["device_name"].to_pylist() == ["cpu (1 threads)"]  # long.wav's first window
        batches.close()  # the run stopped (a failed commit, say) with the cutter mid-way
    finally:
        torch.set_num_threads(threads)
    assert not [t for t in threading.enumerate() if t.name == "cut-windows"]


@pytest.mark.slow
def test_killed_in_process_run_resumes_without_ray_to_the_ray_runs_tables(
    ray_local: None, archive: Path, tmp_path: Path
) -> None:
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    run_archive(JobConfig(str(archive), str(reference), batch_size=1, executor="ray"))

    kept, out = killed_and_resumed(lambda *extra: _job(archive, killed, *extra), "--progress-every-s", "0.5")
    assert 0 < kept < 6
    assert "plan and the in-process run ready" in out
    assert f"progress: {6 - kept}/{6 - kept} recordings" in out
    for name in ("results", "errors", "stats"):
        assert committed_rows(killed, name) == committed_rows(reference, name), name
    manifest = committed_manifests(killed)[-1]
    assert manifest.config["executor"] == "auto" and "ray" not in manifest.versions


@pytest.mark.slow
def test_a_recording_in_flight_when_two_runs_died_is_set_aside_and_the_rest_gets_done(tmp_path: Path) -> None:
    """The nightly run that the kernel's memory killer ends at the same recording every night: the
    third run writes that recording as a ``crash`` error row naming both runs, and does the rest."""
    archive, out = tmp_path / "archive", tmp_path / "out"
    write_wav(archive / "a.wav", tone_bursts(3.0))
    write_wav(archive / "zz-heavy.wav", tone_bursts(150.0))  # the one the process dies on
    dead = []
    for _ in range(2):
        since, job = time.time(), _job(archive, out, "--commit-every-n", "1")
        run_id = alone_in_flight(job, out, "zz-heavy.wav", since, timeout_s=180)
        assert run_id, job.stdout.read()
        job.send_signal(signal.SIGKILL)
        job.wait()
        dead.append(run_id)
    write_wav(archive / "b.wav", tone_bursts(3.0))  # the next night's new recording
    third = _job(archive, out)
    log, _ = third.communicate(timeout=300)
    assert third.returncode == 0, log
    assert "ok 1, empty 0, failed 1, skipped (done before) 1" in log.splitlines()[-1]
    (error,) = read_committed(out, "errors").to_pylist()
    assert (error["recording_id"], error["stage"]) == ("zz-heavy.wav", "crash")
    assert f"in flight when runs {dead[0]}, {dead[1]} died" in error["error"]
    assert sorted(read_committed(out, "results")["recording_id"].to_pylist()) == ["a.wav", "b.wav"]
    assert crashed(out, committed_manifests(out)) == {}  # nothing left to blame: the next run's look
    assert not list((out / "_inflight").iterdir())  # deletes the dead runs' records
