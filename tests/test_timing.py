"""Word-timing maths (pipeline.timing) against plain reference computations."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from pipeline.timing import Word, clip_long_words, dtw_starts, group_words, median_filter, sentences


def _textbook_dtw_starts(cost: np.ndarray) -> list[int]:
    """DTW with the full table (right, down, diagonal moves) and a backtrace: each row's entry column."""
    rows, cols = cost.shape
    acc = np.full((rows + 1, cols + 1), np.inf)
    acc[0, 0] = 0.0
    for i, j in itertools.product(range(1, rows + 1), range(1, cols + 1)):
        acc[i, j] = cost[i - 1, j - 1] + min(acc[i - 1, j - 1], acc[i - 1, j], acc[i, j - 1])
    starts = [0] * rows
    i, j = rows, cols
    while i > 1:
        moves = {(i - 1, j - 1): acc[i - 1, j - 1], (i - 1, j): acc[i - 1, j], (i, j - 1): acc[i, j - 1]}
        i2, j2 = min(moves, key=moves.get)
        if i2 < i:
            starts[i - 1] = j - 1
        i, j = i2, j2
    return starts


def test_dtw_finds_the_cheapest_monotone_path():
    rng = np.random.default_rng(0)
    for rows, cols in [(1, 5), (3, 3), (4, 9), (6, 20), (7, 4), (12, 40)]:
        cost = rng.random((rows, cols))
        assert dtw_starts(cost).tolist() == _textbook_dtw_starts(cost)


def test_dtw_follows_a_diagonal_of_low_cost():
    cost = np.ones((4, 12))
    for i, j in enumerate([0, 3, 6, 9]):
        cost[i, j : j + 3] = 0.0  # token i is spoken in frames j..j+2
    assert dtw_starts(cost).tolist() == [0, 3, 6, 9]


def test_median_filter_matches_numpy_with_reflected_edges():
    x = torch.randn(2, 3, 17)
    x[0, 0, 5:12] = 1.0  # ties
    ours = median_filter(x)
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (3, 3)), mode="reflect")
    ref = np.median(np.lib.stride_tricks.sliding_window_view(padded, 7, axis=-1), axis=-1)
    np.testing.assert_allclose(ours.numpy(), ref)


def test_words_take_their_tokens_times_and_probabilities():
    # "Hello, world." as tokens "Hello" "," " world" "."
    offsets = [0, 5, 6, 12, 13]
    starts = np.array([10, 30, 31, 60, 70])  # frames: 4 tokens, then the end of text
    spans = [("Hello,", 0, 6), ("world.", 7, 13)]
    words = group_words(spans, offsets, starts, [np.log(0.5), np.log(1.0), np.log(0.8), np.log(0.6)])
    assert [w.word for w in words] == ["Hello,", "world."]
    assert (words[0].start_s, words[0].end_s) == (0.2, 0.62) and words[0].probability == 0.75
    assert (words[1].start_s, words[1].end_s, words[1].probability) == pytest.approx((0.62, 1.4, 0.7))


def test_long_words_at_sentence_edges_are_clipped():
    words = [
        Word("So", 0.0, 2.0, 1.0),
        *(Word(w, 2.0 + i * 0.3, 2.3 + i * 0.3, 1.0) for i, w in enumerate(["we", "all"])),
    ]
    words += [Word("went.", 2.6, 5.0, 1.0), Word("Then", 5.0, 7.0, 1.0), Word("home", 7.0, 7.3, 1.0)]
    clipped = clip_long_words(words)
    assert clipped[0] == Word("So", 2.0 - 1.4, 2.0, 1.0)  # first word: its start moves
    assert clipped[3] == Word("went.", 2.6, 2.6 + 1.4, 1.0)  # a sentence's last: its end moves
    assert clipped[4] == Word("Then", 7.0 - 1.4, 7.0, 1.0)  # after a sentence end: its start moves
    assert clipped[1:3] == words[1:3]


def test_sentences_end_at_punctuation_or_pauses():
    words = [
        Word(w, s, s + 0.3, 1.0)
        for w, s in [("Hi.", 0.0), ("I", 0.4), ("am", 0.8), ("here", 2.0), ("now", 2.4)]
    ]
    assert [[w.word for w in run] for run in sentences(words)] == [["Hi."], ["I", "am"], ["here", "now"]]
