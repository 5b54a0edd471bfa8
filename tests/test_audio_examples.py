"""The bundled examples decode, match their manifest, and exercise both kinds of window cut."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.audio.decode import decode_audio
from pipeline.audio.vad import find_speech
from pipeline.audio.windows import plan_windows

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ENTRIES = [json.loads(line) for line in (EXAMPLES / "manifest.jsonl").read_text().splitlines()]


def test_manifest_covers_the_formats() -> None:
    assert {Path(e["audio"]).suffix for e in ENTRIES} >= {".wav", ".flac", ".mp3", ".ogg", ".m4a"}
    assert sum((EXAMPLES / e["audio"]).stat().st_size for e in ENTRIES) < 3 * 2**20


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["id"] for e in ENTRIES])
def test_example_decodes_and_has_speech(entry: dict) -> None:
    audio = decode_audio(EXAMPLES / entry["audio"])
    assert (audio.source_rate, audio.source_channels) == (entry["sample_rate"], entry["channels"])
    assert audio.duration_s == pytest.approx(entry["duration_s"], abs=0.15)
    speech = find_speech(audio.samples, audio.sample_rate)
    assert speech and sum(e - s for s, e in speech) > 0.6 * audio.duration_s
    assert len(entry["text"].split()) > 5


def test_lecture_needs_a_forced_cut() -> None:
    entry = next(e for e in ENTRIES if e["id"] == "lecture")
    audio = decode_audio(EXAMPLES / entry["audio"])
    assert 60.0 < audio.duration_s < 80.0
    speech = find_speech(audio.samples, audio.sample_rate)
    assert max(e - s for s, e in speech) > 30.0
    windows = plan_windows(speech, audio.duration_s, max_window_s=30.0, overlap_s=3.0)
    assert any(w.overlap_after_s == 3.0 for w in windows)
    assert any(w.overlap_after_s == 0.0 and w.index < len(windows) - 1 for w in windows)
