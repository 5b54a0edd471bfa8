"""Join the texts of a recording's windows into one transcript.

Windows cut in pauses share no audio: their texts are concatenated. Windows from a forced cut share
``overlap`` seconds of audio, so both texts hold the words spoken there. The seam is found by a local
alignment of normalised words near the end of the left text and the start of the right text; the left
half of the agreeing words comes from the left window and the rest from the right, so the words each
window heard only partly at its edge are never used. Original words (case, punctuation) are kept.
Agreement is the share of matched words in the aligned region extended to the window edges: a model
may stop early or start late, so the texts can share few of the overlap's words, but those end the
left text and start the right one; words between the alignment and an edge, beyond the one a cut can
split there, disagree. When the texts do not agree (fewer than ``MIN_MATCHES`` aligned words or
agreement below ``MIN_AGREEMENT``), the seam is cut at the middle of the overlap by each window's
uniform word rate and its segments get stitch_confidence 0.

Before stitching, each window's text goes through a repetition guard: n-gram loops are collapsed and
text whose gzip compression ratio still exceeds ``MAX_COMPRESSION_RATIO`` (Whisper's threshold for
degenerate output) is dropped.
"""

from __future__ import annotations

import math
import re
import unicodedata
import zlib
from dataclasses import asdict, dataclass
from itertools import pairwise

from pipeline.timing import Word, sentences

MIN_MATCHES = 2
MIN_AGREEMENT = 0.5
SEARCH_FACTOR = 1.5  # search this many times the expected number of overlap words
MIN_SEARCH_WORDS = 4
EDGE_WORDS = 1  # a cut splits at most one word, which the window may garble or drop at its edge
MAX_REPEATS = 3  # an n-gram repeated more often than this in a row is a loop
MAX_NGRAM = 10
MAX_COMPRESSION_RATIO = 2.4

# Scripts written without spaces: each character is a word, and no space joins them.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKEN = re.compile(f"[{_CJK}]|[^\\s{_CJK}]+")
_CJK_CHAR = re.compile(f"[{_CJK}]")


@dataclass(frozen=True)
class WindowText:
    """The raw model output of one window and the window's place in the recording (seconds); words:
    its words with recording times, where the model gave them (their texts are ``words(text)``)."""

    index: int
    start_s: float
    end_s: float
    overlap_before_s: float
    overlap_after_s: float
    text: str
    words: tuple[Word, ...] | None = None


@dataclass(frozen=True)
class Segment:
    """A stretch of the transcript: one window's share, or a sentence where word times exist (index:
    its place in the list); stitch_confidence in [0, 1] (a sentence: its windows' lowest), 0 = seam
    cut by time or text dropped."""

    index: int
    start_s: float
    end_s: float
    text: str
    stitch_confidence: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Stitched:
    """words: the transcript's words with times when every window with kept words had them, else None."""

    text: str
    segments: list[Segment]
    words: list[Word] | None = None


def words(text: str) -> list[str]:
    """Original words of ``text``: whitespace-separated runs, with each CJK character a word of its own."""
    return _TOKEN.findall(text)


def word_spans(text: str) -> list[tuple[str, int, int]]:
    """``words(text)``, each with its characters [begin, end) in ``text``."""
    return [(m.group(), m.start(), m.end()) for m in _TOKEN.finditer(text)]


def normalise(word: str) -> str:
    """Case-folded letters, digits and marks of a word ('Don't,' -> 'dont'); '' for pure punctuation."""
    return "".join(
        ch for ch in unicodedata.normalize("NFKC", word).casefold() if unicodedata.category(ch)[0] in "LNM"
    )


def join(pieces: list[str]) -> str:
    """Join words or texts with a space, except where either side of the junction is a CJK character."""
    out = ""
    for piece in filter(None, pieces):
        glue = "" if not out or _CJK_CHAR.fullmatch(out[-1]) or _CJK_CHAR.fullmatch(piece[0]) else " "
        out += glue + piece
    return out


