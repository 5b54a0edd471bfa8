"""CPU stage: real files -> window rows; every bad input becomes one error or empty row."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.inputs import list_recordings
from schemas.stages import PLAN_SCHEMA, WINDOW_SCHEMA
from tests.conftest import write_wav
from workers.cpu_stage import cut_windows

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
