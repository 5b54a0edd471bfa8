"""WER with Whisper's English and basic normalisers, CER, BLEU, chrF and accuracy."""

from __future__ import annotations

import pytest

from pipeline.metrics import accuracy, asr_scores, bleu, cer, chrf, normalize, normalize_english, raw_cer, wer


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


def test_other_languages_keep_their_letters_and_lose_punctuation():
    assert (
        normalize("Für die besten Aussichten, sagt er: «Ja»!", "de") == "für die besten aussichten sagt er ja"
    )
    assert wer(["¿ Qué tal a tres de cinco ?"], ["¿Qué tal a tres de cinco?"], ["es"]) == 0.0
    assert wer(["für die"], ["fur die"], ["de"]) == pytest.approx(1 / 2)  # a lost umlaut is an error
    with pytest.raises(ValueError, match="2 references but 1 languages"):
        wer(["a", "b"], ["a", "b"], ["de"])


def test_cer_counts_characters_without_spaces_or_punctuation():
    assert cer(["性喜温暖润湿气候且耐寒。"], ["性喜温暖 润湿气候且耐寒"], ["zh"]) == 0.0
    assert cer(["外套则以黑色为主"], ["外套以黑色为主"], ["zh"]) == pytest.approx(1 / 8)
    assert raw_cer(["Ab, c"], ["ab c"]) == pytest.approx(1 / 5)  # only the comma: case is folded


def test_asr_scores_split_by_writing_system():
    refs, hyps = ["der hund bellt", "外套则以黑色为主"], ["der hund bellte", "外套以黑色为主"]
    scores = asr_scores(refs, hyps, ["de", "zh"])
    assert list(scores) == ["WER %", "CER % (ja/ko/zh)", "raw CER %"]
    assert scores["WER %"] == pytest.approx(100 / 3) and scores["CER % (ja/ko/zh)"] == pytest.approx(100 / 8)
    assert list(asr_scores(refs[1:], hyps[1:], ["zh"])) == ["CER % (ja/ko/zh)", "raw CER %"]


def test_chrf_rewards_partial_words():
    assert chrf(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    near, far = chrf(["translation"], ["translations"]), chrf(["translation"], ["dog"])
    assert 50 < near < 100 and far < 10
