"""Stitching window texts: concatenation, word-level seams, the time fallback and the repetition guard."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.audio.windows import plan_windows
from pipeline.stitch import (
    WindowText,
    compression_ratio,
    guarded_indices,
    loop_free,
    normalise,
    stitch,
    words,
)
from pipeline.timing import Word

WORD_S = 0.4  # one word every 0.4 s in the synthetic recordings below


def heard(script: list[str], start_s: float, end_s: float) -> list[str]:
    """The words of a uniformly spoken script whose centres fall inside [start_s, end_s)."""
    return [w for k, w in enumerate(script) if start_s <= (k + 0.5) * WORD_S < end_s]


def window_texts(script: list[str], max_window_s: float, overlap_s: float) -> list[WindowText]:
    duration = len(script) * WORD_S
    windows = plan_windows([(0.0, duration)], duration, max_window_s, overlap_s)
    return [
        WindowText(
            w.index,
            w.start_s,
            w.end_s,
            w.overlap_before_s,
            w.overlap_after_s,
            " ".join(heard(script, w.start_s, w.end_s)),
        )
        for w in windows
    ]


def test_pause_cut_windows_are_concatenated() -> None:
    parts = [
        WindowText(1, 12.0, 20.0, 0.0, 0.0, "and then it rained."),
        WindowText(0, 1.0, 10.0, 0.0, 0.0, "We walked home,"),
        WindowText(2, 25.0, 30.0, 0.0, 0.0, ""),
    ]
    result = stitch(parts)
    assert result.text == "We walked home, and then it rained."
    assert result.segments[1].to_dict() == {
        "index": 1,
        "start_s": 12.0,
        "end_s": 20.0,
        "text": "and then it rained.",
        "stitch_confidence": 1.0,
    }
    assert [(s.index, s.start_s, s.end_s, s.stitch_confidence) for s in result.segments] == [
        (0, 1.0, 10.0, 1.0),
        (1, 12.0, 20.0, 1.0),
        (2, 25.0, 30.0, 1.0),
    ]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.integers(0, 10_000), min_size=1, max_size=120, unique=True),
    st.sampled_from([(6.0, 1.5), (8.0, 2.0), (30.0, 3.0)]),
)
def test_exact_overlaps_lose_and_duplicate_nothing(ids: list[int], sizes: tuple[float, float]) -> None:
    script = [f"w{i}" for i in ids]
    result = stitch(window_texts(script, *sizes))
    assert result.text.split() == script
    assert all(s.stitch_confidence >= 0.5 for s in result.segments)


def test_edge_words_cut_mid_word_come_from_the_window_that_heard_them_whole() -> None:
    left = WindowText(0, 0.0, 30.0, 0.0, 3.0, "So the quick brown fox jumps over the la")
    right = WindowText(1, 27.0, 40.0, 3.0, 0.0, "ox jumps over the lazy dog, and it ran.")
    result = stitch([left, right])
    assert result.text == "So the quick brown fox jumps over the lazy dog, and it ran."
    assert result.segments[0].end_s == result.segments[1].start_s == 28.5
    assert result.segments[0].stitch_confidence >= 0.75


def test_seam_with_common_repeated_words() -> None:
    script = [
        "the",
        "cat",
        "and",
        "the",
        "dog",
        "and",
        "the",
        "bird",
        "sat",
        "on",
        "the",
        "mat",
        "and",
        "the",
        "rug",
        "by",
        "the",
        "door",
        "of",
        "the",
        "house",
    ]
    result = stitch(window_texts(script, 3.0, 1.2))
    assert result.text.split() == script


def test_disagreeing_overlap_is_cut_by_time_with_low_confidence() -> None:
    left = WindowText(0, 0.0, 10.0, 0.0, 2.0, "one two three four five six seven eight nine ten")
    right = WindowText(1, 8.0, 18.0, 2.0, 0.0, "alpha beta gamma delta epsilon zeta eta theta iota kappa")
    result = stitch([left, right])
    # The seam is at 9 s: left words centred before it (nine of ten), right words after it (nine of ten).
    assert result.text.split() == [
        *["one", "two", "three", "four", "five", "six", "seven", "eight", "nine"],
        *["beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"],
    ]
    assert [s.stitch_confidence for s in result.segments] == [0.0, 0.0]


def test_one_coincidental_match_is_not_a_seam() -> None:
    left = WindowText(0, 0.0, 10.0, 0.0, 3.0, "we met at noon and talked about the budget for next year")
    right = WindowText(1, 7.0, 17.0, 3.0, 0.0, "hours of planning for the new office finally paid off today")
    assert stitch([left, right]).segments[0].stitch_confidence == 0.0


def test_one_empty_side_keeps_the_other() -> None:
    left = WindowText(0, 0.0, 10.0, 0.0, 3.0, "every word here stays")
    right = WindowText(1, 7.0, 12.0, 3.0, 0.0, "   ")
    result = stitch([left, right])
    assert result.text == "every word here stays"
    assert result.segments[1].text == ""


def test_cjk_seam_and_joining() -> None:
    left = WindowText(0, 0.0, 10.0, 0.0, 3.0, "今天我们讨论明年的预算和计划")
    right = WindowText(1, 7.0, 14.0, 3.0, 0.0, "预算和计划，然后散会。")
    assert stitch([left, right]).text == "今天我们讨论明年的预算和计划，然后散会。"


def test_loops_collapsed_and_degenerate_text_dropped() -> None:
    looping = words("thank you " * 30 + "bye")
    assert [looping[i] for i in loop_free(looping)] == ["thank", "you", "bye"]
    fine = words("no no no, that is fine")
    assert [fine[i] for i in loop_free(fine)] == fine
    looped = WindowText(0, 0.0, 30.0, 0.0, 0.0, "The minutes were approved. " + "I'm sorry. " * 40)
    assert stitch([looped]).text == "The minutes were approved. I'm sorry."
    sentence = "we will now go over every single item on the agenda for this very long meeting "
    assert compression_ratio(sentence * 8) > 2.4 > compression_ratio(sentence)
    assert guarded_indices(words(sentence * 8)) == ([], True)
    result = stitch([WindowText(0, 0.0, 30.0, 0.0, 0.0, sentence * 8)])
    assert result.text == "" and result.segments[0].stitch_confidence == 0.0


def test_words_and_normalise() -> None:
    assert words("Hello,  world!\nGood 日本") == ["Hello,", "world!", "Good", "日", "本"]
    assert [normalise(w) for w in ["Don't,", "ÉTÉ", "—", "3.5"]] == ["dont", "été", "", "35"]


def test_short_exact_match_at_the_seam_is_accepted() -> None:
    # examples/lecture.m4a: 85 words in 0-30 s, 56 in 27-47 s, so each text should hold about 8.5 of the
    # overlap's words, but the left model stopped early and the right one started late: the texts share
    # only "between them", at the very end of one and the start of the other.
    filler = " ".join(f"w{i}" for i in range(77))
    left = WindowText(0, 0.0, 30.0, 0.0, 3.0, f"{filler} a single word at the scene between them.")
    more = " ".join(f"w{i}" for i in range(100, 148))
    right = WindowText(1, 27.0, 47.0, 3.0, 0.0, f"between them, which is harder than it sounds {more}")
    result = stitch([left, right])
    seam = "a single word at the scene between them, which is harder than it sounds"
    assert result.text == f"{filler} {seam} {more}"
    assert result.segments[0].stitch_confidence == 1.0


def test_common_words_away_from_the_seam_are_not_a_seam() -> None:
    # "of the" agrees, but the left text goes on for three words the right one never heard and the
    # right one starts with two the left one never heard: the texts do not agree on the overlap.
    left = WindowText(0, 0.0, 10.0, 0.0, 3.0, "she said that we met at the end of the hall every day")
    right = WindowText(1, 7.0, 17.0, 3.0, 0.0, "so most of the people there were tired and then left")
    assert [s.stitch_confidence for s in stitch([left, right]).segments] == [0.0, 0.0]


def test_repeated_phrase_aligns_at_the_end_of_the_left_text() -> None:
    # Both copies of "and then" are in the left text's search region; the right window's cut at 10.9 s
    # splits "stop" (10.8-11.2 s), which its model drops, so its text starts at the second copy.
    script = [f"w{i}" for i in range(25)] + ["and", "then", "stop", "and", "then", "go", "home"]
    script += [f"w{i}" for i in range(32, 57)]
    left = WindowText(0, 0.0, 12.0, 0.0, 1.1, " ".join(heard(script, 0.0, 12.0)))
    right = WindowText(1, 10.9, 22.9, 1.1, 0.0, " ".join(heard(script, 10.9, 22.9)[1:]))
    result = stitch([left, right])
    assert result.text.split() == script
    assert result.segments[0].stitch_confidence == 1.0


def test_repeated_phrase_in_an_exact_overlap() -> None:
    # The 0.8 s overlap holds exactly the second "I know" (words centred at 7.4 s and 7.8 s).
    script = [f"w{i}" for i in range(15)] + ["yes", "I", "know", "I", "know", "you", "do"]
    script += [f"w{i}" for i in range(22, 38)]
    windows = window_texts(script, 8.0, 0.8)
    assert [w.overlap_after_s for w in windows] == [0.8, 0.0]
    assert windows[0].text.endswith("yes I know I know") and windows[1].text.startswith("I know you do")
    assert stitch(windows).text.split() == script


def _timed(
    index: int, start: float, end: float, spoken: list[str], first_s: float, **overlaps: float
) -> WindowText:
    """A window whose i-th word is spoken at first_s + 0.5 i (recording seconds)."""
    timed = tuple(Word(w, first_s + 0.5 * i, first_s + 0.5 * i + 0.4, 0.9) for i, w in enumerate(spoken))
    return WindowText(
        index, start, end, overlaps.get("before", 0.0), overlaps.get("after", 0.0), " ".join(spoken), timed
    )


def test_word_times_survive_the_seam_once_each_and_make_sentences() -> None:
    talk = "we met on monday. the budget is final and the plan is set. next we hire two people for the team."
    spoken = talk.split()  # word i spoken at 0.5 i s
    left = _timed(0, 0.0, 10.0, spoken[:20], 0.0, after=3.0)
    right = _timed(1, 7.0, 17.0, spoken[14:], 7.0 + 0.04, before=3.0)  # its own times, 40 ms later
    result = stitch([right, left])
    assert result.text == talk and [w.word for w in result.words] == spoken
    seam = next(i for i, w in enumerate(result.words) if w in right.words)
    assert all(w in left.words for w in result.words[:seam]) and all(
        w in right.words for w in result.words[seam:]
    )
    assert 14 <= seam <= 20
    assert [s.text for s in result.segments] == [
        "we met on monday.",
        "the budget is final and the plan is set.",
        "next we hire two people for the team.",
    ]
    assert result.segments[1].start_s == result.words[4].start_s
    assert result.segments[-1].end_s == result.words[-1].end_s


def test_a_window_without_word_times_keeps_window_segments() -> None:
    left = _timed(0, 0.0, 10.0, ["hello", "there."], 0.0)
    right = WindowText(1, 10.0, 20.0, 0.0, 0.0, "general kenobi.")
    result = stitch([left, right])
    assert result.words is None and [s.text for s in result.segments] == ["hello there.", "general kenobi."]
