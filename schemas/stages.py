"""Arrow schemas of the rows that travel between Ray stages (never published).

plan -> CPU stage (PLAN_SCHEMA) -> WINDOW_SCHEMA -> model stage -> WINDOW_TEXT_SCHEMA -> stitch stage
(RECORD_SCHEMA in schemas.tables). Recordings that fail before the model stage travel as a single row
with ``status="error"`` (or ``"empty"`` when there is no speech) and no PCM.
"""

from __future__ import annotations

import pyarrow as pa

PLAN_SCHEMA = pa.schema(
    [
        pa.field("recording_id", pa.string(), nullable=False),
        pa.field("source_path", pa.string(), nullable=False),  # file, or tar shard holding the member
        pa.field("member_offset", pa.int64(), nullable=False),  # byte offset in the shard; -1: whole file
        pa.field("member_size", pa.int64(), nullable=False),
        pa.field("content_sha256", pa.string(), nullable=False),
        pa.field("meta", pa.string(), nullable=False),  # manifest line / webdataset json, as JSON
        pa.field("plan_error", pa.string(), nullable=False),  # "" unless the item could not be planned
    ]
)

_RECORDING_FIELDS = [
    pa.field("recording_id", pa.string(), nullable=False),
    pa.field("source_path", pa.string(), nullable=False),
    pa.field("content_sha256", pa.string(), nullable=False),
    pa.field("duration_s", pa.float64(), nullable=False),
    pa.field("window_index", pa.int32(), nullable=False),
    pa.field("window_count", pa.int32(), nullable=False),
    pa.field("start_s", pa.float64(), nullable=False),
    pa.field("end_s", pa.float64(), nullable=False),
    pa.field("overlap_before_s", pa.float64(), nullable=False),
    pa.field("overlap_after_s", pa.float64(), nullable=False),
    pa.field("meta", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),  # ok | empty | error
    pa.field("stage", pa.string()),
    pa.field("error", pa.string()),
    pa.field("cut_rss_bytes", pa.int64()),  # peak resident memory of the process that cut the window
]

WINDOW_SCHEMA = pa.schema([*_RECORDING_FIELDS, pa.field("pcm", pa.large_binary())])
"""``pcm``: float32 mono samples at the model rate, little-endian bytes (4 x samples); null if no window."""

# The fields of pipeline.stats.WindowStats (float -> float64, int -> int64), spelled out so that schemas
# import nothing of the pipeline, which imports them (tests/test_schemas_stages.py keeps the two equal).
WINDOW_STATS_TYPE = pa.struct(
    [
        pa.field("audio_seconds", pa.float64(), nullable=False),
        pa.field("audio_tokens_in", pa.int64(), nullable=False),
        pa.field("audio_tokens_kept", pa.float64(), nullable=False),
        pa.field("kv_bytes_full", pa.int64(), nullable=False),
        pa.field("kv_bytes_kept", pa.int64(), nullable=False),
        pa.field("encode_s", pa.float64(), nullable=False),
        pa.field("prefill_s", pa.float64(), nullable=False),
        pa.field("decode_s", pa.float64(), nullable=False),
        pa.field("generated_tokens", pa.int64(), nullable=False),
        pa.field("loop_cuts", pa.int64(), nullable=False),
    ]
)

# A word and its times in recording seconds; probability: the mean of its tokens' as decoded.
WORD_TYPE = pa.struct(
    [
        pa.field("word", pa.string(), nullable=False),
        pa.field("start_s", pa.float64(), nullable=False),
        pa.field("end_s", pa.float64(), nullable=False),
        pa.field("probability", pa.float32(), nullable=False),
    ]
)

WINDOW_TEXT_SCHEMA = pa.schema(
    [
        *_RECORDING_FIELDS,
        pa.field("text", pa.string()),
        pa.field("language", pa.string()),  # the spoken language, where the model tells it
        pa.field("words", pa.list_(WORD_TYPE)),  # null: the model gave no word times for the window
        pa.field("window_stats", WINDOW_STATS_TYPE),
        pa.field("peak_memory_bytes", pa.int64()),
        pa.field("nvml_memory_bytes", pa.int64()),
        pa.field("model_rss_bytes", pa.int64()),  # peak resident memory of the model's process
        pa.field("device_name", pa.string()),
        pa.field("node", pa.string()),
    ]
)
