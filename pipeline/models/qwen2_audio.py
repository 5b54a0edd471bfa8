"""Qwen2-Audio family: Whisper-style audio encoder -> projector -> ``<|AUDIO|>`` placeholders -> Qwen2.

Checkpoints: ``Qwen/Qwen2-Audio-7B`` (base: the plain evaluation prompts below) and
``Qwen/Qwen2-Audio-7B-Instruct`` (instruct: its chat template), from the hub, a local folder or the
offline cache (``pipeline.models.registry``); the packaged ``tiny-random-qwen2-audio`` is built in code
(``pipeline.models.tiny_random``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor
from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

from pipeline.models.base import SAMPLE_RATE, WINDOW_S, Checkpoint, ModelDescription
from pipeline.models.speechlm import AudioLanguageModel, kind_of
from pipeline.tasks import TaskRequest, language_code, language_name, question, target_language

MODEL_TYPES = ("qwen2_audio",)
AUDIO_TOKEN = "<|AUDIO|>"
AUDIO_PROMPT = f"<|audio_bos|>{AUDIO_TOKEN}<|audio_eos|>"
# task -> its plain prompt: Qwen2-Audio's evaluation prompts (the base model's format). The family does
# these tasks; an instruct checkpoint is asked each task's instruction (pipeline.tasks.TASKS).
PLAIN_PROMPTS: dict[str, Callable[[TaskRequest], str]] = {
    "asr": lambda r: (
        f"{AUDIO_PROMPT}Detect the language and recognize the speech: <|{language_code(r.language or 'en')}|>"
    ),
    "st": lambda r: f"{AUDIO_PROMPT}Translate the speech into {language_name(target_language(r))}:",
    "er": lambda r: f"{AUDIO_PROMPT}Recognize the emotion with keywords in English:",
    "sqa": lambda r: f"{AUDIO_PROMPT}{question(r)}",
}


class Qwen2AudioSpeechModel(AudioLanguageModel):
    audio_token = AUDIO_TOKEN
    model_class = Qwen2AudioForConditionalGeneration

    def stop_token_ids(self) -> list[int]:
        return sorted({self.tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>")})

    def plain_prompt(self, request: TaskRequest) -> str:
        return PLAIN_PROMPTS[request.task](request)

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
        from pipeline.models.tiny_random import tiny_random_config  # it builds on this module

        config = tiny_random_config(vocab_size=1, audio_token_id=0).to_dict()
    text = config.get("text_config") or {}
    return ModelDescription(
        name=ckpt.name,
        family=__name__.rsplit(".", 1)[-1],
        kind=kind_of(ckpt),
        tasks=frozenset(PLAIN_PROMPTS),
        sample_rate=SAMPLE_RATE,
        max_window_s=WINDOW_S,
        reducing_layers=int(text.get("num_hidden_layers", Qwen2AudioConfig().text_config.num_hidden_layers)),
        multilingual=True,  # its asr prompt names the spoken language; st into any the prompt can name
    )


def load(ckpt: Checkpoint, device: str = "cpu", dtype: torch.dtype | None = None) -> Qwen2AudioSpeechModel:
    if ckpt.packaged:
        from pipeline.models.tiny_random import build_tiny_random  # it builds on this module

        return build_tiny_random().to(device, dtype)
    return Qwen2AudioSpeechModel.from_checkpoint(ckpt, describe, device, dtype)
