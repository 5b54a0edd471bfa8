"""CPU stage: read a planned recording, check its hash, decode, find speech, cut windows.

One input row (schemas.stages.PLAN_SCHEMA) becomes one row per window (WINDOW_SCHEMA); a recording
that fails at any step becomes a single ``status="error"`` row naming the step, one without speech a
single ``status="empty"`` row. Nothing raised here reaches Ray, so a bad file never fails the run.
"""

from __future__ import annotations

import pyarrow as pa

from pipeline.audio.decode import DurationLimitError, decode_audio
from pipeline.audio.vad import find_speech
from pipeline.audio.windows import cut, plan_windows
from pipeline.inputs import read_bytes, sha256_hex
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
        "pcm": None,
    }
    return base | fields


def recording_windows(
    plan_row: dict, sample_rate: int, max_window_s: float, overlap_s: float, max_duration_s: float
) -> list[dict]:
    """WINDOW_SCHEMA rows of one PLAN_SCHEMA row; ``pcm`` holds float32 samples of shape (n,) as bytes."""
    if plan_row["plan_error"]:
        return [_row(plan_row, "error", stage="plan", error=plan_row["plan_error"])]
    stage = "read"
    try:
        data = read_bytes(plan_row["source_path"], plan_row["member_offset"], plan_row["member_size"])
        if sha256_hex(data) != plan_row["content_sha256"]:
            raise OSError("content changed since the run was planned")
        stage = "decode"
        audio = decode_audio(data, sample_rate, max_duration_s, name=plan_row["recording_id"])
        stage = "vad"
        speech = find_speech(audio.samples, audio.sample_rate)
        stage = "window"
        windows = plan_windows(speech, audio.duration_s, max_window_s, overlap_s)
        if not windows:
            return [_row(plan_row, "empty", duration_s=audio.duration_s)]
        return [
            _row(
                plan_row,
                "ok",
                duration_s=audio.duration_s,
                window_index=w.index,
                window_count=len(windows),
                start_s=w.start_s,
                end_s=w.end_s,
                overlap_before_s=w.overlap_before_s,
                overlap_after_s=w.overlap_after_s,
                pcm=cut(audio, w).astype("<f4").tobytes(),
            )
            for w in windows
        ]
    except Exception as err:  # any failure is this recording's, reported as a row
        stage = "limit" if isinstance(err, DurationLimitError) else stage  # redone under a higher limit
        return [_row(plan_row, "error", stage=stage, error=f"{type(err).__name__}: {err}")]


def cut_windows(
    batch: pa.Table, sample_rate: int, max_window_s: float, overlap_s: float, max_duration_s: float
) -> pa.Table:
    """Ray ``map_batches`` UDF: PLAN_SCHEMA rows -> WINDOW_SCHEMA rows."""
    rows = [
        out
        for plan_row in batch.to_pylist()
        for out in recording_windows(plan_row, sample_rate, max_window_s, overlap_s, max_duration_s)
    ]
    return pa.Table.from_pylist(rows, schema=WINDOW_SCHEMA)
