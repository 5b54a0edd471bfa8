"""Adding a task is one record in ``pipeline.tasks.TASKS`` plus a prompt in each family that can do it:
a toy task registered in this fixture, with a Qwen2-Audio plain prompt and nothing else, runs through
the job configuration, the capability check, presets, the model, stitching and metrics."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import metrics, tasks
from pipeline.models import qwen2_audio
from pipeline.presets import resolve_reduction
from pipeline.publish import read_committed
from schemas.job_config import JobConfig, JobConfigError
from tests.conftest import tone_bursts, write_wav
from workers.archive_job import check_model, run_archive

TINY = "tiny-random-qwen2-audio"


@pytest.fixture
def keyword_task(monkeypatch: pytest.MonkeyPatch) -> str:
    """kws: which keyword a recording says, asked by a question-like field; sparse, scored by accuracy."""
    record = tasks.Task(
        "kws",
        dense=False,
        result="answer",
        reference="keyword",
        metric="accuracy",
        instruction=lambda r: f"Which of these words is spoken: {tasks.needed(r, 'question')}?",
        needs=("question",),
    )
    monkeypatch.setitem(tasks.TASKS, record.name, record)
    monkeypatch.setitem(
        qwen2_audio.PLAIN_PROMPTS, record.name, lambda r: f"{qwen2_audio.AUDIO_PROMPT}Keyword ({r.question}):"
    )
    return record.name


def test_a_task_is_one_record_and_a_prompt(keyword_task: str, tmp_path: Path) -> None:
    with pytest.raises(JobConfigError, match="--task kws needs --question"):
        JobConfig("in", "out", task=keyword_task)
    archive = tmp_path / "archive"
    write_wav(archive / "a.wav", tone_bursts(3.0))
    config = JobConfig(
        str(archive),
        str(tmp_path / "out"),
        task=keyword_task,
        question="yes, no",
        model=TINY,
        executor="in-process",
    )
    info = check_model(config)
    assert keyword_task in info.tasks
    # no preset names the task: it reduces as the model's other sparse tasks do
    assert resolve_reduction(info, keyword_task) == resolve_reduction(info, "sqa")
    assert not tasks.is_dense(keyword_task)

    summary = run_archive(config)
    assert (summary.ok + summary.empty, summary.failed) == (1, 0)
    (row,) = read_committed(tmp_path / "out", "results").to_pylist()
    assert row["task"] == keyword_task and row["answer"] is not None and row["text"] is None

    assert metrics.reference_fields()[keyword_task] == "keyword"
    assert metrics.task_scores(keyword_task, ["yes", "no"], [row["answer"] or "", "no"], ["en", "en"]) in (
        {"Acc %": 50.0},
        {"Acc %": 100.0},
    )


def test_a_family_without_a_prompt_for_it_refuses_it(keyword_task: str) -> None:
    from pipeline.models.base import ModelTaskError

    with pytest.raises(ModelTaskError, match="cannot do task 'kws'"):
        check_model(JobConfig("in", "out", task=keyword_task, question="yes, no"))  # whisper-tiny.en
