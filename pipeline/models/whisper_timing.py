"""Word times for Whisper windows: a pass of its own over the tokens greedy decoding decided.

One teacher-forced decoder pass per batch (``whisper_decoding.alignment_weights``) over each window's
prompt and text tokens, reading the cross K/V the greedy pass projected, gives the alignment heads'
attention over the encoder output. When the encoder's last layer merged speech tokens, the pass reads
that output without the last merge (``EncoderOutput.timing``: the MLP run on every token once more),
so the tokens the decoder read merged are timed apart. A position merged in an earlier layer stands for
several 20 ms frames (``EncoderOutput.origins``): its weight is repeated over each of them, so the time
warping (``pipeline.timing``) runs over the window's speech frames as if nothing had been merged. Word
probabilities are the greedy pass's token probabilities.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from pipeline.models.whisper_decoding import CrossKV, DecodeResult, alignment_weights
from pipeline.stitch import word_spans
from pipeline.timing import Word, group_words, token_start_frames

if TYPE_CHECKING:
    from transformers import WhisperForConditionalGeneration, WhisperTokenizerFast


def window_words(
    model: WhisperForConditionalGeneration,
    tokenizer: WhisperTokenizerFast,
    decoded: DecodeResult,
    cross: CrossKV,
    prompts: list[list[int]],
    eos: int,
    origins: Tensor,
    speech_frames: list[int],
    heads: list[tuple[int, int]],
) -> list[list[Word]]:
    """Each window's words, in seconds from the window's start.

    decoded: ``greedy_decode(..., keep_for_timing=True)``'s result; cross: the encoder outputs the
    alignment heads read (``decoded.cross``, or ``cross_kv`` of ``EncoderOutput.timing``); prompts: each window's prompt as it
    was decoded (its language included); origins (B, P): ``EncoderOutput.origins``; speech_frames: the
    window's speech positions at the encoder's input (the frames words can fall in).
    """
    texts = [[t for t in row if t < eos] for row in decoded.tokens]
    logprobs = [
        [p for t, p in zip(row, probs, strict=True) if t < eos]
        for row, probs in zip(decoded.tokens, decoded.logprobs, strict=True)
    ]
    words: list[list[Word]] = [[] for _ in texts]
    if not any(texts):
        return words
    rows = [prompt + text for prompt, text in zip(prompts, texts, strict=True)]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [eos] * (width - len(r)) for r in rows], device=cross.keys[0].device)
    weights = alignment_weights(model, cross, ids, heads).cpu()
    for b, text_tokens in enumerate(texts):
        if not text_tokens:
            continue
        prompt, n = len(prompts[b]), len(text_tokens)
        frames = weights[b, :, : prompt + n][..., origins[b, : speech_frames[b]]]
        starts = token_start_frames(frames, slice(prompt - 1, prompt + n))
        raw = tokenizer.batch_decode([text_tokens[:k] for k in range(n + 1)])
        lead = len(raw[-1]) - len(raw[-1].lstrip())
        text = raw[-1].strip()
        offsets = [min(max(len(r) - lead, 0), len(text)) for r in raw]
        words[b] = group_words(word_spans(text), offsets, starts, logprobs[b])
    return words
