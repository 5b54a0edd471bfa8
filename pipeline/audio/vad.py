"""Energy-based voice activity detection (no model to download).

Frame energies (each frame's mean removed, so a DC offset adds nothing) are compared with an adaptive
noise floor (a low percentile of the energies around each frame), so steady background noise raises the
floor instead of reading as speech. The level below which nothing is speech follows the recording's own
loudness rather than a fixed dBFS value, so a quietly recorded file keeps its speech while faint sounds
in the quiet stretches of a normal one stay out. Hysteresis (a frame run counts only if it rises
``margin_db`` above the floor somewhere and stays ``margin_db / 2`` above it throughout), short-gap
merging, minimum durations, padding and a hangover turn frame decisions into speech regions.
``SpeechFinder`` takes a recording block by block and keeps only its frame energies.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass, field

import numpy as np

_SILENT_DB = -120.0  # energy of digital silence, keeps log10 finite


def frame_energies_db(samples: np.ndarray, frame_len: int) -> np.ndarray:
    """Energy in dBFS of consecutive frames less their means: samples (n,) -> (n // frame_len,).

    Taking the variance rather than the mean square (a high-pass below about 1 / frame length) keeps a
    DC offset, even a drifting one, from reading as a loud steady level (0.1 is -20 dBFS) over the speech.
    """
    frames = samples[: len(samples) // frame_len * frame_len].reshape(-1, frame_len).astype(np.float64)
    return np.maximum(10.0 * np.log10(frames.var(axis=1) + 1e-30), _SILENT_DB)


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


@dataclass
class SpeechFinder:
    """Finds the speech of a recording fed block by block (``feed``), then ``speech()``.

    A block's samples are reduced to frame energies as they come (8 bytes per frame, about 1 MB per hour
    at the default 30 ms frames) and dropped: the loud level is the whole recording's, so no region is
    known before the last block, and the recording itself is never held. Parameters as ``find_speech``.
    """

    sample_rate: int
    _: KW_ONLY
    frame_s: float = 0.03
    margin_db: float = 10.0
    range_db: float = 40.0
    min_level_db: float = -90.0
    floor_window_s: float = 5.0
    floor_percentile: float = 10.0
    min_speech_s: float = 0.15
    min_silence_s: float = 0.25
    pad_s: float = 0.2
    hangover_s: float = 0.15
    samples: int = field(default=0, init=False)  # fed so far

    def __post_init__(self) -> None:
        self.frame_len = max(1, round(self.frame_s * self.sample_rate))
        self._energies: list[np.ndarray] = []
        self._rest = np.zeros(0, np.float32)  # samples of the frame the last block left incomplete

    def feed(self, block: np.ndarray) -> None:
        """Add the recording's next samples, float (n,) at ``sample_rate``."""
        self.samples += len(block)
        data = np.concatenate([self._rest, block]) if len(self._rest) else block
        whole = len(data) // self.frame_len * self.frame_len
        self._energies.append(frame_energies_db(data[:whole], self.frame_len))
        self._rest = data[whole:].copy()

    def speech(self) -> list[tuple[float, float]]:
        """Speech regions of the samples fed so far, as ``find_speech`` returns them."""
        frame_len, sample_rate = self.frame_len, self.sample_rate
        energy = np.concatenate(self._energies) if self._energies else np.zeros(0)
        if len(energy) == 0:
            return []
        level = max(self.min_level_db, np.percentile(energy, 99) - self.range_db)
        # Digital silence (under min_level_db) measures no noise: taken at its own level it would pull the
        # floor so low that hiss beside it reads as speech, so the floor counts it at ``level``.
        measured = np.where(energy > self.min_level_db, energy, level)
        window = max(1, round(self.floor_window_s / self.frame_s))
        floor = noise_floor_db(measured, window, self.floor_percentile)
        del measured
        loud = (energy > floor + self.margin_db) & (energy > level)
        sustained = (energy > floor + self.margin_db / 2) & (energy > level)
        frames = [(s, e) for s, e in _runs(sustained) if loud[s:e].any()]

        regions: list[list[float]] = []
        for start, end in frames:
            start_s, end_s = start * frame_len / sample_rate, end * frame_len / sample_rate
            if regions and start_s - regions[-1][1] < self.min_silence_s:
                regions[-1][1] = end_s
            else:
                regions.append([start_s, end_s])

        duration_s = self.samples / sample_rate
        speech: list[tuple[float, float]] = []
        for start_s, end_s in regions:
            if end_s - start_s < self.min_speech_s:
                continue
            start_s = max(0.0, start_s - self.pad_s)
            end_s = min(duration_s, end_s + self.pad_s + self.hangover_s)
            if speech and start_s <= speech[-1][1]:
                speech[-1] = (speech[-1][0], end_s)
            else:
                speech.append((start_s, end_s))
        return speech


def find_speech(samples: np.ndarray, sample_rate: int, **params: float) -> list[tuple[float, float]]:
    """Speech regions of a mono recording as sorted, disjoint (start_s, end_s) pairs.

    samples: float (n,) at ``sample_rate``. Frames more than ``range_db`` below the recording's loud level
    (its 99th-percentile frame energy, set by speech in over 1% of the frames) or quieter than
    ``min_level_db`` dBFS (about one 16-bit step) are never speech, so pure silence and dither give [].
    Gaps shorter than ``min_silence_s`` are bridged, regions shorter than ``min_speech_s`` dropped, then
    each region starts ``pad_s`` earlier and ends ``pad_s + hangover_s`` later (clipped to the recording).
    ``params``: SpeechFinder's (frame_s, margin_db, range_db, min_level_db, floor_window_s,
    floor_percentile, min_speech_s, min_silence_s, pad_s, hangover_s).
    """
    finder = SpeechFinder(sample_rate, **params)
    finder.feed(samples)
    return finder.speech()