def compression_ratio(text: str) -> float:
    """UTF-8 length over zlib-compressed length: near 1-2 for speech, large for repetitive text."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def loop_free(tokens: list[str], max_repeats: int = MAX_REPEATS, max_ngram: int = MAX_NGRAM) -> list[int]:
    """Indices of the tokens kept when any n-gram (n <= max_ngram) repeated more than ``max_repeats``
    times in a row is replaced by one copy."""
    keys = [normalise(t) or t for t in tokens]
    kept: list[int] = []
    i = 0
    while i < len(tokens):
        for n in range(1, max_ngram + 1):
            copies = 1
            while keys[i + copies * n : i + (copies + 1) * n] == keys[i : i + n]:
                copies += 1
            if copies > max_repeats:
                kept.extend(range(i, i + n))
                i += copies * n
                break
        else:
            kept.append(i)
            i += 1
    return kept


def guarded_indices(tokens: list[str]) -> tuple[list[int], bool]:
    """The indices of a window's words kept by the repetition guard (loops collapsed), and whether the
    text was dropped as degenerate (what is left still compresses like a loop)."""
    kept = loop_free(tokens)
    if compression_ratio(join([tokens[i] for i in kept])) > MAX_COMPRESSION_RATIO:
        return [], True
    return kept, False


def align(left: list[str], right: list[str]) -> list[tuple[int, int]]:
    """Best local alignment (match +1, mismatch or gap -1) of two normalised word lists.

    Returns the matched (left index, right index) pairs in order; '' never matches. Ties go to the
    alignment ending latest in the left text, then earliest in the right: a repeated phrase's copy at
    the end of the left text is the one the right text starts with.
    """
    rows, cols = len(left) + 1, len(right) + 1
    score = [[0] * cols for _ in range(rows)]
    best, best_at = 0, (0, 0)
    for i in range(1, rows):
        for j in range(1, cols):
            same = left[i - 1] == right[j - 1] and left[i - 1] != ""
            score[i][j] = max(
                0, score[i - 1][j - 1] + (1 if same else -1), score[i - 1][j] - 1, score[i][j - 1] - 1
            )
            if score[i][j] > best or (score[i][j] == best and i > best_at[0]):
                best, best_at = score[i][j], (i, j)
    pairs: list[tuple[int, int]] = []
    i, j = best_at
    while i > 0 and j > 0 and score[i][j] > 0:
        same = left[i - 1] == right[j - 1] and left[i - 1] != ""
        if score[i][j] == score[i - 1][j - 1] + (1 if same else -1):
            if same:
                pairs.append((i - 1, j - 1))
            i, j = i - 1, j - 1
        elif score[i][j] == score[i - 1][j] - 1:
            i -= 1
        else:
            j -= 1
    return pairs[::-1]


def _words_before(n_words: int, start_s: float, end_s: float, t: float) -> int:
    """How many of ``n_words`` spread uniformly over [start_s, end_s] are centred before time t."""
    if end_s <= start_s:
        return n_words
    return min(n_words, max(0, math.ceil((t - start_s) / (end_s - start_s) * n_words - 0.5)))


def seam(left: WindowText, lw: list[str], right: WindowText, rw: list[str]) -> tuple[int, int, float]:
    """Where to cut two overlapping windows: (left words kept, right words skipped, confidence)."""
    if not lw or not rw:  # nothing to align: keep whatever one side heard
        return len(lw), 0, 1.0 if not lw and not rw else 0.0
    overlap = left.end_s - right.start_s
    exp_left = len(lw) * overlap / (left.end_s - left.start_s)
    exp_right = len(rw) * overlap / (right.end_s - right.start_s)
    k_left = min(len(lw), max(MIN_SEARCH_WORDS, math.ceil(SEARCH_FACTOR * exp_left)))
    k_right = min(len(rw), max(MIN_SEARCH_WORDS, math.ceil(SEARCH_FACTOR * exp_right)))
    offset = len(lw) - k_left
    pairs = align([normalise(w) for w in lw[offset:]], [normalise(w) for w in rw[:k_right]])
    if len(pairs) >= MIN_MATCHES:
        (first_left, first_right), (last_left, last_right) = pairs[0], pairs[-1]
        span = max(last_left - first_left, last_right - first_right) + 1
        # Counted in the texts, not by a word-rate estimate of the overlap: models may write few of its words.
        unmatched = max(0, k_left - 1 - last_left - EDGE_WORDS) + max(0, first_right - EDGE_WORDS)
        agreement = len(pairs) / (span + unmatched)
        if agreement >= MIN_AGREEMENT:
            cut_left, cut_right = pairs[len(pairs) // 2 - 1]
            return offset + cut_left + 1, cut_right + 1, agreement
    middle = (left.end_s + right.start_s) / 2
    return (
        _words_before(len(lw), left.start_s, left.end_s, middle),
        _words_before(len(rw), right.start_s, right.end_s, middle),
        0.0,
    )


def stitch(windows: list[WindowText]) -> Stitched:
    """One transcript from a recording's window texts (any order; sorted by index). Where every window
    has word times, the words kept at each seam keep their window's times and the segments are the
    transcript's sentences."""
    windows = sorted(windows, key=lambda w: w.index)
    guarded = []
    for w in windows:
        all_words = words(w.text)
        kept, dropped = guarded_indices(all_words)
        timed = w.words is not None and [x.word for x in w.words] == all_words
        guarded.append(([all_words[k] for k in kept], [w.words[k] for k in kept] if timed else None, dropped))
    tokens = [t for t, _, _ in guarded]
    first = [0] * len(windows)  # first word of each window that is kept
    last = [len(t) for t in tokens]  # one past the last kept word
    starts = [w.start_s for w in windows]
    ends = [w.end_s for w in windows]
    confidence = [0.0 if dropped else 1.0 for _, _, dropped in guarded]
    for i, (left, right) in enumerate(pairwise(windows)):
        if right.start_s >= left.end_s:
            continue
        last[i], first[i + 1], conf = seam(left, tokens[i], right, tokens[i + 1])
        ends[i] = starts[i + 1] = (left.end_s + right.start_s) / 2
        confidence[i] = min(confidence[i], conf)
        confidence[i + 1] = min(confidence[i + 1], conf)
    spans = [(first[i], max(first[i], last[i])) for i in range(len(windows))]
    segments = [
        Segment(w.index, starts[i], ends[i], join(tokens[i][a:b]), confidence[i])
        for i, (w, (a, b)) in enumerate(zip(windows, spans, strict=True))
    ]
    text = join([s.text for s in segments])
    untimed = any(timed is None and a < b for (_, timed, _), (a, b) in zip(guarded, spans, strict=True))
    if untimed or any(w.words is None for w in windows):
        return Stitched(text, segments)
    timed_words = _in_order(
        [
            (word, confidence[i])
            for i, (_, timed, _) in enumerate(guarded)
            for word in (timed or [])[slice(*spans[i])]
        ]
    )
    return Stitched(text, _sentence_segments(timed_words), [w for w, _ in timed_words])


def _in_order(timed: list[tuple[Word, float]]) -> list[tuple[Word, float]]:
    """Words whose start falls before the previous word's end (across a seam) start at that end."""
    out: list[tuple[Word, float]] = []
    for word, conf in timed:
        if out and word.start_s < out[-1][0].end_s:
            start = out[-1][0].end_s
            word = Word(word.word, start, max(start, word.end_s), word.probability)
        out.append((word, conf))
    return out


def _sentence_segments(timed: list[tuple[Word, float]]) -> list[Segment]:
    confidence = {id(word): conf for word, conf in timed}
    return [
        Segment(
            i,
            run[0].start_s,
            run[-1].end_s,
            join([w.word for w in run]),
            min(confidence[id(w)] for w in run),
        )
        for i, run in enumerate(sentences([w for w, _ in timed]))
    ]
