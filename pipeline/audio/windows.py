"""Windowing of a long recording into model-sized pieces.

Speech regions are packed greedily into windows of at most ``max_window_s``, cut only in pauses, so
neighbouring windows share no audio and their texts are simply concatenated. Only a speech region
longer than a window forces a cut inside speech; such cuts overlap by ``overlap_s`` so that the
stitcher can align the words both windows heard. Silence between windows is never transcribed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from pipeline.audio.decode import Audio


@dataclass(frozen=True)
class Window:
    """A span [start_s, end_s) of the recording; overlap_* is the audio shared with the previous/next window."""

    index: int
    start_s: float
    end_s: float
    overlap_before_s: float
    overlap_after_s: float

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


def _clean(speech: list[tuple[float, float]], duration_s: float) -> list[tuple[float, float]]:
    """Sort, clip to [0, duration_s], drop empty regions and merge overlapping ones."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(speech):
        start, end = max(0.0, start), min(duration_s, end)
        if end <= start:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


# Forced cuts add floats; a tail this short is rounding, not speech left to cover.
_EPS_S = 1e-6


def plan_windows(
    speech: list[tuple[float, float]],
    duration_s: float,
    max_window_s: float = 30.0,
    overlap_s: float = 3.0,
) -> list[Window]:
    """Windows covering every speech region, each at most ``max_window_s`` long, in time order.

    A window closes at the end of the last region that fits; the next starts where the next region
    starts. A region that cannot fit in one window is cut every ``max_window_s - overlap_s`` seconds;
    its tail (longer than ``overlap_s``) stays open for the following regions.
    """
    if not 0.0 <= overlap_s < max_window_s:
        raise ValueError(f"overlap_s={overlap_s} must be in [0, max_window_s={max_window_s})")
    spans: list[tuple[float, float, float, float]] = []  # start, end, overlap before, overlap after
    open_start: float | None = None
    open_end = overlap_before = 0.0
    for start, end in _clean(speech, duration_s):
        if open_start is not None and end - open_start <= max_window_s:
            open_end = end
            continue
        if open_start is not None:
            spans.append((open_start, open_end, overlap_before, 0.0))
        open_start, overlap_before, forced = start, 0.0, False
        while end - open_start > max_window_s:
            spans.append((open_start, open_start + max_window_s, overlap_before, overlap_s))
            open_start, overlap_before, forced = open_start + max_window_s - overlap_s, overlap_s, True
        if forced and end - open_start <= overlap_s + _EPS_S:  # the last forced window reached the end
            spans[-1] = (*spans[-1][:3], 0.0)
            open_start = None
            continue
        open_end = end
    if open_start is not None:
        spans.append((open_start, open_end, overlap_before, 0.0))
    return [Window(i, *span) for i, span in enumerate(spans)]


def _bounds(window: Window, sample_rate: int) -> tuple[int, int]:
    """The window's [start, end) sample indices."""
    return round(window.start_s * sample_rate), round(window.end_s * sample_rate)


def cut(audio: Audio, window: Window) -> np.ndarray:
    """The window's samples, float32 of shape (n,), copied so the window outlives the full recording."""
    start, end = _bounds(window, audio.sample_rate)
    return audio.samples[start:end].copy()


def cut_stream(
    blocks: Iterable[np.ndarray], windows: Iterable[Window], sample_rate: int
) -> Iterator[tuple[Window, np.ndarray]]:
    """Each of ``windows`` (in time order) with its samples as ``cut`` gives them, yielded as soon as
    ``blocks`` (the recording's consecutive samples at ``sample_rate``) reach its end. Only the samples
    from the next window's start on are kept: at most a window and a block, whatever the recording's length.
    """
    pending = iter(windows)
    window = next(pending, None)
    held, held_start = np.zeros(0, np.float32), 0  # the recording's samples [held_start, held_start + len)
    for block in blocks:
        held = np.concatenate([held, block])
        while window is not None and held_start + len(held) >= _bounds(window, sample_rate)[1]:
            start, end = _bounds(window, sample_rate)
            yield window, held[start - held_start : end - held_start].copy()
            window = next(pending, None)
        received = held_start + len(held)
        keep = min(_bounds(window, sample_rate)[0], received) if window is not None else received
        held, held_start = held[keep - held_start :], keep
    while window is not None:  # windows reaching past the last sample, clipped to it like ``cut``
        start, end = _bounds(window, sample_rate)
        yield window, held[max(0, start - held_start) : max(0, end - held_start)].copy()
        window = next(pending, None)
