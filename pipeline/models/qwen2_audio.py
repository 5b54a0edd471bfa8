"""Qwen2-Audio family: Whisper-style audio encoder -> projector -> ``<|AUDIO|>`` placeholders -> Qwen2.

Checkpoints: ``Qwen/Qwen2-Audio-7B`` (base: the plain evaluation prompts below) and
``Qwen/Qwen2-Audio-7B-Instruct`` (instruct: its chat template), from the hub, a local folder or the
offline cache (``pipeline.models.registry``). ``tiny-random-qwen2-audio`` builds a random-weight model
of the real class with a byte-level tokenizer, offline, for tests and plumbing; ``save_tiny_random``
writes one as a checkpoint folder (model + processor, either kind), loaded like real weights.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from transformers import (
    Qwen2AudioConfig,
    Qwen2AudioForConditionalGeneration,
    Qwen2AudioProcessor,
    WhisperFeatureExtractor,
)

from pipeline.models.base import Checkpoint, ModelDescription
from pipeline.models.speechlm import (
    SAMPLE_RATE,
    WINDOW_S,
    AudioLanguageModel,
    byte_level_tokenizer,
    kind_of,
    tiny_text_config,
)
from pipeline.tasks import TaskRequest, language_code, language_name, question, target_language

MODEL_TYPES = ("qwen2_audio",)
TINY_RANDOM = "tiny-random-qwen2-audio"
AUDIO_TOKEN = "<|AUDIO|>"
AUDIO_PROMPT = f"<|audio_bos|>{AUDIO_TOKEN}<|audio_eos|>"
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|audio_bos|>",
    AUDIO_TOKEN,
    "<|audio_eos|>",
)
TASKS = frozenset({"asr", "st", "er", "sqa"})
# The chat template Qwen2-Audio-7B-Instruct ships (its processor's), for the tiny instruct checkpoint.
INSTRUCT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant."
    "<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if 'audio' in content or 'audio_url' in content %}{% set audio_count.value = audio_count.value + 1 %}"
    "Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class Qwen2AudioSpeechModel(AudioLanguageModel):
    audio_token = AUDIO_TOKEN
    model_class = Qwen2AudioForConditionalGeneration

    def stop_token_ids(self) -> list[int]:
        return sorted({self.tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>")})

    def plain_prompt(self, request: TaskRequest) -> str:
        """Qwen2-Audio's evaluation prompts (the base model's format)."""
        if request.task == "asr":
            code = language_code(request.language or "en")
            return f"{AUDIO_PROMPT}Detect the language and recognize the speech: <|{code}|>"
        if request.task == "st":
            return f"{AUDIO_PROMPT}Translate the speech into {language_name(target_language(request))}:"
        if request.task == "er":
            return f"{AUDIO_PROMPT}Recognize the emotion with keywords in English:"
        return f"{AUDIO_PROMPT}{question(request)}"

    def audio_token_counts(self, waveforms: list[np.ndarray]) -> list[int]:
        """The audio tower's length arithmetic over the frames ``features`` marks valid."""
        _, counts = self.model.model.audio_tower._get_feat_extract_output_lengths(self.frames(waveforms))
        return counts.tolist()

    @torch.inference_mode()
    def encode(self, features: Tensor, frame_mask: Tensor) -> list[Tensor]:
        device, dtype = self.stack.device, self.stack.dtype
        tower = self.model.model.audio_tower
        conv_lengths, counts = tower._get_feat_extract_output_lengths(frame_mask.sum(-1))
        positions = torch.arange(features.shape[-1] // 2)
        valid = positions[None, :] < conv_lengths[:, None]  # [N, T] after the stride-2 convolution
        bias = torch.zeros(valid.shape[0], 1, valid.shape[1], valid.shape[1], dtype=dtype)
        bias.masked_fill_(~valid[:, None, None, :], torch.finfo(dtype).min)
        hidden = tower(features.to(device, dtype), attention_mask=bias.to(device)).last_hidden_state
        projected = self.model.model.multi_modal_projector(hidden)
        return [projected[i, :n] for i, n in enumerate(counts.tolist())]


def describe(ckpt: Checkpoint, config: dict) -> ModelDescription:
    if ckpt.packaged:  # the tiny random model: its config is built in code (vocabulary size aside)
        config = tiny_random_config(vocab_size=1, audio_token_id=0).to_dict()
    text = config.get("text_config") or {}
    return ModelDescription(
        name=ckpt.name,
        family=__name__.rsplit(".", 1)[-1],
        kind=kind_of(ckpt),
        tasks=TASKS,
        sample_rate=SAMPLE_RATE,
        max_window_s=WINDOW_S,
        reducing_layers=int(text.get("num_hidden_layers", Qwen2AudioConfig().text_config.num_hidden_layers)),
    )


def load(ckpt: Checkpoint, device: str = "cpu", dtype: torch.dtype | None = None) -> Qwen2AudioSpeechModel:
    if ckpt.name == TINY_RANDOM and ckpt.folder is None:
        return build_tiny_random().to(device, dtype)
    return Qwen2AudioSpeechModel.from_checkpoint(ckpt, describe, device, dtype)


# --- the tiny random model -------------------------------------------------------------------------
def tiny_random_config(vocab_size: int, audio_token_id: int, num_layers: int = 4) -> Qwen2AudioConfig:
    return Qwen2AudioConfig(
        audio_config={
            "d_model": 32,
            "encoder_layers": 2,
            "encoder_attention_heads": 2,
            "encoder_ffn_dim": 64,
            "num_mel_bins": 128,
            "max_source_positions": 1500,
        },
        text_config=tiny_text_config(vocab_size, num_layers),
        audio_token_index=audio_token_id,
    )


def tiny_random_processor(kind: str = "base") -> Qwen2AudioProcessor:
    tokenizer = byte_level_tokenizer(SPECIAL_TOKENS, eos="<|endoftext|>")
    processor = Qwen2AudioProcessor(WhisperFeatureExtractor(feature_size=128), tokenizer)
    processor.chat_template = INSTRUCT_TEMPLATE if kind == "instruct" else None  # base: ships no template
    return processor


def build_tiny_random(seed: int = 0, num_layers: int = 4, kind: str = "base") -> Qwen2AudioSpeechModel:
    """A random-weight Qwen2-Audio of the real class (fp32, CPU), deterministic for a seed."""
    processor = tiny_random_processor(kind)
    tokenizer = processor.tokenizer
    torch.manual_seed(seed)
    cfg = tiny_random_config(len(tokenizer), tokenizer.convert_tokens_to_ids(AUDIO_TOKEN), num_layers)
    cfg._attn_implementation = "sdpa"
    model = Qwen2AudioForConditionalGeneration(cfg).eval()
    description = replace(describe(Checkpoint(TINY_RANDOM, MODEL_TYPES[0]), cfg.to_dict()), kind=kind)
    return Qwen2AudioSpeechModel(model, processor, description)


def save_tiny_random(folder: Path, kind: str = "base", seed: int = 0) -> Path:
    """Write a tiny random checkpoint (model + processor) the way real ones are saved."""
    speech_model = build_tiny_random(seed, kind=kind)
    speech_model.model.save_pretrained(folder)
    speech_model.processor.save_pretrained(folder)
    return folder
