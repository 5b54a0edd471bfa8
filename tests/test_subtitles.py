"""Subtitles: cue rules on synthetic words, and one small archive run with word timestamps exported as
SRT, WebVTT and JSON, each file read back by FFmpeg's own subtitle demuxers through PyAV."""

from __future__ import annotations

import json
import shutil
from itertools import pairwise
from pathlib import Path

import av
import pytest

from jobs import export_subtitles
from pipeline.publish import read_committed
from pipeline.stitch import words as text_words
from pipeline.subtitles import (
    MAX_CUE_S,
    MAX_LINE_CHARS,
    MAX_LINES,
    MIN_CUE_S,
    Cue,
    cues,
    render,
    segment_words,
)
from pipeline.timing import Word
from schemas.job_config import JobConfig
from workers.archive_job import run_archive

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def assert_conventions(cue_list: list[Cue]) -> None:
    for cue in cue_list:
        assert 1 <= len(cue.lines) <= MAX_LINES and all(0 < len(line) <= MAX_LINE_CHARS for line in cue.lines)
        assert MIN_CUE_S - 1e-6 <= cue.end_s - cue.start_s <= MAX_CUE_S + 1e-6
    assert all(a.end_s <= b.start_s + 1e-6 for a, b in pairwise(cue_list))


def read_with_ffmpeg(path: Path) -> list[tuple[int, int, str]]:
    """(start ms, end ms, text) of every cue as FFmpeg's srt or webvtt demuxer reads the file."""
    out = []
    with av.open(str(path)) as container:
        stream = container.streams.subtitles[0]
        scale = stream.time_base * 1000
        for packet in container.demux(stream):
            if packet.size == 0:
                continue
            text = "\n".join(sub.dialogue.decode() for sub in packet.decode())
            out.append((round(packet.pts * scale), round((packet.pts + packet.duration) * scale), text))
    return out


def synthetic_words() -> list[Word]:
    """A talk with short replies, pauses, a long sentence and one word longer than a line."""
    text = (
        "Yes. No. Okay so we will now review every item on the agenda for this quarter and the next one "
        "before lunch. https://example.org/a/very/long/address/that/does/not/fit/on/one/line please "
        "read it. Thanks."
    )
    words, at = [], 0.0
    for i, w in enumerate(text.split()):
        at += 1.2 if i in (2, 20) else 0.05  # pauses
        words.append(Word(w, at, at + 0.1 + 0.04 * len(w), 0.9))
        at = words[-1].end_s
    return words


def test_cues_keep_the_conventions_and_ffmpeg_reads_them_back(tmp_path: Path) -> None:
    words = synthetic_words()
    cue_list = cues(words)
    assert_conventions(cue_list)
    assert " ".join(" ".join(c.lines) for c in cue_list).replace(" ", "") == "".join(w.word for w in words)
    for fmt in ("srt", "vtt"):
        path = tmp_path / f"talk.{fmt}"
        path.write_text(render(cue_list, fmt))
        parsed = read_with_ffmpeg(path)
        assert parsed == [
            (round(c.start_s * 1000), round(c.end_s * 1000), "\n".join(c.lines)) for c in cue_list
        ]


def test_segments_without_word_times_make_coarse_cues() -> None:
    segments = [{"start_s": 0.0, "end_s": 20.0, "text": " ".join(["word"] * 60)}]
    cue_list = cues(segment_words(segments))
    assert_conventions(cue_list)
    assert cue_list[0].start_s == 0.0 and cue_list[-1].end_s <= 20.0 + MIN_CUE_S


@pytest.fixture(scope="module")
def run_output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small in-process run with the default timestamps (words on tiny.en)."""
    archive = tmp_path_factory.mktemp("archive")
    shutil.copy(EXAMPLES / "intro.wav", archive / "intro.wav")
    (archive / "sub").mkdir()
    shutil.copy(EXAMPLES / "announcement.mp3", archive / "sub" / "announcement.mp3")
    output = tmp_path_factory.mktemp("out")
    summary = run_archive(JobConfig(str(archive), str(output), executor="in-process"))
    assert summary.line()
    return output


def test_results_carry_words_and_sentence_segments(run_output: Path) -> None:
    rows = {r["recording_id"]: r for r in read_committed(run_output, "results").to_pylist()}
    assert set(rows) == {"intro.wav", "sub/announcement.mp3"}
    for row in rows.values():
        assert row["timing"] == "words"
        assert [w["word"] for w in row["words"]] == text_words(row["text"])
        starts = [w["start_s"] for w in row["words"]]
        assert starts == sorted(starts)
        assert len(row["segments"]) >= 2  # sentences, not one segment per window
        assert " ".join(s["text"] for s in row["segments"]) == row["text"]
        assert all(s["start_s"] < s["end_s"] for s in row["segments"])


def test_exported_files_parse_and_keep_the_conventions(run_output: Path, tmp_path: Path) -> None:
    for fmt in ("srt", "vtt", "json"):
        assert (
            export_subtitles.main(["--output", str(run_output), "--format", fmt, "--to", str(tmp_path)]) == 0
        )
    srt, vtt = tmp_path / "sub" / "announcement.mp3.srt", tmp_path / "sub" / "announcement.mp3.vtt"
    assert vtt.read_text().startswith("WEBVTT\n")
    cue_list = [
        Cue(c["start_s"], c["end_s"], tuple(c["lines"]))
        for c in json.loads((tmp_path / "sub" / "announcement.mp3.json").read_text())["cues"]
    ]
    assert_conventions(cue_list)
    assert (
        read_with_ffmpeg(srt)
        == read_with_ffmpeg(vtt)
        == [(round(c.start_s * 1000), round(c.end_s * 1000), "\n".join(c.lines)) for c in cue_list]
    )
    assert len(read_with_ffmpeg(tmp_path / "intro.wav.srt")) >= 2
