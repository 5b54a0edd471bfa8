"""The archive run on a real local Ray cluster with the real Whisper tiny.en (the tiny random
Qwen2-Audio for a sparse task): results, reruns, a model actor killed mid-batch, bad inputs,
WebDataset input, refusal of a task the model cannot do."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import signal
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from benchmarks import score_run
from benchmarks.fault_injection import descendants, find
from pipeline.inputs import PlanError
from pipeline.models.base import ModelTaskError
from pipeline.models.registry import describe_model
from pipeline.presets import resolve_reduction
from pipeline.publish import committed_manifests, read_committed
from pipeline.tasks import EMOTIONS, UNKNOWN
from schemas.job_config import JobConfig, JobConfigError
from tests.audio_files import encode_audio, speech_in_silence
from tests.conftest import tone_bursts, write_wav
from workers import in_process, ray_run
from workers.archive_job import RunSummary, run_archive

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Good recordings (one long enough for two windows, one 6-channel 96 kHz) and bad ones."""
    root = tmp_path_factory.mktemp("archive")
    write_wav(root / "short.wav", tone_bursts(3.0))
    write_wav(root / "calls" / "long.wav", tone_bursts(35.0, 44100), 44100, channels=2)
    write_wav(root / "calls" / "six.wav", tone_bursts(2.0, 96000), 96000, channels=6)
    write_wav(root / "silence.wav", np.zeros(16000, dtype=np.float32))
    (root / "empty.wav").write_bytes(b"")
    (root / "text.wav").write_text("not audio\n" * 50)
    return root


def _table(output: Path, name: str) -> list[dict]:
    """A committed table without its run ids, sorted by recording id."""
    rows = [{k: v for k, v in r.items() if k != "run_id"} for r in read_committed(output, name).to_pylist()]
    return sorted(rows, key=lambda r: r["recording_id"])


def _texts(output: Path) -> dict[str, str]:
    return {r["recording_id"]: r["text"] for r in _table(output, "results")}


@pytest.fixture(scope="module")
def reference(archive: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RunSummary]:
    output = tmp_path_factory.mktemp("reference")
    return output, run_archive(JobConfig(str(archive), str(output), batch_size=2))


def test_run_writes_one_row_per_recording(reference: tuple[Path, RunSummary]) -> None:
    output, summary = reference
    assert (summary.ok, summary.empty, summary.failed, summary.skipped) == (3, 1, 2, 0)
    results, errors = _table(output, "results"), _table(output, "errors")
    assert [r["recording_id"] for r in results] == [
        "calls/long.wav",
        "calls/six.wav",
        "short.wav",
        "silence.wav",
    ]
    assert [(e["recording_id"], e["stage"]) for e in errors] == [
        ("empty.wav", "decode"),
        ("text.wav", "decode"),
    ]
    assert {r["recording_id"]: r["status"] for r in results}["silence.wav"] == "empty"
    stats = {s["recording_id"]: s for s in _table(output, "stats")}
    assert stats["calls/long.wav"]["windows"] >= 2 and stats["calls/long.wav"][
        "audio_seconds"
    ] == pytest.approx(35.0)
    assert stats["short.wav"]["generated_tokens"] > 0 and stats["short.wav"]["real_time_factor"] > 0
    # the local cluster's 2 CPUs: 1.5 to the model actor, which runs as many torch threads
    assert {s["device_name"] for s in stats.values()} == {"cpu (2 threads)"}
    (manifest,) = committed_manifests(output)
    assert manifest.counts == {"planned": 6, "ok": 3, "empty": 1, "error": 2}
    short = next(e for e in manifest.recordings if e.recording_id == "short.wav")
    assert short.source_path.endswith("short.wav") and short.source_size > 0 and short.source_mtime_ns > 0
    assert manifest.reduction["method"] == "fastadasp" and manifest.config["model"] == "whisper-tiny.en"
    peaks = manifest.extra["stage_peak_rss_bytes"]  # a Ray run: each stage's processes' peak
    assert peaks["model_stage"] > 200 * 2**20 and 30 * 2**20 < peaks["cpu_stage"] < peaks["model_stage"]
    assert "ok 3, empty 1, failed 2" in summary.line()
    # the folder a user reads with pandas holds exactly the committed rows, segments and all
    for name in ("results", "stats", "errors"):
        pd.testing.assert_frame_equal(
            pd.read_parquet(output / name), read_committed(output, name).to_pandas()
        )


