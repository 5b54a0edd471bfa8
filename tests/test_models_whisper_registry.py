"""Model registry: names dispatch to the right family; unknown names say what is known."""

from __future__ import annotations

import pytest

from pipeline.models.registry import KNOWN, load_model
from pipeline.models.whisper import WhisperSpeechModel


def test_default_is_the_offline_whisper(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTADASP_CACHE", str(tmp_path))
    model = load_model()
    assert isinstance(model, WhisperSpeechModel)
    assert (model.name, model.sample_rate, model.max_window_s, model.tasks) == (
        "whisper-tiny.en",
        16000,
        30.0,
        frozenset({"asr"}),
    )
    assert model.device == "cpu" and model.model.dtype.is_floating_point


def test_tiny_random_qwen2_audio_dispatches_to_its_family():
    model = load_model("tiny-random-qwen2-audio")
    assert model.name == "tiny-random-qwen2-audio"
    assert not isinstance(model, WhisperSpeechModel)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown model 'whisper-huge'") as err:
        load_model("whisper-huge")
    assert all(name in str(err.value) for name in KNOWN)
