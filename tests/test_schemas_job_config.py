"""JobConfig: validation with clear errors, and the default windows per model call."""

from __future__ import annotations

import pytest

from schemas.job_config import JobConfig, JobConfigError


def test_windows_per_block_defaults_by_actor_kind_and_honours_the_option():
    assert JobConfig("in", "out").windows_per_block == 16
    assert JobConfig("in", "out", gpus_per_actor=1).windows_per_block == 64
    assert JobConfig("in", "out", gpus_per_actor=1, batch_size=5).windows_per_block == 5
    assert JobConfig.from_json(JobConfig("in", "out").to_json()) == JobConfig("in", "out")
    assert [JobConfig("in", "out", prompt_format=f).model_kind for f in ("auto", "chat", "plain")] == [
        None,
        "instruct",
        "base",
    ]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "--batch-size"),
        ({"task": "st"}, "--target-language"),
        ({"task": "sqa"}, "--question"),
        ({"device": "tpu"}, "--device"),
        ({"overlap_s": -1}, "--overlap-s"),
        ({"prompt_format": "jinja"}, "--prompt-format"),
        ({"int8": True, "gpus_per_actor": 1}, "--int8"),
        ({"int8": True, "device": "cuda"}, "--int8"),
    ],
)
def test_bad_options_name_the_flag(kwargs, message):
    with pytest.raises(JobConfigError, match=message):
        JobConfig("in", "out", **kwargs)


def test_timestamps_are_checked_against_the_model() -> None:
    from pipeline.models.base import ModelTaskError
    from workers.archive_job import check_model

    with pytest.raises(JobConfigError, match="--timestamps"):
        JobConfig("in", "out", timestamps="frames")
    assert check_model(JobConfig("in", "out", timestamps="words")).word_times  # tiny.en names its heads
    with pytest.raises(ModelTaskError, match="no word times"):
        check_model(JobConfig("in", "out", model="tiny-random-qwen2-audio", timestamps="words"))
