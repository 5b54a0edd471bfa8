"""Shared fixtures: a real local Ray cluster per test module, and small real audio files."""

from __future__ import annotations

import os
import wave
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

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
    from pipeline.models import glm_asr, qwen2_audio

    root = tmp_path_factory.mktemp("checkpoints")
    return {
        "qwen-base": qwen2_audio.save_tiny_random(root / "qwen-base", "base"),
        "qwen-instruct": qwen2_audio.save_tiny_random(root / "qwen-instruct", "instruct"),
        "glm": glm_asr.save_tiny_random(root / "glm"),
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
