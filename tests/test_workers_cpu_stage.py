"""CPU stage: real files -> window rows; every bad input becomes one error or empty row; streaming cuts
the windows of the whole-recording path, in memory that does not grow with the recording."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.audio.decode import decode_audio
from pipeline.audio.vad import find_speech
from pipeline.audio.windows import cut, plan_windows
from pipeline.inputs import list_recordings
from schemas.stages import PLAN_SCHEMA, WINDOW_SCHEMA
from tests.audio_files import encode_audio, speech_in_silence
from tests.conftest import write_wav
from workers.cpu_stage import cut_windows, recording_windows

KW = {"sample_rate": 16000, "max_window_s": 4.0, "overlap_s": 1.0, "max_duration_s": 60.0}


def _cut(plan_rows: list[dict]) -> pa.Table:
    """The CPU stage's Ray UDF over plan rows, its yielded tables in one."""
    return pa.concat_tables(cut_windows(pa.Table.from_pylist(plan_rows, schema=PLAN_SCHEMA), **KW))


def _bad_inputs(root: Path, make_wav: Callable[..., Path]) -> None:
    make_wav(root / "good.wav", seconds=9.0)
    (root / "empty.wav").write_bytes(b"")
    full = (root / "good.wav").read_bytes()
    (root / "truncated.wav").write_bytes(full[: len(full) // 3])
    (root / "text.wav").write_bytes(b"this is not audio at all\n" * 40)
    write_wav(root / "zero.wav", np.zeros(0, dtype=np.float32))
    write_wav(root / "silence.wav", np.zeros(32000, dtype=np.float32))
    make_wav(root / "six_channels.wav", seconds=3.0, sample_rate=96000, channels=6)
    nan = np.full(100, np.nan, dtype="<f4").tobytes()  # float32 wav with NaN samples
    header = bytearray(full[:44])
    header[20:22], header[34:36] = (3).to_bytes(2, "little"), (32).to_bytes(2, "little")  # IEEE float, 32 bit
    header[28:32] = (16000 * 4).to_bytes(4, "little")
    header[32:34] = (4).to_bytes(2, "little")
    header[40:44] = len(nan).to_bytes(4, "little")
    header[4:8] = (36 + len(nan)).to_bytes(4, "little")
    (root / "nan.wav").write_bytes(bytes(header) + nan)
    make_wav(root / "long.wav", seconds=KW["max_duration_s"] + 5)
    with open(os.fsencode(root) + b"/caf\xe9.wav", "wb") as f:  # a name that is no UTF-8
        f.write(full)


def test_bad_inputs_become_single_rows_and_good_ones_windows(
    tmp_path: Path, make_wav: Callable[..., Path]
) -> None:
    _bad_inputs(tmp_path, make_wav)
    plan = list_recordings(tmp_path)
    (tmp_path / "six_channels.wav").unlink()  # disappears after planning
    out = _cut([r.to_row() for r in plan])
    assert out.schema == WINDOW_SCHEMA
    rows = out.to_pylist()
    by_id: dict[str, list[dict]] = {}
    for row in rows:
        by_id.setdefault(row["recording_id"], []).append(row)
    assert set(by_id) == {r.recording_id for r in plan}
    good = by_id.pop("good.wav")
    assert len(good) == good[0]["window_count"] >= 2 and all(r["status"] == "ok" for r in good)
    assert all(r["end_s"] - r["start_s"] <= KW["max_window_s"] + 1e-6 for r in good)
    assert sum(len(r["pcm"]) for r in good) // 4 >= 16000 * 4  # bursts cover over half of the 9 s
    for rid in ("silence.wav",):
        assert [r["status"] for r in by_id.pop(rid)] == ["empty"]
    stages = {rid: (rs[0]["status"], rs[0]["stage"]) for rid, rs in by_id.items() if len(rs) == 1}
    assert stages.pop("six_channels.wav") == ("error", "read")
    assert stages.pop("long.wav") == ("error", "limit")  # redone by a run with a higher limit
    assert stages.pop("caf\\xe9.wav") == ("error", "plan")
    zero = stages.pop("zero.wav")
    assert zero in {("empty", None), ("error", "decode")}
    assert stages == {k: ("error", "decode") for k in ("empty.wav", "truncated.wav", "text.wav", "nan.wav")}


def test_multichannel_high_rate_input_is_downmixed_and_resampled(
    tmp_path: Path, make_wav: Callable[..., Path]
) -> None:
    plan = list_recordings(
        make_wav(tmp_path / "in" / "six.wav", seconds=3.0, sample_rate=96000, channels=6).parent
    )
    rows = _cut([plan[0].to_row()]).to_pylist()
    assert rows[0]["status"] == "ok"
    assert abs(rows[0]["duration_s"] - 3.0) < 0.01
    pcm = np.frombuffer(rows[0]["pcm"], dtype="<f4")
    assert len(pcm) == round((rows[0]["end_s"] - rows[0]["start_s"]) * 16000)


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
STREAM_KW = {"sample_rate": 16000, "max_window_s": 8.0, "overlap_s": 2.0, "max_duration_s": None}


def _examples(rate: int) -> list[np.ndarray]:
    return [
        decode_audio(EXAMPLES / name, rate).samples for name in ("intro.wav", "standup.flac", "lecture.m4a")
    ]


def _speech_with_pauses(rate: int) -> np.ndarray:
    """A few minutes of the examples' real speech: each one after a long pause, faint hiss throughout,
    and three back to back, a region longer than a window (cut inside speech, with overlaps)."""
    speech = _examples(rate)
    pause = np.zeros(round(37.3 * rate), np.float32)
    x = np.concatenate([pause, speech[0], pause, speech[1], pause, *speech, pause[: rate * 5]])
    return x + 1e-3 * np.random.default_rng(0).standard_normal(len(x)).astype(np.float32)


def _reference_rows(path: Path) -> list[tuple]:
    """The windows as the CPU stage cut them before it streamed: the whole recording decoded, VAD over
    it, windows planned and cut from it."""
    audio = decode_audio(path, STREAM_KW["sample_rate"])
    speech = find_speech(audio.samples, audio.sample_rate)
    windows = plan_windows(speech, audio.duration_s, STREAM_KW["max_window_s"], STREAM_KW["overlap_s"])
    return [
        (
            w.index,
            len(windows),
            audio.duration_s,
            w.start_s,
            w.end_s,
            w.overlap_before_s,
            w.overlap_after_s,
            cut(audio, w).astype("<f4").tobytes(),
        )
        for w in windows
    ]


def test_streaming_cuts_the_windows_of_the_whole_recording_path(tmp_path: Path) -> None:
    """Same windows (cut points in pauses and inside speech, overlaps) and the same PCM, bit for bit, as
    the whole-recording path: for an Opus file at 48 kHz in stereo (resampled, downmixed, its blocks
    unaligned with VAD frames) and a FLAC file as a member of a tar shard."""
    (tmp_path / "in").mkdir()
    opus = encode_audio(tmp_path / "in" / "meeting.opus", np.stack([_speech_with_pauses(48000)] * 2), 48000)
    flac = encode_audio(tmp_path / "src.flac", _speech_with_pauses(16000)[None], 16000)
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        tar.add(flac, "room.flac")
    for source, path in ((tmp_path / "in", opus), (tmp_path / "shard.tar", flac)):
        (plan,) = list_recordings(source)
        rows = [
            (
                r["window_index"],
                r["window_count"],
                r["duration_s"],
                r["start_s"],
                r["end_s"],
                r["overlap_before_s"],
                r["overlap_after_s"],
                r["pcm"],
            )
            for r in recording_windows(plan.to_row(), **STREAM_KW)
        ]
        assert rows == _reference_rows(path)
        assert len(rows) >= 8 and sum(r[6] > 0 for r in rows) >= 2  # forced cuts inside speech
        assert any(b[3] - a[4] > 30 for a, b in itertools.pairwise(rows))  # long pauses left out


def test_bytes_changed_during_cutting_fail_the_recording(tmp_path: Path) -> None:
    """A file rewritten while its windows are cut ends in an error row: the last window waits for the
    check, so the stitcher fails the recording instead of stitching windows of two contents."""
    (tmp_path / "in").mkdir()
    path = encode_audio(tmp_path / "in" / "meeting.flac", _speech_with_pauses(16000)[None], 16000)
    (plan,) = list_recordings(tmp_path / "in")
    rows = []
    for row in recording_windows(plan.to_row(), **STREAM_KW):
        if not rows:
            os.utime(path, ns=(0, 0))
        rows.append(row)
    assert [r["status"] for r in rows[:-1]] == ["ok"] * (len(rows) - 1)
    assert (rows[-1]["status"], rows[-1]["stage"]) == ("error", "read")
    assert "changed while it was read" in rows[-1]["error"]
    assert len(rows) - 1 < rows[0]["window_count"]  # the last window never left


_PEAK_RSS = """
import resource, sys
from pipeline.audio.decode import decode_audio
from tests.audio_files import encode_audio, speech_in_silence
from pipeline.audio.vad import find_speech
from pipeline.audio.windows import cut, plan_windows
from pipeline.inputs import list_recordings
from workers.cpu_stage import recording_windows
rows = [r for p in list_recordings(sys.argv[1]) for r in recording_windows(p.to_row(), 16000, 30.0, 3.0, None)]
print(sum(r["status"] == "ok" for r in rows), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def test_memory_of_a_long_recording_does_not_grow_with_its_length(tmp_path: Path) -> None:
    """The CPU stage over a 1 h and a 4 h recording (mostly silence, 10 s of speech every 5 min) in a
    subprocess each: the same peak resident memory within a few MB (the whole-recording path took over
    230 MB per hour: the recording as float32 at 16 kHz, and more while decoding)."""
    speech = decode_audio(EXAMPLES / "intro.wav").samples
    peaks = {}
    for hours in (1, 4):
        (tmp_path / f"{hours}h").mkdir()
        encode_audio(
            tmp_path / f"{hours}h" / "room.flac", speech_in_silence(speech, hours * 3600, 300, 16000), 16000
        )
        out = subprocess.run(
            [sys.executable, "-c", _PEAK_RSS, str(tmp_path / f"{hours}h")],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent.parent,
        ).stdout.split()
        assert int(out[0]) == 12 * hours  # every island a window
        peaks[hours] = int(out[1])
    assert peaks[4] < peaks[1] + 24, peaks  # MB: the frame energies (1 MB per hour) and VAD's arrays


def test_ray_gets_a_long_recordings_windows_in_many_blocks(tmp_path: Path, ray_local: None) -> None:
    """Ten minutes of speech (over 100 windows, 35 MB of PCM; one block under Ray's default size) leave
    Ray's CPU stage in blocks of about 8 MiB, as they are cut."""
    import ray

    from workers.ray_run import windows_dataset

    (tmp_path / "in").mkdir()
    speech = np.concatenate(_examples(16000))
    encode_audio(
        tmp_path / "in" / "talk.flac", speech_in_silence(speech, 600, len(speech) / 16000 + 1, 16000), 16000
    )
    blocks = [
        ray.get(ref).nbytes
        for bundle in windows_dataset(list_recordings(tmp_path / "in"), STREAM_KW).iter_internal_ref_bundles()
        for ref in bundle.block_refs
    ]
    assert sum(blocks) > 30e6 and len(blocks) >= 4 and max(blocks) < 9 * 2**20, blocks
