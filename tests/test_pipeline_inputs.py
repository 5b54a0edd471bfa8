"""Planning: listing of folders, manifests and WebDataset shards; ids, hashes, the done-set."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.audio.decode import decode_audio
from pipeline.inputs import (
    PlanError,
    PlannedRecording,
    SeenSources,
    fingerprint,
    list_input,
    list_recordings,
    open_source,
    pending,
    sha256_file,
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
    with open_source(recs[1].source_path) as f:
        assert f.read() == b"two"


def _encode_tone(path: Path, codec: str, rate: int = 48000) -> Path:
    """One second of a tone, encoded with PyAV's FFmpeg into ``path`` (container by its extension)."""
    import av
    import numpy as np

    pcm = (0.3 * np.sin(2 * np.pi * 220 * np.arange(rate) / rate)).astype(np.float32)[None, :]
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate)
        stream.layout = "mono"
        step = stream.codec_context.frame_size or 1024
        for first in range(0, pcm.shape[1], step):
            frame = av.AudioFrame.from_ndarray(pcm[:, first : first + step], format="fltp", layout="mono")
            frame.sample_rate = rate
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def test_audio_pyav_decodes_is_listed_and_other_files_are_counted_by_extension(tmp_path: Path) -> None:
    """.webm and .aac are audio PyAV decodes: listed, and decoded; the rest is counted, not listed."""
    _encode_tone(tmp_path / "talk.webm", "libopus")
    _encode_tone(tmp_path / "call.aac", "aac")
    for name in ("notes.txt", "sub/readme.TXT", "LICENSE"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("not audio")
    listing = list_input(tmp_path)
    assert [r.recording_id for r in listing.recordings] == ["call.aac", "talk.webm"]
    assert listing.not_audio == {".txt": 2, "(none)": 1}
    for r in listing.recordings:
        assert decode_audio(r.source_path).duration_s == pytest.approx(1.0, abs=0.05)
    assert list_input(tmp_path / "sub").not_audio == {".txt": 1}
    (tmp_path / "empty").mkdir()
    empty = list_input(tmp_path / "empty")
    assert (empty.recordings, empty.not_audio) == ([], {})


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


def test_bad_manifest_lines_are_planned_as_errors_naming_their_line(tmp_path: Path) -> None:
    manifest = tmp_path / "list.jsonl"
    manifest.write_text('{"id": "a", "audio": "a.wav"}\n{"audio": "b.wav"}\n{"id": "c", "audio": \n')
    recs = list_recordings(manifest)
    assert [(r.recording_id, bool(r.plan_error)) for r in recs] == [
        ("a", False),
        ("list.jsonl:2", True),
        ("list.jsonl:3", True),
    ]
    assert "line 2: need a JSON object with 'id' and 'audio'" in recs[1].plan_error
    assert "JSONDecodeError" in recs[2].plan_error


def test_a_file_name_that_is_not_utf8_is_planned_as_an_error(tmp_path: Path) -> None:
    (tmp_path / "good.wav").write_bytes(b"good")
    with open(os.fsencode(tmp_path) + b"/caf\xe9 latin1.wav", "wb") as f:  # a name only bytes can spell
        f.write(b"x")
    bad, good = list_recordings(tmp_path)
    assert (good.recording_id, good.plan_error) == ("good.wav", "")
    assert bad.recording_id == "caf\\xe9 latin1.wav"
    assert "not UTF-8" in bad.plan_error
    bad.recording_id.encode()  # an Arrow string, unlike the name itself


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
    assert [r.recording_id for r in recs] == ["k1", "k2", "k4", "sub/k3"]
    assert "no audio member among ['k4.json']" in recs[2].plan_error
    recs = [r for r in recs if not r.plan_error]
    for r, data in zip(recs, (b"audio-1", b"audio-22", b"audio-333"), strict=True):
        with open_source(r.source_path, (r.member_offset, r.member_size)) as f:
            assert f.read() == data  # a member read in place, as the CPU stage reads it
        assert r.content_sha256 == _sha(data) == sha256_file(r.source_path, (r.member_offset, r.member_size))
    assert json.loads(recs[0].meta) == {"lang": "en"}


def test_damaged_shards_keep_their_readable_samples_and_report_the_rest(tmp_path: Path) -> None:
    members = {"a.wav": b"A" * 3000, "a.json": b"{not json", "b.wav": b"B" * 3000, "c.wav": b"C" * 3000}
    full = _write_shard(tmp_path / "full.tar", members).read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(full[: len(full) // 2])  # ends inside c.wav
    recs = {r.recording_id: r for r in list_recordings(cut)}
    assert sorted(recs) == ["a", "b", "c"]
    assert recs["a"].plan_error.startswith("a.json: not JSON")  # its audio is fine, its metadata is not
    assert (recs["b"].plan_error, recs["b"].content_sha256) == ("", _sha(b"B" * 3000))
    assert recs["c"].plan_error.startswith("the shard breaks off here (ReadError")
    cut.write_bytes(full[:700])  # inside the first member's data: nothing to plan but the shard's error
    (broken,) = list_recordings(cut)
    assert broken.recording_id == "a" and "breaks off" in broken.plan_error
    dotted = _write_shard(tmp_path / "dots.tar", {"2024.01.05.wav": b"x", "ok.wav": b"y"})
    recs = list_recordings(dotted)
    assert [(r.recording_id, bool(r.plan_error)) for r in recs] == [("2024", True), ("ok", False)]
    assert "keys contain no dots" in recs[0].plan_error


def test_duplicate_ids_are_one_error_naming_each_source_and_mixed_folders_are_refused(tmp_path: Path) -> None:
    _write_shard(tmp_path / "a.tar", {"k.wav": b"1", "two.wav": b"2", "two.flac": b"3", "ok.wav": b"4"})
    _write_shard(tmp_path / "b.tar", {"k.wav": b"2"})
    k, ok, two = list_recordings(tmp_path)
    assert (k.recording_id, ok.recording_id, ok.plan_error, two.recording_id) == ("k", "ok", "", "two")
    assert (
        k.plan_error.startswith("recording id given by 2 items") and "b.tar (member at 512)" in k.plan_error
    )
    assert two.plan_error == "more than one audio member: ['two.wav', 'two.flac']"
    manifest = tmp_path / "list.jsonl"
    lines = [{"id": "m", "audio": "x.wav"}, {"id": "m", "audio": "y.wav"}, {"id": None, "audio": "z.wav"}]
    lines += [{"id": "", "audio": "z.wav"}, {"id": 7, "audio": "z.wav"}]
    manifest.write_text("\n".join(json.dumps(x) for x in lines))
    recs = {r.recording_id: r.plan_error for r in list_recordings(manifest)}
    assert sorted(recs) == ["7", "list.jsonl:3", "list.jsonl:4", "m"]
    assert "x.wav, " in recs["m"] and "id None is no non-empty string" in recs["list.jsonl:3"]
    assert "id '' is no" in recs["list.jsonl:4"] and recs["7"] == ""
    (tmp_path / "loose.wav").write_bytes(b"3")
    with pytest.raises(PlanError, match="both"):
        list_recordings(tmp_path)
    (tmp_path / "list.csv").write_text("")
    with pytest.raises(PlanError, match="not a folder"):
        list_recordings(tmp_path / "list.csv")
    with pytest.raises(PlanError, match="no such file or folder"):
        list_recordings(tmp_path / "nothing")


def _manifest(
    fp: str, recs: list[tuple[str, str]], status: str = "ok", stage: str | None = None
) -> RunManifest:
    return RunManifest(
        run_id="r", fingerprint=fp, pipeline_version="v", presets_version="p", created_at="t", config={},
        reduction={}, versions={}, files={}, counts={},
        recordings=[RecordingEntry(i, h, status, stage) for i, h in recs],
    )  # fmt: skip


def _ids(recs: list[PlannedRecording]) -> list[str]:
    return [r.recording_id for r in recs]


def test_done_set_needs_same_fingerprint_id_and_content() -> None:
    win = {"overlap_s": 3.0, "max_window_s": 30.0}
    fp = fingerprint("m", "asr", {"task": "asr"}, win, {"method": "none"}, "1")
    assert fp != fingerprint("m", "asr", {"task": "asr"}, win, {"method": "fastadasp"}, "1")
    assert fp != fingerprint("m", "asr", {"task": "asr"}, win, {"method": "none"}, "2")
    assert fp != fingerprint("m", "asr", {"task": "asr"}, win | {"overlap_s": 5.0}, {"method": "none"}, "1")
    runs = [_manifest(fp, [("a", "h1"), ("b", "h2")]), _manifest("other", [("c", "h3")])]
    recs = [
        PlannedRecording("a", "p", "h1"),
        PlannedRecording("b", "p", "changed"),
        PlannedRecording("c", "p", "h3"),
    ]
    todo, skipped = pending(recs, runs, fp)
    assert (_ids(todo), _ids(skipped)) == (["b", "c"], ["a"])


def test_done_is_what_the_committed_view_shows_its_latest_entry() -> None:
    """A -> B -> A: B is the latest committed, so A is processed again (the view would show B for good
    if the done-set remembered every (id, hash) ever processed). Likewise a setting switched back."""
    runs = [_manifest("fp", [("a", "hA")]), _manifest("fp", [("a", "hB")])]
    assert _ids(pending([PlannedRecording("a", "p", "hA")], runs, "fp")[0]) == ["a"]
    assert _ids(pending([PlannedRecording("a", "p", "hB")], runs, "fp")[1]) == ["a"]
    runs.append(_manifest("fp2", [("a", "hB")]))  # same bytes, another reduction: what the view shows now
    assert _ids(pending([PlannedRecording("a", "p", "hB")], runs, "fp")[0]) == ["a"]


def test_new_bytes_for_an_id_committed_from_another_source_are_a_plan_error() -> None:
    """Two input folders with the same relative names written into one output: not a silent overwrite."""
    (run,) = runs = [_manifest("fp", [("a.wav", "h1"), ("b.wav", "h2")])]
    run.recordings[:] = [replace(r, source_path=f"/one/{r.recording_id}") for r in run.recordings]
    other = [PlannedRecording("a.wav", "/two/a.wav", "h9"), PlannedRecording("b.wav", "/two/b.wav", "h2")]
    todo, skipped = pending(other, runs, "fp")
    assert _ids(skipped) == ["b.wav"]  # the same bytes: the committed row is right for it
    (a,) = todo
    assert "already committed from /one/a.wav, now given by /two/a.wav" in a.plan_error
    # That error does not own the id: the first source, changed, is processed as usual.
    runs.append(_manifest("fp", [("a.wav", "h9")], "error", "plan"))
    runs[-1].recordings[:] = [replace(runs[-1].recordings[0], source_path="/two/a.wav")]
    (again,) = pending([PlannedRecording("a.wav", "/one/a.wav", "h5")], runs, "fp")[0]
    assert again.plan_error == ""


def test_errors_a_later_run_may_not_repeat_are_redone() -> None:
    runs = [
        _manifest("fp", [("decoded-badly", "h1")], "error", "decode"),
        _manifest("fp", [("too-long", "h2")], "error", "limit"),
        _manifest("fp", [("oom", "h3")], "error", "model"),
        _manifest("fp", [("list.jsonl:4", "")], "error", "plan"),
        _manifest("fp", [("silent", "h4")], "empty"),
        _manifest("fp", [("crashed-twice", "h5")], "error", "crash"),  # set aside, not retried each night
    ]
    recs = [PlannedRecording(r.recording_id, "p", r.content_sha256) for m in runs for r in m.recordings]
    assert _ids(pending(recs, runs, "fp")[1]) == ["decoded-badly", "silent", "crashed-twice"]
    assert _ids(pending(recs, runs, "fp", retry_errors=True)[1]) == ["silent"]


def test_broken_symlinks_are_planned_as_errors(tmp_path: Path) -> None:
    (tmp_path / "real.wav").write_bytes(b"r")
    (tmp_path / "link.wav").symlink_to(tmp_path / "real.wav")
    (tmp_path / "dangling.wav").symlink_to(tmp_path / "gone.wav")
    (tmp_path / "loop.wav").symlink_to(tmp_path / "loop.wav")
    recs = {r.recording_id: r for r in list_recordings(tmp_path)}
    assert sorted(recs) == ["dangling.wav", "link.wav", "loop.wav", "real.wav"]
    assert recs["link.wav"].content_sha256 == _sha(b"r")
    assert recs["dangling.wav"].plan_error == f"dangling symlink to {tmp_path / 'gone.wav'}"
    assert recs["loop.wav"].plan_error.startswith("symlink loop")


def _committed(recs: list[PlannedRecording]) -> SeenSources:
    """What a committed run's manifest records of these recordings."""
    entries = [
        RecordingEntry(
            r.recording_id, r.content_sha256, "ok", None, r.source_path, r.member_offset, r.source_size,
            r.source_mtime_ns,
        )
        for r in recs
    ]  # fmt: skip
    return SeenSources(entries)


def test_unchanged_sources_keep_their_committed_hash_without_being_read(tmp_path: Path) -> None:
    (tmp_path / "a.wav").write_bytes(b"aaaa")
    (tmp_path / "b.wav").write_bytes(b"bbbb")
    seen = _committed(list_recordings(tmp_path))
    # a: new bytes of the same size under the old mtime (what only a read could notice): hash reused;
    # b: touched, so rehashed.
    stat = (tmp_path / "a.wav").stat()
    (tmp_path / "a.wav").write_bytes(b"AAAA")
    os.utime(tmp_path / "a.wav", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    (tmp_path / "b.wav").write_bytes(b"BBBB")
    os.utime(tmp_path / "b.wav", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    a, b = list_recordings(tmp_path, seen)
    assert (a.content_sha256, b.content_sha256) == (_sha(b"aaaa"), _sha(b"BBBB"))
    assert a.source_size == 4 and b.source_mtime_ns == stat.st_mtime_ns + 10**9
    assert [r.content_sha256 for r in list_recordings(tmp_path)] == [_sha(b"AAAA"), _sha(b"BBBB")]

    shard = _write_shard(tmp_path / "s.tar", {"k.wav": b"kkkk", "k.json": b"{}"})
    seen = _committed(list_recordings(shard))
    stat = shard.stat()
    data = shard.read_bytes()
    shard.write_bytes(data.replace(b"kkkk", b"KKKK"))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert list_recordings(shard, seen)[0].content_sha256 == _sha(b"kkkk")
    assert list_recordings(shard)[0].content_sha256 == _sha(b"KKKK")
