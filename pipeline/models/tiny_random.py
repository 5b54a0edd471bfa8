"""``tiny-random-qwen2-audio``: the packaged random-weight Qwen2-Audio of the real class, built in code
(no download, no weights on disk) with a real byte-level tokenizer, for plumbing runs offline.

The tests save the same model as checkpoint folders (tests/checkpoints.py), so that the tiny decoder
below is also what the other families' test checkpoints use.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2AudioConfig,
    Qwen2AudioForConditionalGeneration,
    Qwen2AudioProcessor,
    WhisperFeatureExtractor,
)

from pipeline.models.base import Checkpoint
from pipeline.models.qwen2_audio import AUDIO_TOKEN, MODEL_TYPES, Qwen2AudioSpeechModel, describe

NAME = "tiny-random-qwen2-audio"
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|audio_bos|>",
    AUDIO_TOKEN,
    "<|audio_eos|>",
)


def byte_level_tokenizer(special_tokens: tuple[str, ...], eos: str) -> PreTrainedTokenizerFast:
    """A real byte-level BPE tokenizer with no merges: 256 byte symbols + a family's special tokens."""
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for token in special_tokens:
        vocab[token] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(special_tokens))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=eos)


def tiny_text_config(vocab_size: int, num_layers: int) -> dict:
    """A tiny llama-family decoder: grouped KV (4 query heads on 2), head size 16 (what the Triton
    kernels take), a SiLU MLP."""
    return {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
    }


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


def build_tiny_random(seed: int = 0, num_layers: int = 4) -> Qwen2AudioSpeechModel:
    """A random-weight Qwen2-Audio of the real class (fp32, CPU, a base checkpoint: no chat template),
    deterministic for a seed."""
    tokenizer = byte_level_tokenizer(SPECIAL_TOKENS, eos="<|endoftext|>")
    processor = Qwen2AudioProcessor(WhisperFeatureExtractor(feature_size=128), tokenizer)
    processor.chat_template = None  # a base checkpoint ships none
    torch.manual_seed(seed)
    cfg = tiny_random_config(len(tokenizer), tokenizer.convert_tokens_to_ids(AUDIO_TOKEN), num_layers)
    cfg._attn_implementation = "sdpa"
    model = Qwen2AudioForConditionalGeneration(cfg).eval()
    return Qwen2AudioSpeechModel(model, processor, describe(Checkpoint(NAME, MODEL_TYPES[0]), cfg.to_dict()))
