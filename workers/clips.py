"""Clips of any length for the evaluation jobs (jobs/evaluate.py, jobs/select_layer.py).

A clip up to the model's window goes to the model whole, as evaluation sets are scored; a longer one
(FLEURS holds clips of 40 s and more) is cut into windows exactly as the archive job cuts a recording
(the same voice activity and window planning as ``workers.cpu_stage.recording_windows``, its default
overlap), and its windows' outputs are joined as the archive job stitches them
(``workers.stitch_stage.stitch_outputs``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.audio.decode import decode_audio
from pipeline.audio.vad import find_speech
from pipeline.audio.windows import Window, cut, plan_windows
from pipeline.merging.config import ReductionConfig
from pipeline.models.base import SpeechModel, WindowOutput
from pipeline.stats import WindowStats
from pipeline.tasks import TaskRequest
from schemas.job_config import JobConfig
from workers.stitch_stage import stitch_outputs


@dataclass(frozen=True)
class Clips:
    """waves: what the model runs, float32 (n,): each short clip whole, each window of a long one;
    owner: each wave's clip; windows: a long clip's windows as the stitcher reads them, by clip."""

    count: int
    waves: list[np.ndarray]
    owner: list[int]
    windows: dict[int, list[dict]]


def cut_clips(paths: list[Path], sample_rate: int, max_window_s: float) -> Clips:
    """Decode every clip, cutting those longer than ``max_window_s``; a clip that cannot be decoded
    raises AudioDecodeError naming it (the jobs refuse it before loading a model)."""
    waves, owner, windows = [], [], {}
    for i, path in enumerate(paths):
        audio = decode_audio(path, sample_rate)
        if audio.duration_s <= max_window_s:
            waves.append(audio.samples)
            owner.append(i)
            continue
        speech = find_speech(audio.samples, sample_rate)
        cuts = plan_windows(speech, audio.duration_s, max_window_s, JobConfig.overlap_s)
        windows[i] = [_row(w) for w in cuts]
        waves += [cut(audio, w) for w in cuts]
        owner += [i] * len(cuts)
    return Clips(len(paths), waves, owner, windows)


def _row(window: Window) -> dict:
    """A window as the stitcher reads a window row."""
    return {
        "window_index": window.index,
        "start_s": window.start_s,
        "end_s": window.end_s,
        "overlap_before_s": window.overlap_before_s,
        "overlap_after_s": window.overlap_after_s,
        "status": "ok",
    }


def join_outputs(clips: Clips, outputs: list[WindowOutput], task: str) -> list[WindowOutput]:
    """One output per clip from the outputs of ``clips.waves`` (in order): a short clip's as it is, a
    long clip's windows stitched (asr, st) or their answers weighed by duration (labels), stats summed,
    a loop cut if any window's was; a long clip without speech: empty text."""
    by_clip: dict[int, list[WindowOutput]] = {}
    for clip, out in zip(clips.owner, outputs, strict=True):
        by_clip.setdefault(clip, []).append(out)
    joined = []
    for clip in range(clips.count):
        outs = by_clip.get(clip, [])
        if clip not in clips.windows:
            joined.append(outs[0])
            continue
        if not outs:
            joined.append(WindowOutput(""))
            continue
        rows = [
            w | {"text": o.text, "language": o.language, "words": None}
            for w, o in zip(clips.windows[clip], outs, strict=True)
        ]
        stitched = stitch_outputs(rows, task)
        text = next(stitched[k] for k in ("text", "label", "answer") if k in stitched)
        stats = sum((o.stats for o in outs), WindowStats())
        joined.append(WindowOutput(text, stitched["language"], stats))
    return joined


def run_clips(
    model: SpeechModel, clips: Clips, request: TaskRequest, reduction: ReductionConfig, batch_size: int
) -> list[WindowOutput]:
    """The model over every wave of ``clips``, ``batch_size`` per call; one output per clip."""
    waves = clips.waves
    outputs = [
        out
        for first in range(0, len(waves), batch_size)
        for out in model.run(waves[first : first + batch_size], request, reduction)
    ]
    return join_outputs(clips, outputs, request.task)
