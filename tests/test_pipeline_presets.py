"""Reduction presets by family, checkpoint kind and (where measured) checkpoint: valid configs, dense
tasks reduce gradually, sparse ones once, depths rescale, unknown names list the known ones."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pipeline.merging.config import NO_REDUCTION
from pipeline.models.base import ModelDescription
from pipeline.presets import (
    BY_CHECKPOINT,
    BY_FAMILY,
    DEFAULT,
    PADDING,
    PRESETS_VERSION,
    PresetError,
    resolve_reduction,
)

QWEN_7B = ModelDescription(
    name="/models/Qwen2-Audio-7B-Instruct",
    family="qwen2_audio",
    kind="instruct",
    tasks=frozenset({"asr", "st", "er", "sqa"}),
    sample_rate=16000,
    max_window_s=30.0,
    reducing_layers=32,
)
TINY_EN = replace(QWEN_7B, name="whisper-tiny.en", family="whisper", kind="base", reducing_layers=4)


def test_every_preset_is_valid_and_schedules_fit_the_task() -> None:
    assert PRESETS_VERSION
    tables = [*BY_FAMILY.items(), *BY_CHECKPOINT.items()]
    for key, tasks in tables:
        for task, presets in tasks.items():
            assert DEFAULT in presets, (key, task)
            for name, preset in presets.items():
                assert preset.basis and (preset.config.enabled or preset.config.padding != "keep"), (
                    key,
                    task,
                )
                preset.config.check_layers(preset.layers)
                if not preset.config.enabled:  # the padding alone
                    assert name in ("padding", DEFAULT) and "whisper" in str(key), (key, task, name)
                elif task in ("er", "sqa", "lid"):
                    assert preset.config.schedule == "single", (key, task, name)
                elif "whisper" not in str(key):  # Whisper merges in its encoder: see the probe note
                    assert preset.config.schedule in ("constant", "decay"), (key, task, name)


def test_base_and_instruct_checkpoints_of_a_family_get_presets_by_kind() -> None:
    for kind in ("base", "instruct"):
        config = resolve_reduction(replace(QWEN_7B, kind=kind), "st", "decay")
        assert (config.schedule, config.first_layer) == ("decay", 9)


def test_a_measured_checkpoint_overrides_its_family() -> None:
    measured = resolve_reduction(TINY_EN, "asr")
    assert measured == BY_CHECKPOINT["whisper-tiny.en"]["asr"][DEFAULT].config
    assert not BY_CHECKPOINT["whisper-tiny.en"]["asr"][DEFAULT].provisional
    other = replace(TINY_EN, name="/models/whisper-small.en")
    assert BY_FAMILY["whisper", "base"]["asr"][DEFAULT].provisional
    family = resolve_reduction(other, "asr")  # same depth: the same speech reduction, provisional;
    assert replace(family, padding_margin=10, padding_group=100) == measured  # the padding the safer default
    assert (family.padding_margin, family.padding_group) == (PADDING["merge"]["padding_margin"], 25)


def test_first_layer_keeps_its_relative_depth_on_other_depths() -> None:
    assert resolve_reduction(replace(QWEN_7B, reducing_layers=4), "asr").first_layer == 1  # 9/32 of 4
    assert resolve_reduction(replace(TINY_EN, name="x", reducing_layers=6), "asr").first_layer == 5
    assert resolve_reduction(replace(TINY_EN, name="x", reducing_layers=1), "asr").first_layer == 0


def test_none_default_named_and_unknown() -> None:
    assert resolve_reduction(TINY_EN, "asr", "none") == NO_REDUCTION
    with pytest.raises(PresetError, match="choose one of: none, default, constant"):
        resolve_reduction(TINY_EN, "asr", "bogus")
    with pytest.raises(PresetError, match=r"\(whisper, base\), task 'er'; choose one of: none$"):
        resolve_reduction(TINY_EN, "er")


def test_whisper_base_presets_are_its_own_measurements() -> None:
    base = replace(TINY_EN, name="whisper-base", reducing_layers=6)
    for task in ("asr", "st", "lid"):
        preset = BY_CHECKPOINT["whisper-base"][task][DEFAULT]
        assert not preset.provisional and "whisper-base-multilingual-dev" in preset.basis, task
        assert resolve_reduction(base, task) == preset.config
    family = resolve_reduction(replace(base, name="x"), "asr")
    assert resolve_reduction(base, "asr") != family
    assert resolve_reduction(base, "lid").first_layer == 3  # select-layer-lid's choice


def test_whisper_presets_merge_the_padding_and_none_keeps_it() -> None:
    for task in ("asr",):
        default = resolve_reduction(TINY_EN, task)
        assert (default.padding, default.method) == ("merge", "fastadasp")
        padding = resolve_reduction(TINY_EN, task, "padding")
        assert padding.padding == "merge" and not padding.enabled
        assert default.padding_min == padding.padding_min == 500  # nearly full windows keep their padding
    assert resolve_reduction(TINY_EN, "asr", "none").padding == "keep"
    assert resolve_reduction(QWEN_7B, "asr").padding == "keep"  # a decoder-only family has no padding policy
