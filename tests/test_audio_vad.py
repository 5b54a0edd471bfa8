"""Energy VAD on synthetic recordings (silence, steady noise, speech-like bursts in noise) and on a real
example made quiet, offset or followed by a quiet stretch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.audio.decode import decode_audio
from pipeline.audio.vad import find_speech
from tests.conftest import write_wav

RATE = 16000
INTRO = Path(__file__).resolve().parents[1] / "examples" / "intro.wav"  # two sentences, a 1.2 s pause


def babble(seconds: float, rng: np.random.Generator, level: float = 0.2) -> np.ndarray:
    """Speech-like signal: a 120-220 Hz harmonic voice whose loudness swings at a syllable rate of ~4 Hz."""
    t = np.arange(int(seconds * RATE)) / RATE
    pitch = 170 + 50 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6))
    phase = 2 * np.pi * np.cumsum(pitch) / RATE
    voice = sum(np.sin(k * phase) / k for k in range(1, 6))
    syllables = 0.55 + 0.45 * np.sin(2 * np.pi * 4.0 * t + rng.uniform(0, 6))
    return (level * voice * syllables / 2).astype(np.float32)


def recording(layout: list[tuple[str, float]], noise: float, seed: int = 0) -> tuple[np.ndarray, list]:
    """Concatenate ('speech' | 'pause', seconds) pieces over white noise of RMS ``noise``."""
    rng = np.random.default_rng(seed)
    pieces, truth, t = [], [], 0.0
    for kind, seconds in layout:
        if kind == "speech":
            pieces.append(babble(seconds, rng))
            truth.append((t, t + seconds))
        else:
            pieces.append(np.zeros(int(seconds * RATE), np.float32))
        t += seconds
    x = np.concatenate(pieces)
    return x + noise * rng.standard_normal(len(x)).astype(np.float32), truth


def test_pure_silence_and_empty_input() -> None:
    assert find_speech(np.zeros(RATE * 5, np.float32), RATE) == []
    assert find_speech(np.zeros(0, np.float32), RATE) == []


@pytest.mark.parametrize("noise", [0.001, 0.05])
def test_steady_noise_alone_is_not_speech(noise: float) -> None:
    x = noise * np.random.default_rng(1).standard_normal(RATE * 20).astype(np.float32)
    assert find_speech(x, RATE) == []


@pytest.mark.parametrize("noise", [0.0, 0.002, 0.02])
def test_speech_regions_found_in_noise(noise: float) -> None:
    layout = [
        ("pause", 2.0),
        ("speech", 4.0),
        ("pause", 1.5),
        ("speech", 6.0),
        ("pause", 3.0),
        ("speech", 2.5),
    ]
    x, truth = recording([*layout, ("pause", 2.0)], noise)
    found = find_speech(x, RATE)
    assert len(found) == len(truth)
    for (start, end), (true_start, true_end) in zip(found, truth, strict=True):
        # Padding widens each region by up to ~0.35 s; the syllable envelope may start a little late.
        assert true_start - 0.4 <= start <= true_start + 0.15
        assert true_end - 0.15 <= end <= true_end + 0.5


def test_noise_floor_adapts_to_a_louder_second_half() -> None:
    """Speech is found on both sides of a 20 dB noise step; a false region may only follow the step
    for about half the floor window, until the floor has caught up."""
    rng = np.random.default_rng(2)
    x, truth = recording(
        [("pause", 3.0), ("speech", 3.0), ("pause", 14.0), ("speech", 3.0), ("pause", 3.0)], 0.0
    )
    step_s = len(x) / 2 / RATE
    noise = rng.standard_normal(len(x)).astype(np.float32)
    noise[: len(x) // 2] *= 0.002
    noise[len(x) // 2 :] *= 0.02  # a fan switched on mid-recording
    found = find_speech(x + noise, RATE, floor_window_s=4.0)
    for true_start, true_end in truth:
        assert any(start - 0.1 <= true_start and true_end <= end + 0.2 for start, end in found)
    extra = [r for r in found if not any(r[0] < t[1] and r[1] > t[0] for t in truth)]
    assert all(step_s - 0.5 <= start and end <= step_s + 2.0 + 0.5 for start, end in extra)


def test_short_gaps_bridged_and_clicks_dropped() -> None:
    x, _ = recording(
        [("pause", 1.0), ("speech", 2.0), ("pause", 0.15), ("speech", 2.0), ("pause", 2.0)], 0.001
    )
    click = np.zeros(int(0.05 * RATE), np.float32) + 0.5
    x = np.concatenate([x, click, np.zeros(RATE, np.float32)])
    found = find_speech(x, RATE)
    assert len(found) == 1 and found[0][1] < 5.8


@pytest.mark.parametrize(("gain_db", "dc"), [(-40.0, 0.0), (0.0, 0.03), (0.0, 0.1)])
def test_quiet_or_offset_speech_found_as_at_full_level(tmp_path: Path, gain_db: float, dc: float) -> None:
    """Real speech 40 dB down (peak -44 dBFS) or over a DC offset, written as 16-bit PCM and decoded, keeps
    the regions of the original: no fixed dBFS threshold, and the offset adds no energy."""
    speech = decode_audio(INTRO).samples
    expected = find_speech(speech, RATE)
    assert len(expected) == 2
    changed = decode_audio(write_wav(tmp_path / "changed.wav", speech * 10 ** (gain_db / 20) + dc)).samples
    found = find_speech(changed, RATE)
    assert len(found) == len(expected)
    for (start, end), (true_start, true_end) in zip(found, expected, strict=True):
        assert start == pytest.approx(true_start, abs=0.1) and end == pytest.approx(true_end, abs=0.1)


@pytest.mark.parametrize("kind", ["hiss", "hiss-dc", "hiss-drift", "dither"])
def test_near_silent_noise_is_not_speech(kind: str) -> None:
    """-70 dBFS hiss alone, over a DC offset of 0.1 or a drifting one, and 16-bit dither (-2..2 steps)."""
    rng = np.random.default_rng(3)
    n = RATE * 20
    if kind == "dither":
        x = (rng.integers(-1, 2, n) + rng.integers(-1, 2, n)) / 32768
    else:
        offset = {"hiss": 0.0, "hiss-dc": 0.1, "hiss-drift": np.linspace(-0.3, 0.3, n)}[kind]
        x = offset + 10 ** (-70 / 20) * rng.standard_normal(n)
    assert find_speech(x.astype(np.float32), RATE) == []


def test_faint_sound_in_a_quiet_stretch_is_not_speech() -> None:
    """After normal-level speech the floor drops to -85 dBFS; a -62 dBFS rustle there, some 45 dB below
    the loud speech frames, is too faint to count (as under the old fixed -55 dBFS limit)."""
    rng = np.random.default_rng(4)
    speech = decode_audio(INTRO).samples
    quiet = 10 ** (-85 / 20) * rng.standard_normal(RATE * 20)
    quiet[RATE * 10 : RATE * 21 // 2] += 10 ** (-62 / 20) * rng.standard_normal(RATE // 2)
    found = find_speech(np.concatenate([speech, quiet]), RATE)
    assert len(found) == 2 and found[-1][1] < len(speech) / RATE + 0.5
