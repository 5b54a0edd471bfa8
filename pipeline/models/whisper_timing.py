"""Word times for Whisper windows: a pass of its own over the tokens greedy decoding decided.

One teacher-forced decoder pass per window (``whisper_runner.alignment_weights``) over its prompt and
text tokens as the window finishes decoding, reading the cross K/V its slot holds, gives the alignment
heads' attention over the encoder output. When the encoder's last layer merged speech tokens, the heads'
weights are over the keys of that output without the last merge (``EncoderOutput.timing``: each merged
token its own residual stream with its group's MLP update; only the heads' keys projected,
``whisper_runner.head_keys``), queried from the pass over what the decoder read, so the tokens the
decoder read merged are timed apart. A position merged in an earlier layer stands for several 20 ms
frames (``EncoderOutput.origins``): its weight is repeated over each of them, so the time warping
(``pipeline.timing``) runs over the window's speech frames as if nothing had been merged. Word
probabilities are the greedy pass's token probabilities.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from pipeline.models.whisper_runner import CrossKV, alignment_weights
from pipeline.stitch import word_spans
from pipeline.timing import Word, group_words, token_start_frames

if TYPE_CHECKING:
    from transformers import WhisperForConditionalGeneration, WhisperTokenizerFast


def window_words(
    model: WhisperForConditionalGeneration,
    tokenizer: WhisperTokenizerFast,
    tokens: list[int],
    logprobs: list[float],
    cross: CrossKV,
    timing: tuple[dict[tuple[int, int], Tensor], Tensor | None] | None,
    prompt: list[int],
    eos: int,
    origins: Tensor,
    speech_frames: int,
    heads: list[tuple[int, int]],
) -> list[Word]:
    """One window's words, in seconds from the window's start.

    tokens, logprobs: what greedy decoding generated and their log-probabilities; cross: the row's
    cross K/V as the decoder read them (batch of one); timing: ``head_keys`` of ``EncoderOutput.timing``
    when the encoder's last layer merged (the heads' weights over those keys), else None; prompt: the window's prompt as it was decoded (its language included);
    origins (P,): ``EncoderOutput.origins`` of the window; speech_frames: its speech positions at the
    encoder's input (the frames words can fall in).
    """
    text_tokens = [t for t in tokens if t < eos]
    if not text_tokens:
        return []
    probs = [p for t, p in zip(tokens, logprobs, strict=True) if t < eos]
    ids = torch.tensor([prompt + text_tokens], device=cross.keys[0].device)
    weights = alignment_weights(model, cross, ids, heads, timing)[0].cpu()
    n = len(text_tokens)
    frames = weights[..., origins[:speech_frames]]
    starts = token_start_frames(frames, slice(len(prompt) - 1, len(prompt) + n))
    raw = tokenizer.batch_decode([text_tokens[:k] for k in range(n + 1)])
    lead = len(raw[-1]) - len(raw[-1].lstrip())
    text = raw[-1].strip()
    offsets = [min(max(len(r) - lead, 0), len(text)) for r in raw]
    return group_words(word_spans(text), offsets, starts, probs)
