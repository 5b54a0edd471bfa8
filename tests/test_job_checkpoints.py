"""The jobs on real checkpoint checkpoints, as a user with downloaded weights runs them: tiny random
Qwen2-Audio (base and instruct) and GLM-ASR checkpoints saved with ``save_pretrained``, through
jobs/transcribe_archive.py on a real local Ray cluster, through the offline hub cache, and through
jobs/generate.py and jobs/evaluate.py. The driver never constructs the model."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jobs import evaluate, transcribe_archive
from pipeline.publish import read_committed
from tests.conftest import hub_cache, tone_bursts, write_wav

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def audio(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("audio")
    write_wav(root / "a.wav", tone_bursts(3.0))
    write_wav(root / "b.wav", tone_bursts(5.0))
    return root


def _refuse_modules(*args, **kwargs):
    raise AssertionError("the driver constructed a torch module")


@pytest.mark.parametrize(("key", "task"), [("qwen-base", "er"), ("qwen-instruct", "asr"), ("glm", "asr")])
def test_archive_job_on_a_checkpoint_folder(ray_local, checkpoints, audio, tmp_path, monkeypatch, key, task):
    """End to end with ``--model <folder>``; the driver process (planning, describing the model,
    stitching, writing) must never build a model: every torch module constructed there fails."""
    out = tmp_path / "out"
    monkeypatch.setattr(torch.nn.Module, "__init__", _refuse_modules)  # actors run in other processes
    argv = ["--input", str(audio), "--output", str(out), "--model", str(checkpoints[key]), "--task", task]
    assert transcribe_archive.main([*argv, "--batch-size", "2"]) == 0
    monkeypatch.undo()
    results = read_committed(out, "results").to_pylist()
    assert sorted(r["recording_id"] for r in results) == ["a.wav", "b.wav"]
    assert all(r["status"] == "ok" and r["model"] == str(checkpoints[key]) for r in results)
    stats = read_committed(out, "stats").to_pylist()
    assert all(s["audio_tokens_kept"] < s["audio_tokens_in"] for s in stats)  # the default preset merged


def test_refusals_before_any_work(checkpoints, audio, tmp_path, capsys):
    out = str(tmp_path / "out")
    cases = [
        (["--model", str(checkpoints["glm"]), "--task", "er"], "cannot do task 'er' (it does: asr)"),
        (["--model", "whisper-huge"], "unknown model 'whisper-huge'"),
        (["--model", str(tmp_path)], "no config.json"),
        (["--task", "st", "--target-language", "de"], "cannot do task 'st' (it does: asr)"),
        (["--language", "de"], "English-only"),
    ]
    for extra, message in cases:
        assert transcribe_archive.main(["--input", str(audio), "--output", out, *extra]) == 2
        assert message in capsys.readouterr().err
    assert not Path(out).exists()


def test_archive_job_with_a_hub_id_from_the_offline_cache(checkpoints, audio, tmp_path):
    cache = hub_cache(tmp_path / "hub", "acme/tiny-qwen2-audio", checkpoints["qwen-instruct"])
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    env.pop("RAY_ADDRESS", None)
    cmd = [
        sys.executable,
        "jobs/transcribe_archive.py",
        "--input",
        str(audio),
        "--output",
        str(tmp_path / "out"),
    ]
    cmd += ["--model", "acme/tiny-qwen2-audio", "--num-cpus", "2"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = read_committed(tmp_path / "out", "results").to_pylist()
    assert [r["status"] for r in results] == ["ok", "ok"]


def test_generate_and_evaluate_take_a_checkpoint_folder(checkpoints, audio, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        "sys.argv",
        ["generate.py", str(audio / "a.wav"), "--model", str(checkpoints["glm"]), "--max-new-tokens", "4"],
    )
    with pytest.raises(SystemExit) as exited:  # the script exits with its status
        runpy.run_path("jobs/generate.py", run_name="__main__")
    assert exited.value.code == 0
    assert "audio tokens per layer: 37 37 37 37" in capsys.readouterr().out
    manifest = tmp_path / "manifest.jsonl"
    rows = [{"id": name, "audio": str(audio / name), "text": "a"} for name in ("a.wav", "b.wav")]
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "eval"
    argv = ["--manifest", str(manifest), "--model", str(checkpoints["qwen-instruct"]), "--levels", "0.3"]
    evaluate.main([*argv, "--methods", "FastAdaSP decay", "--out", str(out)])
    results = json.loads((out / "results.json").read_text())["results"]
    assert [r["label"] for r in results] == ["No reduction", "FastAdaSP decay"]
    assert results[1]["kv_kept_frac"] < 1.0 == results[0]["kv_kept_frac"]
