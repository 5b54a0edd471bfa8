"""Stitch stage: all window rows of one recording -> one record row (schemas.tables.RECORD_SCHEMA).

Runs on the driver as window rows stream out of the model stage (``RecordingAssembler``): a recording
is stitched as soon as its last window is back, with no barrier over the run (a ``groupby`` would hold
every recording until the last window of the run), and the driver holds only the windows of
recordings still in flight. The rows are text and stats only (the model stage drops the PCM).

Dense tasks (asr, st): the window texts are stitched into one text with per-window segments, or
sentence segments and words where the windows carry word times (``--timestamps words|segments``);
sparse ones (er, lid, sqa): the window outputs are aggregated into the task's result field (label or
answer: ``pipeline.tasks.Task.result``), weighted by window duration. Every task's result carries the spoken language the model detected, aggregated the
same way. Window outputs
are cleaned by pipeline.tasks.normalise_output first. Window stats are summed.
"""

from __future__ import annotations

from dataclasses import asdict

import pyarrow as pa

from pipeline.inputs import PlannedRecording
from pipeline.stats import WindowStats
from pipeline.stitch import WindowText, stitch
from pipeline.tasks import aggregate_labels, check_task, normalise_output
from pipeline.timing import Word
from schemas.tables import RECORD_SCHEMA


def _stats(rows: list[dict]) -> dict:
    total = sum((WindowStats(**r["window_stats"]) for r in rows), WindowStats())
    model_s = total.encode_s + total.prefill_s + total.decode_s
    audio_s = rows[0]["duration_s"]  # the whole recording, silence included, as in the run summary's RTF
    peaks = [r["peak_memory_bytes"] for r in rows if r["peak_memory_bytes"] is not None]
    nvml = [r["nvml_memory_bytes"] for r in rows if r["nvml_memory_bytes"] is not None]
    return total.to_dict() | {
        "audio_seconds": audio_s,
        "windows": len(rows) if rows[0]["status"] == "ok" else 0,
        "decode_tokens_per_s": total.generated_tokens / total.decode_s if total.decode_s > 0 else None,
        "peak_memory_bytes": max(peaks, default=None),
        "nvml_memory_bytes": max(nvml, default=None),
        "real_time_factor": model_s / audio_s if audio_s > 0 else None,
        "device_name": rows[0]["device_name"] or "",
        "node": rows[0]["node"] or "",
    }


def _language(rows: list[dict]) -> str | None:
    """The spoken language with the most audio behind it (archives mix languages); None when the
    model names none."""
    told = [r for r in rows if r.get("language")]
    if not told:
        return None
    return aggregate_labels([r["language"] for r in told], [r["end_s"] - r["start_s"] for r in told])


def stitch_outputs(rows: list[dict], task: str, timestamps: str = "none") -> dict:
    """A recording's result fields from its window rows with their texts (in window order): asr/st
    stitched text, segments, words (``timestamps`` words); labels and answers weighed by duration."""
    if rows[0]["status"] == "empty":
        return {"text": "", "segments": []}
    texts = [normalise_output(task, r["text"]) for r in rows]
    record = check_task(task)
    if not record.dense:  # one answer per recording: the one given for the most audio
        return {
            record.result: aggregate_labels(texts, [r["end_s"] - r["start_s"] for r in rows]),
            "language": _language(rows),
        }
    windows = [
        WindowText(
            r["window_index"],
            r["start_s"],
            r["end_s"],
            r["overlap_before_s"],
            r["overlap_after_s"],
            text,
            None if r.get("words") is None else tuple(Word(**w) for w in r["words"]),
        )
        for r, text in zip(rows, texts, strict=True)
    ]
    stitched = stitch(windows)
    keep_words = timestamps == "words" and stitched.words is not None
    return {
        "text": stitched.text,
        "segments": [asdict(s) for s in stitched.segments],
        "language": _language(rows),
        "words": [w.to_dict() for w in stitched.words] if keep_words else None,
        "timing": "windows" if stitched.words is None else "words",
    }


def _record(source: dict, run_fields: dict) -> dict:
    return {k: source[k] for k in ("recording_id", "source_path", "content_sha256", "meta")} | run_fields


def crash_records(recordings: list[PlannedRecording], why: dict[str, str], run_fields: dict) -> pa.Table:
    """Error rows (stage ``crash``) of recordings that kill the process cutting or decoding them (``why``:
    id -> what was seen); ``--retry-errors`` tries them again."""
    records = [
        _record(r.to_row(), run_fields) | {"status": "error", "stage": "crash", "error": why[r.recording_id]}
        for r in recordings
    ]
    return pa.Table.from_pylist(records, schema=RECORD_SCHEMA)


def recording_record(rows: list[dict], task: str, run_fields: dict, timestamps: str = "none") -> dict:
    """One RECORD_SCHEMA row from a recording's window rows (any order). ``run_fields``: model,
    reduction, pipeline_version, run_id, task. timestamps: the run's ``--timestamps``; the words of the
    windows' rows are kept in the record only for ``words``."""
    rows = sorted(rows, key=lambda r: r["window_index"])
    first = rows[0]
    record = _record(first, run_fields)
    failed = next((r for r in rows if r["status"] == "error"), None)
    if failed is None and first["status"] == "ok" and len(rows) != first["window_count"]:
        failed = first | {
            "stage": "stitch",
            "error": f"{len(rows)} of {first['window_count']} windows arrived",
        }
    if failed is not None:
        return record | {"status": "error", "stage": failed["stage"], "error": failed["error"]}
    try:
        return record | stitch_outputs(rows, task, timestamps) | _stats(rows) | {"status": first["status"]}
    except Exception as err:  # a stitcher failure is this recording's, reported as a row
        return record | {"status": "error", "stage": "stitch", "error": f"{type(err).__name__}: {err}"}


class RecordingAssembler:
    """Collects WINDOW_TEXT_SCHEMA rows in any order and stitches each recording once its windows are
    in: all ``window_count`` of them, or the first in error (the recording has failed whatever the
    rest say). Rows of a recording already stitched are dropped (a batch Ray ran twice)."""

    def __init__(self, task: str, run_fields: dict, timestamps: str = "none") -> None:
        self.task, self.run_fields, self.timestamps = task, run_fields, timestamps
        self.windows: dict[str, dict[int, dict]] = {}  # recordings in flight: their windows so far
        self.finished: set[str] = set()

    def add(self, batch: pa.Table) -> pa.Table:
        """RECORD_SCHEMA rows of the recordings this batch of window rows completes."""
        records = []
        for row in batch.to_pylist():
            rid = row["recording_id"]
            if rid in self.finished:
                continue
            windows = self.windows.setdefault(rid, {})
            windows[row["window_index"]] = row
            if row["status"] in ("error", "empty") or len(windows) == row["window_count"]:
                records.append(self._stitch(rid))
        return pa.Table.from_pylist(records, schema=RECORD_SCHEMA)

    def flush(self) -> pa.Table:
        """Records of the recordings still missing windows (each an error naming the gap)."""
        return pa.Table.from_pylist([self._stitch(rid) for rid in list(self.windows)], schema=RECORD_SCHEMA)

    def _stitch(self, rid: str) -> dict:
        self.finished.add(rid)
        return recording_record(
            list(self.windows.pop(rid).values()), self.task, self.run_fields, self.timestamps
        )
