"""Energy-based voice activity detection (no model to download).

Frame energies are compared with an adaptive noise floor (a low percentile of the energies around
each frame), so steady background noise raises the floor instead of reading as speech. Hysteresis
(a frame run counts only if it rises ``margin_db`` above the floor somewhere and stays
``margin_db / 2`` above it throughout), short-gap merging, minimum durations, padding and a hangover
turn frame decisions into speech regions.
"""

from __future__ import annotations

import numpy as np

_SILENT_DB = -120.0  # energy of digital silence, keeps log10 finite


def frame_energies_db(samples: np.ndarray, frame_len: int) -> np.ndarray:
    """Mean-square energy in dBFS of consecutive frames: samples (n,) -> (n // frame_len,)."""
    frames = samples[: len(samples) // frame_len * frame_len].reshape(-1, frame_len).astype(np.float64)
    return np.maximum(10.0 * np.log10(np.mean(frames**2, axis=1) + 1e-30), _SILENT_DB)


def noise_floor_db(energy_db: np.ndarray, window: int, percentile: float) -> np.ndarray:
    """Per-frame noise floor, shape like ``energy_db``: the percentile of the energies within
    ``window`` frames, evaluated every ``window // 10`` frames and interpolated between."""
    step = max(1, window // 10)
    anchors = np.arange(0, len(energy_db), step)
    half = window // 2
    levels = [np.percentile(energy_db[max(0, a - half) : a + half + 1], percentile) for a in anchors]
    return np.interp(np.arange(len(energy_db)), anchors, levels)


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) frame index pairs of the True runs of a boolean array."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(), strict=True))


def find_speech(
    samples: np.ndarray,
    sample_rate: int,
    *,
    frame_s: float = 0.03,
    margin_db: float = 10.0,
    min_level_db: float = -55.0,
    floor_window_s: float = 5.0,
    floor_percentile: float = 10.0,
    min_speech_s: float = 0.15,
    min_silence_s: float = 0.25,
    pad_s: float = 0.2,
    hangover_s: float = 0.15,
) -> list[tuple[float, float]]:
    """Speech regions of a mono recording as sorted, disjoint (start_s, end_s) pairs.

    samples: float (n,) at ``sample_rate``. Frames quieter than ``min_level_db`` dBFS are never speech,
    so pure silence gives []. Gaps shorter than ``min_silence_s`` are bridged, regions shorter than
    ``min_speech_s`` dropped, then each region starts ``pad_s`` earlier and ends
    ``pad_s + hangover_s`` later (clipped to the recording).
    """
    frame_len = max(1, round(frame_s * sample_rate))
    energy = frame_energies_db(samples, frame_len)
    if len(energy) == 0:
        return []
    floor = noise_floor_db(energy, max(1, round(floor_window_s / frame_s)), floor_percentile)
    loud = (energy > floor + margin_db) & (energy > min_level_db)
    sustained = (energy > floor + margin_db / 2) & (energy > min_level_db)
    frames = [(s, e) for s, e in _runs(sustained) if loud[s:e].any()]

    regions: list[list[float]] = []
    for start, end in frames:
        start_s, end_s = start * frame_len / sample_rate, end * frame_len / sample_rate
        if regions and start_s - regions[-1][1] < min_silence_s:
            regions[-1][1] = end_s
        else:
            regions.append([start_s, end_s])

    duration_s = len(samples) / sample_rate
    speech: list[tuple[float, float]] = []
    for start_s, end_s in regions:
        if end_s - start_s < min_speech_s:
            continue
        start_s, end_s = max(0.0, start_s - pad_s), min(duration_s, end_s + pad_s + hangover_s)
        if speech and start_s <= speech[-1][1]:
            speech[-1] = (speech[-1][0], end_s)
        else:
            speech.append((start_s, end_s))
    return speech
