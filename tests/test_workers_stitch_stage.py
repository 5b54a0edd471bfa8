"""Stitch stage: window rows of one recording -> one record; errors, gaps, labels, summed stats."""

from __future__ import annotations

import pyarrow as pa

from pipeline.stats import WindowStats
from schemas.tables import RECORD_SCHEMA, split_records
from workers.stitch_stage import RecordingAssembler, recording_record

RUN = {"task": "asr", "model": "m", "reduction": "{}", "pipeline_version": "v", "run_id": "r"}


def _window(i: int, count: int, text: str, status: str = "ok", **extra: object) -> dict:
    stats = WindowStats(audio_seconds=10.0, audio_tokens_in=500, audio_tokens_kept=350.0, decode_s=0.5,
                        encode_s=0.25, generated_tokens=10)  # fmt: skip
    return {
        "recording_id": "rec", "source_path": "/in/rec.wav", "content_sha256": "h", "meta": "{}",
        "duration_s": 30.0, "window_index": i, "window_count": count, "start_s": 10.0 * i,
        "end_s": 10.0 * i + 10.0, "overlap_before_s": 0.0, "overlap_after_s": 0.0, "status": status,
        "stage": None, "error": None, "text": text, "language": None, "window_stats": stats.to_dict(),
        "peak_memory_bytes": None, "nvml_memory_bytes": None, "device_name": "cpu", "node": "n1",
    } | extra  # fmt: skip


def test_asr_windows_join_in_order_and_stats_sum() -> None:
    rows = [_window(1, 2, "world"), _window(0, 2, "hello")]
    out = RecordingAssembler("asr", RUN).add(pa.Table.from_pylist(rows))
    assert out.schema == RECORD_SCHEMA
    tables = split_records(out)
    (result,) = tables["results"].to_pylist()
    assert result["text"] == "hello world" and result["status"] == "ok"
    assert [s["index"] for s in result["segments"]] == [0, 1]
    (stats,) = tables["stats"].to_pylist()
    assert stats["windows"] == 2 and stats["audio_tokens_in"] == 1000 and stats["generated_tokens"] == 20
    assert stats["decode_tokens_per_s"] == 20.0 and stats["real_time_factor"] == 1.5 / 30.0
    assert tables["errors"].num_rows == 0


def test_real_time_factor_is_over_the_whole_recording() -> None:
    """Speech, then long silence; overlapping windows: model seconds over the decoded duration, as the
    run summary's RTF, not over the windows' spans (speech only, overlaps twice)."""
    rows = [
        _window(0, 2, "a", duration_s=180.0, start_s=0.0, end_s=30.0, overlap_after_s=5.0),
        _window(1, 2, "b", duration_s=180.0, start_s=25.0, end_s=40.0, overlap_before_s=5.0),
    ]
    record = recording_record(rows, "asr", RUN)
    assert record["audio_seconds"] == 180.0 and record["real_time_factor"] == 1.5 / 180.0


def test_a_failed_or_missing_window_fails_the_recording() -> None:
    bad = recording_record(
        [_window(0, 2, "a"), _window(1, 2, None, "error", stage="model", error="oom")], "asr", RUN
    )
    assert (bad["status"], bad["stage"], bad["error"]) == ("error", "model", "oom")
    gap = recording_record([_window(0, 3, "a"), _window(2, 3, "c")], "asr", RUN)
    assert (gap["status"], gap["stage"]) == ("error", "stitch") and "2 of 3" in gap["error"]


def test_er_label_is_the_one_heard_longest() -> None:
    rows = [
        _window(0, 3, "Happy."),
        _window(1, 3, "<|im_end|> I hear anger"),
        _window(2, 3, "the speaker is happy"),
    ]
    record = recording_record(rows, "er", RUN | {"task": "er"})
    assert record["label"] == "happy" and record.get("text") is None


def test_no_speech_is_an_empty_result() -> None:
    empty = _window(0, 0, None, "empty") | {"window_stats": WindowStats().to_dict()}
    record = recording_record([empty], "asr", RUN)
    assert (record["status"], record["text"], record["segments"], record["windows"]) == ("empty", "", [], 0)
    assert record["real_time_factor"] == 0.0  # 30 s of audio that cost no model time