def test_rerun_adds_and_changes_nothing(
    archive: Path, reference: tuple[Path, RunSummary], monkeypatch: pytest.MonkeyPatch
) -> None:
    output, _ = reference
    before = {name: _table(output, name) for name in ("results", "stats", "errors")}

    def no_work(*args: object) -> None:
        raise AssertionError("a run with nothing to do started an executor")

    for executor in (ray_run, in_process):
        monkeypatch.setattr(executor, "window_texts", no_work)
    again = run_archive(JobConfig(str(archive), str(output)))
    assert (again.run_id, again.skipped) == (None, 6)
    assert {name: _table(output, name) for name in before} == before
    assert len(committed_manifests(output)) == 1


def test_score_run_matches_manifest_rows_to_committed_recordings(
    reference: tuple[Path, RunSummary], tmp_path: Path
) -> None:
    output, _ = reference
    said = {name: text for name, text in _texts(output).items() if text and text.strip()}
    assert said  # the model says something about the tone bursts
    rows = [
        {"id": name, "audio": f"clips/{name}", "language": "en", "text": text} for name, text in said.items()
    ]
    rows += [
        {"id": "quiet", "audio": "silence.wav", "language": "en", "text": "nothing"},  # committed as empty
        {"id": "gone", "audio": "gone.wav", "language": "en", "text": "never processed"},
        {"id": "other", "audio": "short.wav", "language": "fr", "text": "bonjour"},  # another language
    ]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = score_run.score(output, manifest, "asr", ["en"])
    assert (result["scored"], result["not_ok"], result["missing"]) == (len(said), ["silence.wav"], ["gone"])
    assert result["scores"]["WER %"] == 0.0


def test_errors_a_setting_caused_are_redone_and_retry_errors_redoes_the_rest(
    archive: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="workers.progress")
    limited = run_archive(JobConfig(str(archive), str(tmp_path), max_duration_s=20.0, progress_every_s=0.2))
    assert (limited.ok, limited.failed) == (2, 3)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress: ")]
    assert len(lines) >= 2 and "progress: 6/6 recordings (3 failed), 0.002 h of audio" in lines[-1]
    assert ("calls/long.wav", "limit") in [
        (e["recording_id"], e["stage"]) for e in _table(tmp_path, "errors")
    ]
    # The limit is no part of the fingerprint: the default run redoes only what the limit failed.
    lifted = run_archive(JobConfig(str(archive), str(tmp_path)))
    assert (lifted.planned, lifted.skipped, lifted.ok) == (1, 5, 1)
    assert "calls/long.wav" in _texts(tmp_path)
    assert [e["recording_id"] for e in _table(tmp_path, "errors")] == ["empty.wav", "text.wav"]
    assert run_archive(JobConfig(str(archive), str(tmp_path))).run_id is None  # decode errors stay done
    retried = run_archive(JobConfig(str(archive), str(tmp_path), retry_errors=True))
    assert (retried.planned, retried.failed) == (2, 2)


def test_bad_paths_and_overlap_are_refused_before_any_work(archive: Path, tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="no such file or folder"):
        run_archive(JobConfig(str(tmp_path / "missing"), str(tmp_path / "out")))
    (tmp_path / "file").write_text("")
    with pytest.raises(JobConfigError, match="is a file"):
        run_archive(JobConfig(str(archive), str(tmp_path / "file")))
    with pytest.raises(JobConfigError, match=r"--overlap-s 15\.0 must be below half"):
        run_archive(JobConfig(str(archive), str(tmp_path / "out"), overlap_s=15.0))
    assert not (tmp_path / "out" / "_tables").exists()


def _predictor_pids() -> list[int]:
    """This test's Ray actors running the model stage on a batch (Ray names the process after the
    operator and the method it runs; other clusters on the machine are not ours to kill)."""
    return find(descendants(os.getpid()), "WindowPredictor)).submit")


