"""jobs/evaluate.py on two of the bundled example recordings: every run scored, files written, resumable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs import evaluate
from pipeline import metrics

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def manifest(tmp_path):
    rows = [json.loads(line) for line in (EXAMPLES / "manifest.jsonl").read_text().splitlines()]
    short = [r | {"audio": str(EXAMPLES / r["audio"])} for r in rows if r["id"] in ("intro", "announcement")]
    path = tmp_path / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in short))
    return path


@pytest.mark.slow
def test_methods_side_by_side_and_resume(manifest, tmp_path):
    out = tmp_path / "eval"
    argv = ["--manifest", str(manifest), "--methods", "FastAdaSP constant", "A-ToMe", "--levels", "0.3"]
    evaluate.main([*argv, "--out", str(out)])
    results = json.loads((out / "results.json").read_text())["results"]
    assert [r["label"] for r in results] == ["No reduction", "FastAdaSP constant", "A-ToMe"]
    assert all(0 <= r["score"] < 100 and r["loops_cut"] == [] for r in results)
    assert results[0]["kv_kept_frac"] == 1.0 and all(r["kv_kept_frac"] < 1.0 for r in results[1:])
    assert "| FastAdaSP constant |" in (out / "results.md").read_text() and (out / "wer.png").stat().st_size
    runs = (out / "runs.jsonl").read_text()
    evaluate.main([*argv, "--out", str(out)])  # everything is found in runs.jsonl: nothing re-runs
    assert (out / "runs.jsonl").read_text() == runs
    assert json.loads((out / "results.json").read_text())["results"] == results


def test_rows_are_those_with_the_tasks_reference(tmp_path):
    rows = [
        {"id": "a", "language": "de", "text": "hallo welt", "translation_en": "hello world"},
        {"id": "b", "language": "en", "text": "good morning"},
        {"id": "c", "language": "zh", "text": "", "translation_en": "outside"},
        {"id": "d", "language": "ja", "text": "こんにちは"},
    ]
    path = tmp_path / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ids = {
        task: [r["id"] for r in evaluate.select(path, None, 0, field)]
        for task, field in metrics.reference_fields().items()
    }
    assert ids == {
        "asr": ["a", "b", "d"],
        "st": ["a", "c"],
        "lid": ["a", "b", "c", "d"],
        "er": ["a", "b", "d"],
    }
    assert [r["id"] for r in evaluate.select(path, None, 0, "text", ["de", "ja"])] == ["a", "d"]
    assert len(evaluate.select(path, 2, 0, "language")) == 2


def test_every_task_scores_its_headline_metric_first():
    assert list(metrics.task_scores("st", ["hello world"], ["hello world"], ["de"])) == ["BLEU", "chrF"]
    assert metrics.task_scores("lid", ["de", "fr"], ["de", "it"], ["de", "fr"]) == {"Acc %": 50.0}
    asr = metrics.task_scores("asr", ["hallo welt", "你好"], ["hallo welt", "你们好"], ["de", "zh"])
    assert asr["WER %"] == 0.0 and asr["CER % (ja/ko/zh)"] == 50.0


@pytest.mark.slow
def test_a_clip_longer_than_the_window_is_cut_and_stitched_as_the_archive_job_does():
    """The evaluation jobs take clips of any length: the 78 s lecture is cut into windows by the archive
    job's CPU stage and its windows' texts stitched; a short clip goes whole."""
    from pipeline.merging.config import NO_REDUCTION
    from pipeline.models.registry import load_model
    from pipeline.tasks import TaskRequest
    from workers.clips import cut_clips, run_clips

    rows = {r["id"]: r for r in map(json.loads, (EXAMPLES / "manifest.jsonl").read_text().splitlines())}
    clips = cut_clips([EXAMPLES / rows[i]["audio"] for i in ("lecture", "intro")], 16000, 30.0)
    assert list(clips.windows) == [0] and len(clips.windows[0]) >= 3  # the lecture only
    assert len(clips.waves) == len(clips.windows[0]) + 1 and clips.owner[-1] == 1
    lecture, intro = run_clips(load_model("whisper-tiny.en"), clips, TaskRequest("asr"), NO_REDUCTION, 8)
    scores = metrics.task_scores(
        "asr", [rows["lecture"]["text"], rows["intro"]["text"]], [lecture.text, intro.text], ["en", "en"]
    )
    assert scores["WER %"] < 15  # one text for the lecture, nothing lost or repeated at its seams
    assert lecture.stats.audio_tokens_in > intro.stats.audio_tokens_in


def test_each_padding_policy_runs_the_grid_with_its_parameters(manifest, tmp_path):
    argv = ["--manifest", str(manifest), "--out", str(tmp_path / "e"), "--methods", "FastAdaSP decay"]
    args = evaluate._parser().parse_args(
        [*argv, "--levels", "0.3", "--padding", "keep", "merge", "--padding-group", "50"]
    )
    runs = evaluate.grid_runs(args, 4)
    assert [label for label, _, _ in runs] == [
        "No reduction",
        "FastAdaSP decay",
        "No reduction, padding merge",
        "FastAdaSP decay, padding merge",
    ]
    assert [(c.padding, c.padding_margin, c.padding_group) for _, c, _ in runs[2:]] == [("merge", 50, 50)] * 2
    assert runs[1][1].method == runs[3][1].method == "fastadasp" and not runs[2][1].enabled
    assert [evaluate.length_bin(s) for s in (3.0, 5.0, 12.5, 29.9, 78.0)] == [
        "0-5 s",
        "0-5 s",
        "10-15 s",
        "20-30 s",
        "> 30 s",
    ]
