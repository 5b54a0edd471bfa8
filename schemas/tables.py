"""Arrow schemas of the tables a run publishes: results, stats and errors (one row per recording).

Every recording of a run's plan ends as exactly one row of ``results`` (status ``ok`` or ``empty``) or
exactly one row of ``errors``; ``stats`` has one row per ``results`` row.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from schemas.stages import WINDOW_STATS_TYPE, WORD_TYPE

SEGMENT_TYPE = pa.struct(
    [
        pa.field("index", pa.int32(), nullable=False),
        pa.field("start_s", pa.float64(), nullable=False),
        pa.field("end_s", pa.float64(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("stitch_confidence", pa.float32(), nullable=False),
    ]
)

# How a result's segment times were found: "words", sentences timed by their aligned words; "windows",
# each segment a window's span (cut in pauses by voice activity: coarse). Null in rows written before.
TIMINGS = ("words", "windows")

RESULTS_SCHEMA = pa.schema(
    [
        pa.field("recording_id", pa.string(), nullable=False),
        pa.field("source_path", pa.string(), nullable=False),
        pa.field("content_sha256", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("text", pa.string()),
        pa.field("segments", pa.list_(SEGMENT_TYPE)),
        pa.field("label", pa.string()),  # er (an emotion), lid (a language code)
        pa.field("answer", pa.string()),  # sqa
        # the spoken language (ISO 639-1) with the most audio behind it; null where the model tells none
        pa.field("language", pa.string()),
        pa.field("meta", pa.string(), nullable=False),  # manifest line / webdataset json extras, as JSON
        pa.field("model", pa.string(), nullable=False),
        pa.field("reduction", pa.string(), nullable=False),  # ReductionConfig as JSON
        pa.field("pipeline_version", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        # asr/st with --timestamps words: every word of text, in order; null otherwise and in rows
        # written before the column existed
        pa.field("words", pa.list_(WORD_TYPE)),
        pa.field("timing", pa.string()),  # one of TIMINGS (asr/st)
    ]
)

STATS_SCHEMA = pa.schema(
    [
        pa.field("recording_id", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("audio_seconds", pa.float64(), nullable=False),  # decoded duration, silence included
        pa.field("windows", pa.int32(), nullable=False),
        # audio tokens, KV bytes, encode_s / prefill_s / decode_s (the windows' shares of the passes and
        # steps each was in: pipeline.stats.WindowStats), generated tokens: summed windows
        # (loop cuts are evaluation's, jobs/evaluate.py: not a column of this table)
        *[f for f in list(WINDOW_STATS_TYPE)[1:] if f.name != "loop_cuts"],
        # generated_tokens / decode_s: the decode throughput of the batches (all their rows) that generated
        # this recording's tokens, weighted by its tokens in each
        pa.field("decode_tokens_per_s", pa.float64()),
        pa.field("peak_memory_bytes", pa.int64()),  # torch allocator peak; null on CPU
        pa.field("nvml_memory_bytes", pa.int64()),  # device memory in use per NVML; null without a GPU
        pa.field("real_time_factor", pa.float64()),  # (encode_s + prefill_s + decode_s) / audio_seconds
        pa.field("device_name", pa.string(), nullable=False),
        pa.field("node", pa.string(), nullable=False),  # Ray node id of the model actor, or the host name
    ]
)

ERRORS_SCHEMA = pa.schema(
    [
        pa.field("recording_id", pa.string(), nullable=False),
        pa.field("source_path", pa.string(), nullable=False),
        pa.field("content_sha256", pa.string(), nullable=False),
        # plan read decode limit vad window model stitch crash
        pa.field("stage", pa.string(), nullable=False),
        pa.field("error", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
    ]
)

TABLES = {"results": RESULTS_SCHEMA, "stats": STATS_SCHEMA, "errors": ERRORS_SCHEMA}


def _union(*schemas: pa.Schema) -> pa.Schema:
    """Fields of all schemas, first occurrence wins, every field nullable (a row fills one table)."""
    seen: dict[str, pa.Field] = {}
    for schema in schemas:
        for f in schema:
            seen.setdefault(f.name, f.with_nullable(True))
    return pa.schema(list(seen.values()))


RECORD_SCHEMA = _union(RESULTS_SCHEMA, STATS_SCHEMA, ERRORS_SCHEMA)
"""One row per recording as the stitch stage emits it; ``split_records`` projects it onto TABLES."""


def split_records(records: pa.Table) -> dict[str, pa.Table]:
    """Split stitch-stage rows into the published tables, each cast to its schema."""
    failed = pc.equal(records["status"], "error")
    good = records.filter(pc.invert(failed))
    bad = records.filter(failed)
    return {
        "results": good.select(RESULTS_SCHEMA.names).cast(RESULTS_SCHEMA),
        "stats": good.select(STATS_SCHEMA.names).cast(STATS_SCHEMA),
        "errors": bad.select(ERRORS_SCHEMA.names).cast(ERRORS_SCHEMA),
    }
