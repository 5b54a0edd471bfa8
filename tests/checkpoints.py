"""Tiny random-weight checkpoint folders of the decoder-only families, saved the way real ones are
(model + processor), so that the tests load them through the registry like real weights."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    GlmAsrConfig,
    GlmAsrForConditionalGeneration,
    GlmAsrProcessor,
    WhisperFeatureExtractor,
)

from pipeline.models.glm_asr import AUDIO_TOKEN as GLM_AUDIO_TOKEN
from pipeline.models.glm_asr import MERGE_FACTOR
from pipeline.models.tiny_random import build_tiny_random, byte_level_tokenizer, tiny_text_config

# The chat template Qwen2-Audio-7B-Instruct ships (its processor's), for the tiny instruct checkpoint.
QWEN_INSTRUCT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant."
    "<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if 'audio' in content or 'audio_url' in content %}{% set audio_count.value = audio_count.value + 1 %}"
    "Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GLM_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "[gMASK]",
    "<sop>",
    "<|user|>",
    "<|assistant|>",
    "<|begin_of_audio|>",
    GLM_AUDIO_TOKEN,
    "<|end_of_audio|>",
)
# A GLM-4 style chat template with the audio item framed as GLM-ASR frames it.
GLM_TEMPLATE = (
    "[gMASK]<sop>{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'audio' %}"
    "<|begin_of_audio|><|pad|><|end_of_audio|>\n{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def save_qwen2_audio(folder: Path, kind: str = "base", seed: int = 0) -> Path:
    """The packaged tiny Qwen2-Audio as a checkpoint folder; ``instruct`` ships the Instruct chat template."""
    speech_model = build_tiny_random(seed)
    speech_model.processor.chat_template = QWEN_INSTRUCT_TEMPLATE if kind == "instruct" else None
    speech_model.model.save_pretrained(folder)
    speech_model.processor.save_pretrained(folder)
    return folder


def save_glm_asr(folder: Path, seed: int = 0, num_layers: int = 4) -> Path:
    """A random-weight GLM-ASR checkpoint (model + processor with its chat template)."""
    tokenizer = byte_level_tokenizer(GLM_SPECIAL_TOKENS, eos="<|endoftext|>")
    processor = GlmAsrProcessor(
        WhisperFeatureExtractor(feature_size=128), tokenizer, chat_template=GLM_TEMPLATE
    )
    ids = tokenizer.convert_tokens_to_ids
    config = GlmAsrConfig(
        audio_config={
            "hidden_size": 32,
            "intermediate_size": 32 * MERGE_FACTOR,  # stacked frames feed the projector
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_mel_bins": 128,
        },
        text_config=tiny_text_config(len(tokenizer), num_layers)
        | {"eos_token_id": [ids("<|endoftext|>"), ids("<|user|>")], "pad_token_id": ids("<|endoftext|>")},
        audio_token_id=ids(GLM_AUDIO_TOKEN),
    )
    torch.manual_seed(seed)
    GlmAsrForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
