"""Planning: listing of folders, manifests and WebDataset shards; ids, hashes, the done-set."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from pipeline.plan import (
    PlanError,
    PlannedRecording,
    done_keys,
    fingerprint,
    list_recordings,
    pending,
    read_bytes,
)
from schemas.manifest import RecordingEntry, RunManifest


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_shard(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_folder_ids_are_relative_paths_and_hashes_are_of_content(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "x.WAV").write_bytes(b"one")
    (tmp_path / "y.flac").write_bytes(b"two")
    (tmp_path / "notes.txt").write_bytes(b"ignored")
    recs = list_recordings(tmp_path)
    assert [r.recording_id for r in recs] == ["a/b/x.WAV", "y.flac"]
    assert recs[0].content_sha256 == _sha(b"one")
    assert read_bytes(recs[1].source_path) == b"two"


def test_manifest_resolves_relative_paths_and_keeps_extra_fields(tmp_path: Path) -> None:
    (tmp_path / "audio").mkdir()
    (tmp_path / "audio" / "m.wav").write_bytes(b"m")
    abs_file = tmp_path / "abs.wav"
    abs_file.write_bytes(b"abs")
    manifest = tmp_path / "list.jsonl"
    lines = [{"id": "m1", "audio": "audio/m.wav", "speaker": "s1"}, {"id": "m2", "audio": str(abs_file)}]
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    recs = list_recordings(manifest)
    assert [(r.recording_id, r.content_sha256) for r in recs] == [("m1", _sha(b"m")), ("m2", _sha(b"abs"))]
    assert json.loads(recs[0].meta) == {"speaker": "s1"}


def test_manifest_line_without_id_is_refused_with_its_line_number(tmp_path: Path) -> None:
    manifest = tmp_path / "list.jsonl"
    manifest.write_text('{"id": "a", "audio": "a.wav"}\n{"audio": "b.wav"}\n')
    with pytest.raises(PlanError, match=r"list.jsonl:2"):
        list_recordings(manifest)


def test_missing_manifest_file_is_planned_with_empty_hash(tmp_path: Path) -> None:
    manifest = tmp_path / "list.jsonl"
    manifest.write_text('{"id": "gone", "audio": "gone.wav"}\n')
    (rec,) = list_recordings(manifest)
    assert rec.content_sha256 == ""


def test_webdataset_members_are_located_by_offset(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    _write_shard(
        shards / "s0.tar", {"k1.flac": b"audio-1", "k1.json": b'{"lang": "en"}', "k2.wav": b"audio-22"}
    )
    _write_shard(shards / "s1.tar", {"sub/k3.mp3": b"audio-333", "k4.json": b"{}"})  # k4 has no audio
    recs = list_recordings(shards)
    assert [r.recording_id for r in recs] == ["k1", "k2", "sub/k3"]
    for r, data in zip(recs, (b"audio-1", b"audio-22", b"audio-333"), strict=True):
        assert read_bytes(r.source_path, r.member_offset, r.member_size) == data
        assert r.content_sha256 == _sha(data)
    assert json.loads(recs[0].meta) == {"lang": "en"}


def test_duplicate_ids_across_shards_and_mixed_folders_are_refused(tmp_path: Path) -> None:
    _write_shard(tmp_path / "a.tar", {"k.wav": b"1"})
    _write_shard(tmp_path / "b.tar", {"k.wav": b"2"})
    with pytest.raises(PlanError, match="duplicate"):
        list_recordings(tmp_path)
    (tmp_path / "loose.wav").write_bytes(b"3")
    with pytest.raises(PlanError, match="both"):
        list_recordings(tmp_path)
    with pytest.raises(PlanError, match="not a folder"):
        list_recordings(tmp_path / "nothing.csv")


def _manifest(fp: str, recs: list[tuple[str, str]]) -> RunManifest:
    return RunManifest(
        run_id="r", fingerprint=fp, pipeline_version="v", presets_version="p", created_at="t", config={},
        reduction={}, versions={}, files={}, counts={},
        recordings=[RecordingEntry(i, h, "ok") for i, h in recs],
    )  # fmt: skip


def test_done_set_needs_same_fingerprint_id_and_content() -> None:
    fp = fingerprint("m", "asr", {"task": "asr"}, {"method": "none"}, "1")
    assert fp != fingerprint("m", "asr", {"task": "asr"}, {"method": "fastadasp"}, "1")
    assert fp != fingerprint("m", "asr", {"task": "asr"}, {"method": "none"}, "2")
    done = done_keys([_manifest(fp, [("a", "h1"), ("b", "h2")]), _manifest("other", [("c", "h3")])], fp)
    recs = [
        PlannedRecording("a", "p", "h1"),
        PlannedRecording("b", "p", "changed"),
        PlannedRecording("c", "p", "h3"),
    ]
    todo, skipped = pending(recs, done)
    assert [r.recording_id for r in todo] == ["b", "c"]
    assert [r.recording_id for r in skipped] == ["a"]
