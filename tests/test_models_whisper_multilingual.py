"""Multilingual Whisper: language detection, the asr/st/lid prompts and their refusals.

A tiny random-weight multilingual WhisperConfig (saved and loaded by transformers) with Whisper base's
real tokenizer (from the multilingual extra's package) checks our decoding token for token against
transformers' ``generate``; one slow test runs the real Whisper base on the project's own examples.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration, WhisperTokenizerFast

from pipeline.audio.decode import decode_audio
from pipeline.merging.config import NO_REDUCTION, ReductionConfig
from pipeline.models.base import Checkpoint
from pipeline.models.whisper import (
    BASE,
    WhisperSpeechModel,
    decode_policy,
    describe,
    generation_config,
    load_packaged,
    packaged_files,
)
from pipeline.models.whisper_encoder import encode
from pipeline.tasks import TaskError, TaskRequest
from tests.whisper_decode import decode_encoded

SR = 16000
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def tiny_multilingual(folder: Path, max_target_positions: int) -> WhisperSpeechModel:
    """A tiny random multilingual Whisper, saved and loaded the way a checkpoint is."""
    _, meta = packaged_files(BASE)
    tokenizer = WhisperTokenizerFast(tokenizer_file=str(meta / "tokenizer.json"))
    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=51865, num_mel_bins=80, d_model=16, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        max_source_positions=1500, max_target_positions=max_target_positions, eos_token_id=50257,
        pad_token_id=50257, bos_token_id=50257, decoder_start_token_id=50258,
        suppress_tokens=[1, 2, 50358, 50359], begin_suppress_tokens=[220, 50257],
    )  # fmt: skip
    WhisperForConditionalGeneration(config).save_pretrained(folder)
    model = WhisperForConditionalGeneration.from_pretrained(folder)
    lang_ids = json.loads((meta / "config.json").read_text())["lang_ids"]
    model.generation_config = generation_config(model.config, tokenizer, lang_ids)
    description = describe(Checkpoint("tiny-multilingual", "whisper"), model.config.to_dict())
    return WhisperSpeechModel(model, tokenizer, description, batch_size=4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> WhisperSpeechModel:
    return tiny_multilingual(tmp_path_factory.mktemp("tiny-multilingual"), max_target_positions=20)


@pytest.fixture(scope="module")
def waves() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    t = np.arange(3 * SR) / SR
    return [
        (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32),
        (0.2 * rng.standard_normal(2 * SR)).astype(np.float32),
        (0.3 * np.sin(2 * np.pi * (300 * t + 400 * t**2))).astype(np.float32)[: int(1.3 * SR)],
    ]


def features(model: WhisperSpeechModel, waves: list[np.ndarray]) -> torch.Tensor:
    return model.features(waves, sampling_rate=SR, return_tensors="pt").input_features


def generated(rows: torch.Tensor, eos: int) -> list[list[int]]:
    """generate's sequences (it strips the prompt) up to and including the first end-of-text."""
    out = []
    for row in rows.tolist():
        out.append(row[: row.index(eos) + 1] if eos in row else row)
    return out


def ours(model: WhisperSpeechModel, waves, policy, slots=None):
    """Our runner's finished requests, one per wave, in order."""
    feats = features(model, waves)
    enc = encode(model.model.model.encoder, feats, [1500] * len(waves), NO_REDUCTION, [0.0, 0.0])
    return decode_encoded(model.model, enc.states, enc.key_bias, policy, slots)


@pytest.mark.parametrize("language,task", [("de", "transcribe"), ("ja", "translate")])
def test_given_language_prompt_matches_generate(tiny, waves, language, task):
    gen = tiny.model.generation_config
    policy = decode_policy(gen, tiny.languages[language], task)
    assert policy.prompt == (50258, gen.lang_to_id[f"<|{language}|>"], gen.task_to_id[task], 50363)
    with torch.inference_mode():
        reference = tiny.model.generate(features(tiny, waves), language=language, task=task)
    assert [r.generated for r in ours(tiny, waves, policy)] == generated(reference, 50257)


