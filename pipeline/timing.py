"""Word and sentence times from a decoder's cross-attention, model-agnostic.

The idea of openai/whisper's ``timing.py`` (written anew here): the cross-attention weights of a few
"alignment heads" over the audio frames, z-normalised per frame over the tokens, median-filtered along
time and averaged over the heads, give a (tokens x frames) similarity; the cheapest monotone path
through its negation (dynamic time warping) says at which frame each token begins. A word spans its
tokens, from its first token's start to the next token's start.

Frames are 20 ms (Whisper's encoder positions). Times here are relative to the audio the frames cover;
callers add the window's start.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

FRAME_S = 0.02
MEDIAN_WIDTH = 7
# A word longer than this many times the window's median word (at most MAX_WORD_S) at a sentence's or
# pause's edge has absorbed the silence beside it (DTW cannot tell a pause from a slow word): clipped.
LONG_WORD_FACTOR = 2.0
MAX_WORD_S = 1.4
# Sentence segments: a sentence ends at end punctuation or where speech pauses this long.
PAUSE_S = 0.6
_SENTENCE_END = re.compile(r"[.!?。！？]['\")\]]*$")


@dataclass(frozen=True)
class Word:
    """One word in seconds; probability: the mean probability of its tokens when decoded."""

    word: str
    start_s: float
    end_s: float
    probability: float

    def shifted(self, offset_s: float) -> Word:
        return Word(self.word, self.start_s + offset_s, self.end_s + offset_s, self.probability)

    def to_dict(self) -> dict:
        return asdict(self)


# The median of 7 shifted copies by elementwise min/max, several times faster than
# ``unfold().median()``, which dominated the alignment pass (benchmarks/word-times-cost-idle): a sorting
# network of 7 inputs (16 compare-exchanges; it sorts every 0-1 input, so every input) pruned to what
# its middle output reads: 8 compare-exchanges, then 6 that keep only the min ("<") or the max (">").
_MEDIAN_7 = (
    ("<>", 0, 6), ("<>", 2, 3), ("<>", 4, 5), ("<>", 0, 2), ("<>", 1, 4), ("<>", 3, 6), (">", 0, 1),
    ("<>", 2, 5), ("<>", 3, 4), (">", 1, 2), ("<", 4, 6), (">", 2, 3), ("<", 4, 5), ("<", 3, 4),
)  # fmt: skip


# Rows the network runs on at once: 256 KB of float32 each pass, so its 30 passes over them stay in
# the CPU's cache (5x faster than the whole alignment matrix at once on a 30 s window).
_MEDIAN_BLOCK = 1 << 16


def median_filter(x: Tensor) -> Tensor:
    """Median over a sliding window of MEDIAN_WIDTH (7) along the last dimension, reflected at the edges."""
    n, pad = x.shape[-1], MEDIAN_WIDTH // 2
    if n <= pad:  # too short to reflect: nothing to smooth
        return x
    padded = F.pad(x.reshape(-1, 1, n), (pad, pad), mode="reflect")[:, 0]
    out = torch.empty_like(padded[:, :n])
    block = max(1, _MEDIAN_BLOCK // n)
    for first in range(0, len(padded), block):
        v = [padded[first : first + block, i : i + n] for i in range(MEDIAN_WIDTH)]
        for keep, i, j in _MEDIAN_7:
            low = torch.minimum(v[i], v[j]) if "<" in keep else None
            if ">" in keep:
                v[j] = torch.maximum(v[i], v[j])
            if low is not None:
                v[i] = low
        out[first : first + block] = v[pad]
    return out.reshape(x.shape)


def dtw_starts(cost: np.ndarray) -> np.ndarray:
    """cost (R, F) -> (R,) the first column of each row on the cheapest path from (0, 0) to (R-1, F-1)
    moving right, down or diagonally down-right.

    Row by row: with a[j] the best of the cells above and above-left, row i's accumulated cost is
    acc[j] = c[j] + min(a[j], acc[j-1]) = P[j] + min over k <= j of (a[k] - P[k-1]) (P: the row's
    prefix sums), a running minimum, so each row is a few vector operations.
    """
    rows, cols = cost.shape
    acc = np.cumsum(cost[0])
    from_above = np.zeros((rows, cols), dtype=bool)
    diagonal = np.zeros((rows, cols), dtype=bool)
    for i in range(1, rows):
        above_left = np.concatenate(([np.inf], acc[:-1]))
        diagonal[i] = above_left < acc
        prefix = np.cumsum(cost[i])
        entry = np.where(diagonal[i], above_left, acc) - (prefix - cost[i])
        best = np.minimum.accumulate(entry)
        from_above[i] = entry <= best
        acc = prefix + best
    starts = np.zeros(rows, dtype=np.int64)
    i, j = rows - 1, cols - 1
    while i > 0:
        if from_above[i, j]:
            starts[i] = j
            j -= int(diagonal[i, j])
            i -= 1
        else:
            j -= 1
    return starts


def token_start_frames(weights: Tensor, rows: slice) -> np.ndarray:
    """weights (heads, T, frames): alignment heads' attention of all T decoder inputs over the speech
    frames -> the start frame of each row in ``rows`` (the rows that predict the text tokens and the
    end of text)."""
    # two passes rather than torch.std_mean, which is 10x slower along this middle dimension on CPU
    mean = weights.mean(dim=-2, keepdim=True)
    std = (weights - mean).square().mean(dim=-2, keepdim=True).sqrt()
    normed = median_filter((weights[:, rows] - mean) / std.clamp_min(1e-6))  # row by row: only those
    matrix = normed.mean(dim=0)
    return dtw_starts(-matrix.double().cpu().numpy())


def group_words(
    spans: list[tuple[str, int, int]], offsets: list[int], starts: np.ndarray, logprobs: list[float]
) -> list[Word]:
    """Words with times from their tokens.

    spans: each word and its characters [begin, end) in the text; offsets: N + 1 character offsets of
    the N tokens' boundaries in that text; starts: N + 1 start frames (the tokens', then the end of
    text's); logprobs: the N tokens' log-probabilities. A word's tokens are those overlapping its
    characters; it ends where the token after them starts.
    """
    probs = np.exp(np.asarray(logprobs, dtype=np.float64))
    bounds = np.asarray(offsets)
    out = []
    for word, begin, end in spans:
        first = int(np.searchsorted(bounds, begin, side="right")) - 1
        last = max(first + 1, int(np.searchsorted(bounds, end, side="left")))
        out.append(
            Word(
                word,
                float(starts[first]) * FRAME_S,
                float(starts[last]) * FRAME_S,
                float(probs[first:last].mean()),
            )
        )
    return clip_long_words(out)


def clip_long_words(words: list[Word]) -> list[Word]:
    """Words at a sentence's or pause's edge that last over ``LONG_WORD_FACTOR`` median words (at most
    ``MAX_WORD_S``) are cut to that: the first word of a window or after a sentence end keeps its end,
    the last word or a sentence's last keeps its start."""
    durations = [w.end_s - w.start_s for w in words if w.end_s > w.start_s]
    if not durations:
        return words
    longest = min(MAX_WORD_S, LONG_WORD_FACTOR * statistics.median(durations))
    out = []
    for i, w in enumerate(words):
        if w.end_s - w.start_s > longest:
            if i == 0 or _SENTENCE_END.search(words[i - 1].word):
                w = Word(w.word, w.end_s - longest, w.end_s, w.probability)
            elif i == len(words) - 1 or _SENTENCE_END.search(w.word):
                w = Word(w.word, w.start_s, w.start_s + longest, w.probability)
        out.append(w)
    return out


def sentences(words: list[Word], pause_s: float = PAUSE_S) -> list[list[Word]]:
    """Words in order -> runs ending at end punctuation or before a pause of at least ``pause_s``."""
    runs: list[list[Word]] = []
    current: list[Word] = []
    for i, w in enumerate(words):
        current.append(w)
        following = words[i + 1] if i + 1 < len(words) else None
        if following is None or _SENTENCE_END.search(w.word) or following.start_s - w.end_s >= pause_s:
            runs.append(current)
            current = []
    return runs
