"""Model stage: windows of any lengths in one Ray batch reach the model together; bad rows pass through."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline.audio.decode import decode_audio
from pipeline.models.whisper import CPU_ENCODER_PASS
from schemas.stages import WINDOW_SCHEMA, WINDOW_TEXT_SCHEMA
from workers.model_stage import WindowPredictor
from workers.ray_run import actor_cpus

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "intro.wav"


def _row(i: int, pcm: np.ndarray | None, status: str = "ok") -> dict:
    return {
        "recording_id": "intro", "source_path": str(EXAMPLE), "content_sha256": "h", "duration_s": 9.0,
        "window_index": i, "window_count": 4, "start_s": 0.0, "end_s": 1.0, "overlap_before_s": 0.0,
        "overlap_after_s": 0.0, "meta": "{}", "status": status, "stage": None if status == "ok" else "decode",
        "error": None if status == "ok" else "bad file", "pcm": None if pcm is None else pcm.astype("<f4").tobytes(),
    }  # fmt: skip


@pytest.mark.usefixtures("ray_local")
def test_mixed_lengths_share_one_model_call_and_match_single_runs():
    speech = decode_audio(EXAMPLE).samples
    cuts = [speech[: 16000 * 3], speech[16000 * 3 : 16000 * 7], speech[16000 * 7 : 16000 * 8 + 1234]]
    predictor = WindowPredictor("whisper-tiny.en", {"task": "asr"}, {"method": "none"}, device="cpu")
    calls = []
    hook = predictor.model.model.model.encoder.layer_norm.register_forward_hook(lambda *_: calls.append(1))
    rows = [_row(0, cuts[0]), _row(1, None, status="error"), _row(2, cuts[1]), _row(3, cuts[2])]
    out = predictor.submit(pa.Table.from_pylist(rows, schema=WINDOW_SCHEMA)).result()
    hook.remove()
    assert out.schema == WINDOW_TEXT_SCHEMA and out.num_rows == 4
    # three windows of three lengths reach the model in one call: CPU encoder passes of two windows
    assert len(calls) == math.ceil(3 / CPU_ENCODER_PASS)
    got = out.to_pylist()
    assert got[1]["status"] == "error" and got[1]["error"] == "bad file" and got[1]["text"] is None
    one_by_one = [
        predictor.submit(pa.Table.from_pylist([_row(0, cut)], schema=WINDOW_SCHEMA)).result() for cut in cuts
    ]
    assert [got[i]["text"] for i in (0, 2, 3)] == [t.column("text")[0].as_py() for t in one_by_one]
    assert all(got[i]["text"] for i in (0, 2, 3))

    # A window that fails the stream (here: a fault injected into its encoder pass) becomes its own
    # error row; the windows decoding beside it, and those of the next batch, finish as they would.
    encode = predictor.model._encode_requests

    def failing(requests, *args):
        if any(len(r.work) == len(cuts[1]) for r in requests):
            raise RuntimeError("injected fault")
        return encode(requests, *args)

    predictor.model._encode_requests = failing
    try:
        first = predictor.submit(
            pa.Table.from_pylist([_row(i, c) for i, c in enumerate(cuts)], schema=WINDOW_SCHEMA)
        )
        second = predictor.submit(pa.Table.from_pylist([_row(0, cuts[0])], schema=WINDOW_SCHEMA))
        failed, after = first.result(timeout=120).to_pylist(), second.result(timeout=120).to_pylist()
    finally:
        predictor.model._encode_requests = encode
    assert [r["status"] for r in failed] == ["ok", "error", "ok"]
    assert failed[1]["error"] == "RuntimeError: injected fault" and failed[1]["stage"] == "model"
    assert [failed[0]["text"], failed[2]["text"], after[0]["text"]] == [
        got[0]["text"],
        got[3]["text"],
        got[0]["text"],
    ]

    # Closed right after a submit (the windows reach the model thread with the close): they all finish,
    # then the thread ends.
    last = predictor.submit(
        pa.Table.from_pylist([_row(i, c) for i, c in enumerate(cuts)], schema=WINDOW_SCHEMA)
    )
    closing = threading.Thread(target=predictor.close, daemon=True)
    closing.start()
    closing.join(timeout=120)
    assert not closing.is_alive()
    assert [r["text"] for r in last.result(timeout=0).to_pylist()] == [got[i]["text"] for i in (0, 2, 3)]


@pytest.mark.parametrize(
    "actors,nodes,share",
    [
        (1, [2.0], 1.5),  # a 2-core machine: the model gets 1.5 CPUs (2 threads), decoding the rest
        (2, [2.0], 0.75),
        (1, [16.0], 15.5),
        (4, [16.0, 16.0], 7.75),
        (1, [16.0, 16.0], 15.5),  # one actor cannot span two nodes
        (8, [1.0], 0.5),  # never less than a CPU-stage task
        (1, [0.0, 4.0], 3.5),  # a head node without CPUs does not count
    ],
)
def test_default_cpu_share_of_model_actors(actors, nodes, share):
    assert actor_cpus(actors, nodes) == pytest.approx(share)
