"""jobs/generate.py end to end on the tiny random Qwen2-Audio and a wav the test writes."""

from __future__ import annotations

import runpy
import wave

import numpy as np
import pytest


@pytest.fixture
def tone(tmp_path):
    t = np.arange(16000 * 3) / 16000
    path = tmp_path / "tone.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype(np.int16).tobytes())
    return path


def run_job(argv, monkeypatch) -> int:
    """The script as run from a shell; its exit status."""
    monkeypatch.setattr("sys.argv", ["generate.py", *argv])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path("jobs/generate.py", run_name="__main__")
    return exited.value.code


def test_prints_layer_lengths_and_savings(tone, monkeypatch, capsys):
    status = run_job(
        [
            str(tone),
            "--model",
            "tiny-random-qwen2-audio",
            "--method",
            "fastadasp",
            "--target",
            "0.3",
            "--max-new-tokens",
            "4",
        ],
        monkeypatch,
    )
    out = capsys.readouterr().out
    assert status == 0
    layers = [int(n) for n in out.split("audio tokens per layer: ")[1].split("\n")[0].split()]
    assert layers[0] == 75 and layers == sorted(layers, reverse=True) and layers[-1] < 75
    assert "saved)" in out and "prefill" in out


def test_bad_reduction_is_refused_in_one_line(tone, monkeypatch, capsys):
    """Refused the archive job's way (exit 2, one line), no traceback."""
    cases = [
        (["--method", "fastv", "--ratio", "1.5"], r"ratio=1.5 is outside"),
        (
            ["--method", "fastv", "--ratio", "0.2", "--first-layer", "9"],
            "first_layer=9 is outside the model's layers 0..3",
        ),
    ]
    for extra, message in cases:
        status = run_job([str(tone), "--model", "tiny-random-qwen2-audio", *extra], monkeypatch)
        err = capsys.readouterr().err
        assert status == 2 and err.startswith("refused: ") and message in err
        assert len(err.splitlines()) == 1, err
