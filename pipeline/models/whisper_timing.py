"""Word times for Whisper windows, from the alignment heads' attention over the tokens greedy decoding
decided.

Greedy decoding feeds every token it decides, so the steps compute the alignment heads' cross-attention
queries that a teacher-forced pass over the window's prompt and tokens would (causal attention: a
position's states depend on the tokens before it only); the runner records them
(``WhisperRunner.head_weights``) and the weights come from them and the keys the window's slot still
holds as it finishes, with no second decoder pass. When the encoder's last layer merged speech tokens,
the heads' weights are over the keys of that output without the last merge (``EncoderOutput.timing``:
each merged token its own residual stream with its group's MLP update; only the heads' keys projected,
``whisper_runner.head_keys``), queried as the decoder read the merged output, so the tokens the decoder
read merged are timed apart. A position merged in an earlier layer stands for several 20 ms frames
(``EncoderOutput.origins``): its weight is repeated over each of them, so the time warping
(``pipeline.timing``) runs over the window's speech frames as if nothing had been merged. Word
probabilities are the greedy steps' token probabilities.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from torch import Tensor

from pipeline.stitch import word_spans
from pipeline.timing import Word, group_words, token_start_frames

if TYPE_CHECKING:
    from transformers import WhisperTokenizerFast


def window_words(
    tokenizer: WhisperTokenizerFast,
    tokens: list[int],
    logprobs: list[float],
    weights: Tensor,
    prompt: list[int],
    eos: int,
    origins: Tensor,
    speech_frames: int,
) -> list[Word]:
    """One window's words, in seconds from the window's start.

    tokens, logprobs: what greedy decoding generated and their log-probabilities; weights (heads, fed,
    S): the alignment heads' weights at each position the window fed (``WhisperRunner.head_weights``):
    its prompt as it was decoded (its language included), then its tokens; origins (P,):
    ``EncoderOutput.origins`` of the window; speech_frames: its speech positions at the encoder's input
    (the frames words can fall in). A window stopped by the length budget never fed its last token: its
    text ends at its last speech frame.
    """
    text_tokens = [t for t in tokens if t < eos]
    if not text_tokens:
        return []
    probs = [p for t, p in zip(tokens, logprobs, strict=True) if t < eos]
    n = len(text_tokens)
    weights = weights[:, : len(prompt) + n].cpu()  # a loop cut's tokens were fed, and are not text
    frames = weights[..., origins[:speech_frames]]
    starts = token_start_frames(frames, slice(len(prompt) - 1, len(prompt) + n))
    if len(starts) == n:
        starts = np.append(starts, speech_frames)
    raw = tokenizer.batch_decode([text_tokens[:k] for k in range(n + 1)])
    lead = len(raw[-1]) - len(raw[-1].lstrip())
    text = raw[-1].strip()
    offsets = [min(max(len(r) - lead, 0), len(text)) for r in raw]
    return group_words(word_spans(text), offsets, starts, probs)
