"""WER with Whisper's English normaliser, BLEU and accuracy."""

from __future__ import annotations

import pytest

from pipeline.metrics import accuracy, bleu, normalize_english, wer


def test_normaliser_uses_the_spelling_map_and_whisper_rules():
    assert (
        normalize_english("Mr. Smith's favourite colour, hmm... 20 dollars!")
        == "mister smith is favorite color $20"
    )


def test_wer_normalises_case_punctuation_and_spelling():
    refs = ["AS YOU KNOW MISTER GATHERCOLE", "THE COLOR OF MONEY"]
    assert wer(refs, [" As you know, Mr. Gathercole.", "The colour of money!"]) == 0.0


def test_wer_counts_substitutions_deletions_insertions_over_reference_words():
    refs = ["red green blue black", "cat dog"]
    hyps = ["red grin blue", "cat dog bird"]  # 1 sub + 1 del, 1 ins over 6 reference words
    assert wer(refs, hyps) == pytest.approx(3 / 6)


def test_wer_skips_empty_references_and_rejects_bad_input():
    assert wer(["", "a cat"], ["noise", "a cat"]) == 0.0
    with pytest.raises(ValueError, match="2 references but 1"):
        wer(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="empty"):
        wer(["uh", ""], ["x", "y"])


def test_bleu_and_accuracy():
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert bleu(["the cat sat on the mat today"], ["a dog ran"]) < 10.0
    assert accuracy(["Happy", "sad", "angry"], ["happy ", "sad", "neutral"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="no references"):
        accuracy([], [])
