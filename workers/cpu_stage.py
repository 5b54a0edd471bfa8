"""CPU stage: read a planned recording, check its hash, decode, find speech, cut windows, streaming.

One input row (schemas.stages.PLAN_SCHEMA) becomes one row per window (WINDOW_SCHEMA), each yielded as
soon as it is cut; a recording that fails at any step becomes a single ``status="error"`` row naming
the step, one without speech a single ``status="empty"`` row. Nothing raised here reaches Ray, so a bad
file never fails the run.

Memory holds a few windows whatever the recording's length, in three passes over the file: its bytes
are hashed in blocks; it is decoded block by block into frame energies, from which the speech regions
(whose loudness level is the whole recording's) and the windows are found; it is decoded again and
each window cut from a buffer of the samples since the next window's start (pipeline.audio.windows.
cut_stream). So every failure of the bytes, the decoding, VAD or windowing is known before the first
window leaves, and every row carries the recording's duration and window count.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pyarrow as pa

from pipeline.audio.decode import AudioStream, DurationLimitError
from pipeline.audio.vad import SpeechFinder
from pipeline.audio.windows import cut_stream, plan_windows
from pipeline.inputs import sha256_file
from pipeline.stats import peak_rss_bytes
from schemas.stages import WINDOW_SCHEMA


def _row(plan_row: dict, status: str, **fields: object) -> dict:
    base = {
        "recording_id": plan_row["recording_id"],
        "source_path": plan_row["source_path"],
        "content_sha256": plan_row["content_sha256"],
        "meta": plan_row["meta"],
        "duration_s": 0.0,
        "window_index": 0,
        "window_count": 0,
        "start_s": 0.0,
        "end_s": 0.0,
        "overlap_before_s": 0.0,
        "overlap_after_s": 0.0,
        "status": status,
        "stage": None,
        "error": None,
        "cut_rss_bytes": peak_rss_bytes(),
        "pcm": None,
    }
    return base | fields


def _version(path: str) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns


def recording_windows(
    plan_row: dict, sample_rate: int, max_window_s: float, overlap_s: float, max_duration_s: float | None
) -> Iterator[dict]:
    """WINDOW_SCHEMA rows of one PLAN_SCHEMA row, each as soon as it is cut; ``pcm`` holds float32 samples
    of shape (n,) as bytes. ``max_duration_s``: longer recordings are errors (None: no limit)."""
    if plan_row["plan_error"]:
        yield _row(plan_row, "error", stage="plan", error=plan_row["plan_error"])
        return
    path, offset = plan_row["source_path"], plan_row["member_offset"]
    span = (offset, plan_row["member_size"]) if offset >= 0 else None
    stage = "read"
    try:
        version = _version(path)
        if sha256_file(path, span) != plan_row["content_sha256"]:
            raise OSError("content changed since the run was planned")
        stage = "decode"
        audio = AudioStream(path, sample_rate, max_duration_s, name=plan_row["recording_id"], span=span)
        finder = SpeechFinder(sample_rate)
        for block in audio:
            finder.feed(block)
        stage = "vad"
        speech = finder.speech()
        stage = "window"
        windows = plan_windows(speech, audio.duration_s, max_window_s, overlap_s)
        if not windows:
            yield _row(plan_row, "empty", duration_s=audio.duration_s)
            return
        samples, held = audio.samples, None
        stage = "decode"
        for w, pcm in cut_stream(audio, windows, sample_rate):
            if held is not None:
                yield held
            held = _row(
                plan_row,
                "ok",
                duration_s=samples / sample_rate,
                window_index=w.index,
                window_count=len(windows),
                start_s=w.start_s,
                end_s=w.end_s,
                overlap_before_s=w.overlap_before_s,
                overlap_after_s=w.overlap_after_s,
                pcm=pcm.astype("<f4").tobytes(),
            )
        # The last window waits for this check, so a recording whose bytes changed under the second
        # decoding (its windows could mix two contents) ends in an error row, which fails it whole.
        stage = "read"
        if audio.samples != samples or _version(path) != version:
            raise OSError("content changed while it was read")
        yield held
    except Exception as err:  # any failure is this recording's, reported as a row
        stage = "limit" if isinstance(err, DurationLimitError) else stage  # redone under a higher limit
        yield _row(plan_row, "error", stage=stage, error=f"{type(err).__name__}: {err}")


def cut_windows(
    batch: pa.Table, sample_rate: int, max_window_s: float, overlap_s: float, max_duration_s: float | None
) -> Iterator[pa.Table]:
    """Ray ``map_batches`` UDF: PLAN_SCHEMA rows -> WINDOW_SCHEMA rows, each yielded as it is cut (Ray
    gathers them into blocks of its ``target_max_block_size``: workers/ray_run.py)."""
    for plan_row in batch.to_pylist():
        for row in recording_windows(plan_row, sample_rate, max_window_s, overlap_s, max_duration_s):
            yield pa.Table.from_pylist([row], schema=WINDOW_SCHEMA)
