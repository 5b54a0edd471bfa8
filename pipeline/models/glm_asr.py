"""GLM-ASR family (``zai-org/GLM-ASR-Nano-2512``): Whisper-style audio encoder -> frames stacked by 4 ->
MLP projector -> ``<|pad|>`` placeholders -> a Llama decoder, prompted through its chat template.

Why this family as the second one: its decoder is transformers' ``LlamaModel`` (RMSNorm, rotary,
gated SiLU MLP, grouped KV, no q/k/v bias), which our ``DecoderStack`` already runs unchanged, and its
processor is a plain tokenizer + Whisper feature extractor + chat template. Voxtral's decoder is Llama
too, but its tokenizer needs ``mistral-common``; Granite-Speech's Granite decoder scales embeddings,
residuals, attention and logits by multipliers the engine does not apply.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from transformers import GlmAsrConfig, GlmAsrForConditionalGeneration

from pipeline.models.base import SAMPLE_RATE, WINDOW_S, Checkpoint, ModelDescription, ModelError
from pipeline.models.speechlm import AudioLanguageModel, chat_template
from pipeline.tasks import TaskRequest

MODEL_TYPES = ("glmasr",)
AUDIO_TOKEN = "<|pad|>"
TRANSCRIBE = "Please transcribe this audio into text"  # the processor's default transcription request
MERGE_FACTOR = 4  # encoder frames stacked into one audio embedding


class GlmAsrSpeechModel(AudioLanguageModel):
    audio_token = AUDIO_TOKEN
    model_class = GlmAsrForConditionalGeneration

    def instruction(self, request: TaskRequest) -> str:
        return TRANSCRIBE

    def audio_token_counts(self, waveforms: list[np.ndarray]) -> list[int]:
        return _embeddings(self.frames(waveforms))

    @torch.inference_mode()
    def encode(self, features: Tensor, frame_mask: Tensor) -> list[Tensor]:
        device, dtype = self.stack.device, self.stack.dtype
        out = self.model.model.get_audio_features(features.to(device, dtype), frame_mask.to(device))
        return list(out.pooler_output.split(_embeddings(frame_mask.sum(-1))))


def _embeddings(frames: Tensor) -> list[int]:
    """Valid frames -> conv (stride 1, then 2) -> stacks of MERGE_FACTOR, as the processor counts them."""
    after_conv = (frames - 1) // 2 + 1
    return ((after_conv - MERGE_FACTOR) // MERGE_FACTOR + 1).tolist()


def describe(ckpt: Checkpoint, config: dict) -> ModelDescription:
    if chat_template(ckpt.folder) is None:
        raise ModelError(f"{ckpt.name}: a GLM-ASR checkpoint ships a chat template; this one has none")
    text = config.get("text_config") or {}
    return ModelDescription(
        name=ckpt.name,
        family=__name__.rsplit(".", 1)[-1],
        kind="instruct",
        tasks=frozenset({"asr"}),
        sample_rate=SAMPLE_RATE,
        max_window_s=WINDOW_S,
        reducing_layers=int(text.get("num_hidden_layers", GlmAsrConfig().text_config.num_hidden_layers)),
        multilingual=True,  # Mandarin, Cantonese and English, told apart by the model itself
    )


def load(ckpt: Checkpoint, device: str = "cpu", dtype: torch.dtype | None = None) -> GlmAsrSpeechModel:
    return GlmAsrSpeechModel.from_checkpoint(ckpt, describe, device, dtype)
