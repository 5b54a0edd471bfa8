"""The real Whisper tiny.en adapter: exactness against transformers without reduction, reductions inside
the encoder, statistics, and the errors a caller can hit. Audio is synthesised here."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.merging.config import NO_REDUCTION, ReductionConfig
from pipeline.merging.schedule import output_reduction
from pipeline.models.whisper import TINY_EN, load_packaged
from pipeline.models.whisper_encoder import encode, encoder_ratios
from pipeline.presets import PADDING
from pipeline.stats import apportion
from pipeline.tasks import TaskRequest

SR = 16000
ASR = TaskRequest("asr")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def chirp(seconds: float, start_hz: float, sweep: float) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * (start_hz * t + sweep * t**2))).astype(np.float32)


def vowels(seconds: float, seed: int) -> np.ndarray:
    """A glottal-like harmonic source through changing two-formant vowels, one per 0.25 s syllable."""
    rng = np.random.default_rng(seed)
    formants = [(730, 1090), (270, 2290), (300, 870), (530, 1840), (660, 1720)]
    seg = SR // 4
    t = np.arange(seg) / SR
    syllables = []
    for i in range(int(seconds * 4)):
        f0 = 120 + 20 * math.sin(i)
        f1, f2 = formants[rng.integers(len(formants))]
        harmonics = [
            (math.exp(-(((h * f0 - f1) / 150) ** 2)) + 0.5 * math.exp(-(((h * f0 - f2) / 200) ** 2)))
            * np.sin(2 * np.pi * h * f0 * t)
            for h in range(1, 30)
        ]
        syllables.append(np.sum(harmonics, axis=0) * np.sin(np.pi * np.arange(seg) / seg))
    wave = np.concatenate(syllables)
    return (0.3 * wave / np.abs(wave).max()).astype(np.float32)


@pytest.fixture(scope="module")
def clips() -> list[np.ndarray]:
    return [chirp(2.5, 200, 300), vowels(3.0, 0), chirp(1.7, 500, -100)]


def features(whisper, waves):
    return whisper.features(waves, sampling_rate=SR, return_tensors="pt").input_features


def test_no_reduction_reproduces_transformers_generate(whisper, clips):
    with torch.inference_mode():
        reference = whisper.model.generate(features(whisper, clips)).tolist()
    rows = []  # rows in the decoder's batch at each step
    hook = whisper.model.model.decoder.layer_norm.register_forward_hook(
        lambda _m, _i, out: rows.append(out.shape[0])
    )
    outputs = whisper.run(clips, ASR, NO_REDUCTION)
    hook.remove()
    texts = [whisper.tokenizer.decode([t for t in row if t < 50256]).strip() for row in reference]
    assert [o.text for o in outputs] == texts
    lengths = [o.stats.generated_tokens for o in outputs]
    assert len(set(lengths)) > 1  # windows finish at different steps ...
    # ... and leave at once; the first step feeds start-of-transcript, a row's own prompt token
    assert rows == [3] + [sum(n > step for n in lengths) for step in range(max(lengths))]
    assert [o.language for o in outputs] == ["en"] * 3  # English-only: what it hears is English
    assert whisper.run(clips[:1], TaskRequest("asr", language="English"), NO_REDUCTION)[0].text == texts[0]
    assert (
        whisper.description.tasks == {"asr"}
        and whisper.description.translate_to == ()
        and whisper.languages == {}
    )
    assert any(len(t) > 3 for t in texts)  # the clips make the model say something
    for out, row, wave in zip(outputs, reference, clips, strict=True):
        text_tokens = [t for t in row if t != 50256]
        assert out.stats.generated_tokens == len(text_tokens) + 1  # + end of text
        speech = math.ceil(len(wave) / 320)
        assert out.stats.audio_tokens_in == speech and out.stats.audio_tokens_kept == speech
        assert out.stats.kv_bytes_kept == out.stats.kv_bytes_full == 4 * 2 * 1500 * 384 * 4


def test_encoder_loop_matches_whisper_encoder(whisper, clips):
    feats = features(whisper, clips)
    with torch.inference_mode():
        reference = whisper.model.model.encoder(feats).last_hidden_state
    ours = encode(whisper.model.model.encoder, feats, [1500] * 3, NO_REDUCTION, [0.0] * 4)
    assert torch.equal(ours.states, reference)


@pytest.mark.parametrize(
    "cfg",
    [
        NO_REDUCTION,
        ReductionConfig(method="fastadasp", schedule="constant", first_layer=1, ratio=0.2),
        ReductionConfig(method="fastadasp", schedule="single", first_layer=3, ratio=0.3, **PADDING["merge"]),
    ],
)
def test_encoder_passes_of_two_windows_give_the_whole_batch_outputs(whisper, clips, cfg):
    ratios = encoder_ratios(cfg, 4)
    feats = features(whisper, clips)
    speech = [math.ceil(len(w) / 320) for w in clips]
    whole = encode(whisper.model.model.encoder, feats, speech, cfg, ratios)
    passes = encode(whisper.model.model.encoder, feats, speech, cfg, ratios, windows_per_pass=2)
    assert passes.speech == whole.speech and passes.layer_speech == whole.layer_speech
    assert torch.equal(passes.lengths, whole.lengths) and passes.states.shape == whole.states.shape
    assert (passes.key_bias is None) == (whole.key_bias is None)
    if whole.key_bias is not None:
        assert torch.equal(passes.key_bias, whole.key_bias)
    for b, n in enumerate(whole.lengths.tolist()):
        torch.testing.assert_close(passes.states[b, :n], whole.states[b, :n], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "cfg",
    [
        ReductionConfig(method="fastadasp", schedule="single", first_layer=3, target=0.5),
        ReductionConfig(method="a-tome", schedule="constant", first_layer=1, ratio=0.2),
        ReductionConfig(method="fastv", schedule="decay", first_layer=0, target=0.3),
        ReductionConfig(method="random-merge", schedule="single", first_layer=2, ratio=0.4, seed=3),
    ],
)
def test_reduction_shortens_speech_only(whisper, clips, cfg):
    ratios = encoder_ratios(cfg, 4)
    feats = features(whisper, clips)
    speech = [math.ceil(len(w) / 320) for w in clips]
    out = encode(whisper.model.model.encoder, feats, speech, cfg, ratios)
    for b, s in enumerate(speech):
        expected = [s]
        for r in ratios[:-1]:
            k = math.floor(r * expected[-1] + 1e-9)
            expected.append(expected[-1] - (min(k, expected[-1] // 2) if cfg.method == "a-tome" else k))
        assert out.layer_speech[b] == expected
        final = expected[-1] - math.floor(ratios[-1] * expected[-1] + 1e-9)
        assert out.speech[b] == final < s
        assert int(out.lengths[b]) == 1500 - (s - final)  # padding kept
    assert torch.isfinite(out.states).all()


def test_stats_and_text_under_merging(whisper, clips):
    cfg = ReductionConfig(method="fastadasp", schedule="single", first_layer=3, target=0.5)
    outputs = whisper.run(clips, ASR, cfg)
    for out, wave in zip(outputs, clips, strict=True):
        speech = math.ceil(len(wave) / 320)
        removed = math.floor(0.5 * speech + 1e-9)
        assert (
            out.stats.audio_tokens_in == speech and out.stats.audio_tokens_kept == speech
        )  # merge after layer 3
        assert out.stats.kv_bytes_kept == 4 * 2 * (1500 - removed) * 384 * 4
        assert out.stats.encode_s > 0 and out.stats.decode_s + out.stats.prefill_s > 0
        assert isinstance(out.text, str)


def test_window_stats_are_measured_per_window(whisper, clips):
    """Each window's times are its own: its encoder pass's share by positions, the steps it was in."""
    merged = ReductionConfig(method="none", padding="merge", padding_margin=10, padding_group=100)
    stats = [o.stats for o in whisper.run(clips, ASR, merged)]
    assert all(s.encode_s > 0 and s.prefill_s > 0 for s in stats)
    assert all((s.decode_s > 0) == (s.generated_tokens > 0) for s in stats)
    # clips 1 and 0 share an encoder pass (longest first, two a pass): shares follow their positions
    enc, _ = whisper._encode([clips[1], clips[0]], merged, [0.0] * 4)
    assert stats[1].encode_s / stats[0].encode_s == pytest.approx(enc.positions[0] / enc.positions[1])
    assert enc.positions[0] > enc.positions[1]


def test_apportion_shares_by_work():
    assert apportion(6.0, [1, 2, 3]) == [1.0, 2.0, 3.0]
    assert apportion(3.0, [0, 0, 0]) == [1.0, 1.0, 1.0]  # no work measured: equal shares


def test_random_methods_do_not_depend_on_the_batch(whisper, clips):
    cfg = ReductionConfig(method="random-evict", schedule="single", first_layer=1, ratio=0.3, seed=7)
    ratios = encoder_ratios(cfg, 4)
    speech = [math.ceil(len(w) / 320) for w in clips]
    together = encode(whisper.model.model.encoder, features(whisper, clips), speech, cfg, ratios)
    alone = encode(whisper.model.model.encoder, features(whisper, clips[1:2]), speech[1:2], cfg, ratios)
    n = int(alone.lengths[0])
    torch.testing.assert_close(together.states[1, :n], alone.states[0, :n], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("schedule,first", [("single", 3), ("constant", 1), ("decay", 0), ("decay", 3)])
def test_target_is_the_output_reduction(schedule, first):
    cfg = ReductionConfig(method="fastadasp", schedule=schedule, first_layer=first, target=0.4)
    assert output_reduction(encoder_ratios(cfg, 4), "fastadasp") == pytest.approx(0.4, abs=1e-8)
    assert encoder_ratios(replace(cfg, target=None, ratio=0.25), 4)[first] == 0.25


def test_caller_errors(whisper, clips):
    with pytest.raises(ValueError, match="no Whisper encoder form"):
        whisper.run(clips, ASR, ReductionConfig(method="h2o", target=0.3))
    with pytest.raises(ValueError, match="mass"):
        whisper.run(clips, ASR, ReductionConfig(method="fastadasp", target=0.3, mass="tail"))
    with pytest.raises(ValueError, match="first_layer"):
        whisper.run(clips, ASR, ReductionConfig(method="fastadasp", target=0.3, first_layer=4))
    with pytest.raises(ValueError, match=r"whisper-tiny\.en' cannot do task 'st' \(it does: asr\)$"):
        whisper.run(clips, TaskRequest("st", target_language="de"), NO_REDUCTION)
    with pytest.raises(ValueError, match="task 'lid'"):
        whisper.run(clips, TaskRequest("lid"), NO_REDUCTION)
    with pytest.raises(ValueError, match=r"whisper-tiny\.en' is English-only; --language 'de'"):
        whisper.run(clips, TaskRequest("asr", language="de"), NO_REDUCTION)
    with pytest.raises(ValueError, match="at most 30"):
        whisper.run([np.zeros(31 * SR, dtype=np.float32)], ASR, NO_REDUCTION)


def test_int8_quantizes_the_decoder_and_keeps_the_transcript_close(whisper):
    """Dynamic int8 on the decoder's linear layers and the output projection; the encoder stays float."""
    from pipeline.audio.decode import decode_audio
    from pipeline.metrics import wer
    from pipeline.models.base import INT8, ModelError

    int8 = load_packaged(TINY_EN, dtype=INT8)  # the user's conversion cache, which the job tests fill too
    quantized = [type(m).__module__ for m in int8.model.model.decoder.modules()]
    assert any("quantized" in q for q in quantized) and "quantized" in type(int8.model.proj_out).__module__
    assert int8.model.model.encoder.layers[0].self_attn.k_proj.weight.dtype == torch.float32
    speech = [decode_audio(EXAMPLES / "intro.wav").samples]
    float_texts = [o.text for o in whisper.run(speech, ASR, NO_REDUCTION)]
    int8_texts = [o.text for o in int8.run(speech, ASR, NO_REDUCTION)]
    assert wer(float_texts, int8_texts) < 0.2, (float_texts, int8_texts)
    with pytest.raises(ModelError, match="CPU only"):
        load_packaged(TINY_EN, device="cuda", dtype=INT8)