def test_each_recording_is_stitched_as_soon_as_its_last_window_arrives() -> None:
    """Windows stream in any order, several recordings interleaved: no barrier over the run, and only
    the windows of recordings in flight are held."""
    assembler = RecordingAssembler("asr", RUN)

    def rows(*windows: dict) -> pa.Table:
        return pa.Table.from_pylist(list(windows))

    a0, a1, a2 = (_window(i, 3, w, recording_id="a") for i, w in enumerate(("one", "two", "three")))
    b0 = _window(0, 1, "solo", recording_id="b")
    c0 = _window(0, 2, "x", recording_id="c")
    c1 = _window(1, 2, None, "error", recording_id="c", stage="model", error="oom")
    assert assembler.add(rows(a2, b0))["recording_id"].to_pylist() == ["b"]
    assert sorted(assembler.windows) == ["a"]
    (c,) = assembler.add(rows(c1, a0)).to_pylist()  # a failed window ends its recording at once
    assert (c["recording_id"], c["status"], c["error"]) == ("c", "error", "oom")
    (a,) = assembler.add(rows(a1, c0, a1)).to_pylist()  # c failed already; a's second copy is dropped
    assert (a["recording_id"], a["text"]) == ("a", "one two three") and not assembler.windows
    d0 = _window(0, 2, "half", recording_id="d")
    assert assembler.add(rows(d0)).num_rows == 0
    (d,) = assembler.flush().to_pylist()  # the stream ended without d's second window
    assert (d["status"], d["stage"]) == ("error", "stitch") and "1 of 2 windows" in d["error"]


def test_lid_label_and_every_tasks_language_follow_the_most_speech() -> None:
    """Mixed-language recording: the language with the most audio wins, for lid's label and for the
    language column of any task; a model that names no language leaves it null."""
    rows = [
        _window(0, 3, "de", language="de", end_s=5.0),
        _window(1, 3, "fr", language="fr"),
        _window(2, 3, "fr", language="fr"),
    ]
    lid = recording_record(rows, "lid", RUN | {"task": "lid"})
    assert (lid["label"], lid["language"]) == ("fr", "fr")
    asr = recording_record([r | {"text": "x"} for r in rows], "asr", RUN)
    assert asr["language"] == "fr"
    assert recording_record([_window(0, 1, "hello")], "asr", RUN)["language"] is None
    (result,) = (
        split_records(RecordingAssembler("lid", RUN).add(pa.Table.from_pylist(rows)))
        .get("results")
        .to_pylist()
    )
    assert (result["label"], result["language"]) == ("fr", "fr")


def test_word_times_kept_for_words_and_only_sentences_for_segments() -> None:
    words = [{"word": "Hi.", "start_s": 0.5, "end_s": 0.9, "probability": 0.9}]
    words += [
        {"word": w, "start_s": 2.0 + i, "end_s": 2.5 + i, "probability": 0.8}
        for i, w in enumerate(["Go", "on."])
    ]
    rows = [_window(0, 1, "Hi. Go on.", words=words)]
    kept = recording_record(rows, "asr", RUN, "words")
    assert kept["timing"] == "words" and [w["word"] for w in kept["words"]] == ["Hi.", "Go", "on."]
    assert [(s["text"], s["start_s"], s["end_s"]) for s in kept["segments"]] == [
        ("Hi.", 0.5, 0.9),
        ("Go on.", 2.0, 3.5),
    ]
    sentences = recording_record(rows, "asr", RUN, "segments")
    assert sentences["words"] is None and sentences["segments"] == kept["segments"]
    coarse = recording_record([_window(0, 1, "Hi. Go on.")], "asr", RUN, "segments")
    assert coarse["timing"] == "windows" and coarse["segments"][0]["end_s"] == 10.0
    assert split_records(pa.Table.from_pylist([kept], schema=RECORD_SCHEMA))["results"].num_rows == 1
