"""Shared fixtures: a real local Ray cluster per test module, small real audio files, and a job
driver killed mid-run then resumed."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import wave
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.publish import committed_manifests, read_committed  # imports neither torch nor triton

# Triton decides interpreted vs compiled when it is first imported (transformers imports it through
# torch._dynamo), so the CPU kernel tests need this set before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    """One local Ray cluster (2 CPUs) shared by a test module; shut down after its last test."""
    import ray

    # address="local": always a fresh cluster, never one that `ray start` left running on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def whisper(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """The packaged Whisper tiny.en (real weights, converted into a cache of the test module's own)."""
    from pipeline.models.whisper import TINY_EN, load_packaged

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTADASP_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield load_packaged(TINY_EN)


def tone_bursts(
    seconds: float, sample_rate: int = 16000, burst_s: float = 0.8, gap_s: float = 0.6
) -> np.ndarray:
    """Speech-like test signal: noisy tone bursts separated by silence, float32 of shape (n,)."""
    rng = np.random.default_rng(0)
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    on = (t % (burst_s + gap_s)) >= gap_s
    signal = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(len(t))
    return (signal * on).astype(np.float32)


def write_wav(path: Path, samples: np.ndarray, sample_rate: int = 16000, channels: int = 1) -> Path:
    """16-bit PCM wav; ``samples`` (n,) is repeated over ``channels``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(np.repeat(pcm[:, None], channels, axis=1).tobytes())
    return path


@pytest.fixture
def make_wav() -> Callable[..., Path]:
    """Factory: ``make_wav(path, seconds=2.0, sample_rate=16000, channels=1)`` writes tone bursts."""

    def make(path: Path, seconds: float = 2.0, sample_rate: int = 16000, channels: int = 1) -> Path:
        return write_wav(path, tone_bursts(seconds, sample_rate), sample_rate, channels)

    return make


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random checkpoint folders of the decoder-only families, saved as real ones are."""
    from tests.checkpoints import save_glm_asr, save_qwen2_audio

    root = tmp_path_factory.mktemp("checkpoints")
    return {
        "qwen-base": save_qwen2_audio(root / "qwen-base", "base"),
        "qwen-instruct": save_qwen2_audio(root / "qwen-instruct", "instruct"),
        "glm": save_glm_asr(root / "glm"),
    }


def hub_cache(root: Path, repo_id: str, snapshot: Path) -> Path:
    """A Hugging Face hub cache holding ``snapshot`` as ``repo_id``'s main revision (the layout
    ``huggingface_hub`` writes: files under snapshots/<commit>, refs/main naming the commit)."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(snapshot, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return root


ROOT = Path(__file__).resolve().parent.parent


def start_job(launcher: list[str], archive: Path, output: Path, env: dict, *extra: str) -> subprocess.Popen:
    """jobs/transcribe_archive.py as a user starts it (``launcher``: the interpreter and how it is given
    the script), one window per model call, output captured."""
    cmd = [*launcher, "--input", str(archive), "--output", str(output), "--batch-size", "1", *extra]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def killed_and_resumed(
    start: Callable[..., subprocess.Popen], *resume_args: str, sig: signal.Signals = signal.SIGKILL
) -> tuple[int, str]:
    """``start(*args)`` runs the job on an output folder: kill -9 (or send ``sig``) a run committing
    every recording once its first part is committed, then run it again to the end. Returns (recordings
    the killed run kept, the resumed run's output); asserts both runs behaved: a run stopped by SIGINT
    (Ctrl-C) exits 130 with one line saying what it committed and how to resume."""
    victim = start("--commit-every-n", "1")
    output = Path(victim.args[victim.args.index("--output") + 1])
    deadline = time.monotonic() + 180
    while not committed_manifests(output):  # the first part: the run is mid-way
        assert victim.poll() is None and time.monotonic() < deadline, victim.stdout.read()
        time.sleep(0.05)
    victim.send_signal(sig)
    said, _ = victim.communicate(timeout=120)
    kept = sum(len(m.recordings) for m in committed_manifests(output))  # the killed run's parts stay
    if sig == signal.SIGINT:
        assert victim.returncode == 130 and "Traceback" not in said, said
        assert f"{kept} recording(s), committed to {output.resolve()}; rerun the same command" in said, said
    resumed = start(*resume_args)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert f"skipped (done before) {kept}" in out.splitlines()[-1]
    assert not list((output / "_staging").glob("*"))
    return kept, out


def alone_in_flight(
    proc: subprocess.Popen, output: Path, recording_id: str, since: float, timeout_s: float
) -> str | None:
    """Wait until the run ``proc`` (started at ``since``, epoch seconds) records ``recording_id`` alone
    in flight with a part committed (``pipeline.publish.InFlight``); that run's id, or None if the run
    ended or the time ran out first."""
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline:
        for path in (output / "_inflight").glob("*.json"):
            with contextlib.suppress(OSError, ValueError):  # replaced while read
                record = json.loads(path.read_text())
                alone = record["recordings"] == [recording_id] and path.stat().st_mtime > since
                if alone and committed_manifests(output):
                    return record["run_id"]
        time.sleep(0.02)
    return None


class _Close(float):
    def __eq__(self, other: object) -> bool:
        return isinstance(other, float) and abs(self - other) <= 1e-5

    __hash__ = float.__hash__


def committed_rows(output: Path, name: str) -> list[dict]:
    """A committed table's rows without run ids, sorted by recording id; of the stats table only the
    counts (timings, devices and nodes differ between runs); word probabilities equal within 1e-5 (a
    window's logits round differently with the rows decoding beside it; its tokens do not change)."""
    keep = ("recording_id", "audio_seconds", "windows", "audio_tokens_in", "generated_tokens")
    rows = [{k: v for k, v in r.items() if k != "run_id"} for r in read_committed(output, name).to_pylist()]
    if name == "stats":
        rows = [{k: r[k] for k in keep} for r in rows]
    for row in rows:
        for word in row.get("words") or ():
            word["probability"] = _Close(word["probability"])
    return sorted(rows, key=lambda r: r["recording_id"])