def test_detected_language_and_decoding_match_generate(tiny, waves):
    gen = tiny.model.generation_config
    policy = decode_policy(gen, None, "transcribe")
    assert policy.prompt == (50258, 50359, 50363) and len(policy.detect) == 99
    feats = features(tiny, waves)
    with torch.inference_mode():
        detected = tiny.model.detect_language(feats).tolist()
        reference = tiny.model.generate(feats, task="transcribe")
    result = ours(tiny, waves, policy, slots=2)  # the third window enters as a slot frees
    assert [r.prompt[1] for r in result] == detected
    assert [r.generated for r in result] == generated(reference, 50257)


def test_tasks_and_outputs_carry_the_language(tiny, waves):
    assert tiny.description.tasks == {"asr", "st", "lid"} and tiny.description.translate_to == ("en",)
    with torch.inference_mode():
        detected = tiny.model.detect_language(features(tiny, waves)).tolist()
    codes = [tiny.tokenizer.convert_ids_to_tokens(i)[2:-2] for i in detected]
    lid = tiny.run(waves, TaskRequest("lid"), NO_REDUCTION)
    assert [o.text for o in lid] == [o.language for o in lid] == codes
    assert all(o.stats.generated_tokens == 0 and o.stats.prefill_s > 0 for o in lid)
    st = tiny.run(waves, TaskRequest("st", target_language="English"), NO_REDUCTION)
    assert [o.language for o in st] == codes
    given = tiny.run(waves[:1], TaskRequest("asr", language="German"), NO_REDUCTION)
    assert given[0].language == "de"
    # Under merging the encoder outputs differ in length per window: detection still runs batched.
    merged = tiny.run(
        waves, TaskRequest("lid"), ReductionConfig(method="fastadasp", first_layer=1, ratio=0.5)
    )
    assert all(o.language in tiny.languages for o in merged)


def test_refusals_name_what_the_model_can_do(tiny, waves):
    with pytest.raises(TaskError, match="translates only into en, not 'de'"):
        tiny.run(waves, TaskRequest("st", target_language="de"), NO_REDUCTION)
    with pytest.raises(TaskError, match=r"language='klingon'.*knows .*de, "):
        tiny.run(waves, TaskRequest("asr", language="klingon"), NO_REDUCTION)
    with pytest.raises(TaskError, match="lid"):
        tiny.run(waves, TaskRequest("lid", language="de"), NO_REDUCTION)
    with pytest.raises(TaskError, match=r"cannot do task 'er' \(it does: asr, lid, st\)"):
        tiny.run(waves, TaskRequest("er"), NO_REDUCTION)


@pytest.mark.slow
def test_real_whisper_base_on_the_examples(tmp_path, monkeypatch):
    """Converted from the two packages (through the cache), detection and decoding as generate's."""
    monkeypatch.setenv("FASTADASP_CACHE", str(tmp_path))
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model = load_packaged(BASE, batch_size=2)
    assert model.model.config.encoder_layers == 6 and model.description.tasks == {"asr", "st", "lid"}
    waves = [decode_audio(EXAMPLES / name).samples[: 12 * SR] for name in ("intro.wav", "library.ogg")]
    assert [o.text for o in model.run(waves, TaskRequest("lid"), NO_REDUCTION)] == ["en", "en"]
    with torch.inference_mode():
        reference = model.model.generate(features(model, waves), task="transcribe")
    texts = [model.tokenizer.decode([t for t in row if t < 50257]).strip() for row in reference.tolist()]
    outputs = model.run(waves, TaskRequest("asr"), NO_REDUCTION)
    assert [o.text for o in outputs] == texts and all(len(t) > 10 for t in texts)
    assert [o.language for o in outputs] == ["en", "en"]