def test_model_actor_killed_mid_run_gives_the_same_tables(
    archive: Path, reference: tuple[Path, RunSummary], tmp_path: Path
) -> None:
    result: list[RunSummary] = []
    run = threading.Thread(
        target=lambda: result.append(run_archive(JobConfig(str(archive), str(tmp_path), batch_size=1)))
    )
    run.start()
    deadline = time.monotonic() + 120
    while not (killed := _predictor_pids()) and time.monotonic() < deadline:
        time.sleep(0.02)  # the model loaded and took its first batch: the run is mid-way
    assert killed, "no model actor seen"
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    run.join(300)
    assert result and result[0].ok == 3
    assert _texts(tmp_path) == _texts(reference[0])
    assert _table(tmp_path, "errors") == _table(reference[0], "errors")


def test_webdataset_shard_through_a_sparse_task(tmp_path: Path) -> None:
    """Emotion labels from the tiny random Qwen2-Audio with its one-merge preset; a cut member fails."""
    shard = tmp_path / "shard-000.tar"
    wav = write_wav(tmp_path / "src.wav", tone_bursts(2.0)).read_bytes()
    with tarfile.open(shard, "w") as tar:
        for name, data in (("rec1.wav", wav), ("rec1.json", b'{"speaker": "a"}'), ("rec2.wav", wav[:100])):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    config = JobConfig(str(shard), str(tmp_path / "out"), task="er", model="tiny-random-qwen2-audio")
    summary = run_archive(config)
    assert (summary.ok, summary.failed) == (1, 1)
    (result,) = _table(tmp_path / "out", "results")
    assert (result["recording_id"], result["meta"], result["text"]) == ("rec1", '{"speaker": "a"}', None)
    assert result["label"] in (*EMOTIONS, UNKNOWN)
    assert json.loads(result["reduction"]) == resolve_reduction(describe_model(config.model), "er").to_dict()
    assert json.loads(result["reduction"])["schedule"] == "single"
    assert [e["recording_id"] for e in _table(tmp_path / "out", "errors")] == ["rec2"]


def test_task_the_model_cannot_do_is_refused_before_any_work(archive: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelTaskError, match=r"whisper-tiny.en' cannot do task 'er'"):
        run_archive(JobConfig(str(archive), str(tmp_path / "out"), task="er", reduction="none"))
    assert not (tmp_path / "out" / "_tables").exists() and not (tmp_path / "out" / "_staging").exists()


def _reading(path: Path) -> list[int]:
    """This test's processes (its Ray workers) with ``path`` open."""
    pids = []
    for pid in descendants(os.getpid()):
        with contextlib.suppress(OSError):  # gone meanwhile, or not ours to look into
            if any(os.readlink(fd) == str(path) for fd in Path(f"/proc/{pid}/fd").iterdir()):
                pids.append(pid)
    return pids


def test_a_recording_that_kills_its_worker_every_time_becomes_a_crash_row(tmp_path: Path) -> None:
    """On Ray, a recording whose CPU-stage worker dies on every try (a native decoder crash, the memory
    killer: here kill -9 whenever a worker has the file open) does not fail or stall the run: after its
    retries, and once more alone, it is an error row of stage crash; the recordings beside it are done."""
    archive = tmp_path / "in"
    for name in ("a", "b"):
        write_wav(archive / f"{name}.wav", tone_bursts(3.0))
    victim = encode_audio(
        archive / "victim.flac", speech_in_silence(tone_bursts(3.0), 1200.0, 300.0, 16000), 16000
    )
    result: list[RunSummary] = []
    run = threading.Thread(
        target=lambda: result.append(
            run_archive(JobConfig(str(archive), str(tmp_path / "out"), executor="ray"))
        )
    )
    run.start()
    kills = 0
    while run.is_alive():
        for pid in _reading(victim):
            os.kill(pid, signal.SIGKILL)
            kills += 1
        time.sleep(0.01)
    assert result and (result[0].ok, result[0].failed) == (2, 1), result
    (error,) = read_committed(tmp_path / "out", "errors").to_pylist()
    assert (error["recording_id"], error["stage"]) == ("victim.flac", "crash")
    assert "died on each of 6 tries" in error["error"] and kills >= 6
