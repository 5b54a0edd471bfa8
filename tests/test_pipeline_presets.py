"""Reduction presets: every preset is a valid config, dense tasks reduce gradually, sparse ones once."""

from __future__ import annotations

import pytest

from pipeline.merging.config import NO_REDUCTION
from pipeline.presets import DEFAULT, PRESETS, PRESETS_VERSION, PresetError, resolve_reduction


def test_every_model_task_has_a_default_and_schedules_fit_the_task() -> None:
    assert PRESETS_VERSION
    for model, tasks in PRESETS.items():
        for task, presets in tasks.items():
            assert DEFAULT in presets, (model, task)
            for name, preset in presets.items():
                assert preset.basis and preset.config.enabled, (model, task, name)
                if task in ("er", "sqa"):
                    assert preset.config.schedule == "single", (model, task, name)
                elif not model.startswith("whisper"):  # Whisper merges in its encoder: see the probe note
                    assert preset.config.schedule in ("constant", "decay"), (model, task, name)


def test_resolve_none_default_named_and_unknown() -> None:
    assert resolve_reduction("anything", "asr", "none") == NO_REDUCTION
    assert resolve_reduction("whisper-tiny.en", "asr") == PRESETS["whisper-tiny.en"]["asr"][DEFAULT].config
    assert resolve_reduction("Qwen/Qwen2-Audio-7B-Instruct", "st", "decay").schedule == "decay"
    with pytest.raises(PresetError, match="choose one of: none, default, constant"):
        resolve_reduction("whisper-tiny.en", "asr", "bogus")
    with pytest.raises(PresetError, match=r"choose one of: none$"):
        resolve_reduction("whisper-tiny.en", "er")
