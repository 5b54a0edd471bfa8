"""Subtitle cues from a result's words (or, without word times, its segments) and their SRT, WebVTT
and JSON files.

Broadcast and web conventions: at most ``MAX_LINE_CHARS`` characters a line and ``MAX_LINES`` lines a
cue, cues of ``MIN_CUE_S``-``MAX_CUE_S`` seconds, never overlapping. Words are packed into lines in
order; a cue ends where the next word would break a limit, at a sentence end or a pause once it has
lasted ``MIN_CUE_S``. A cue shorter than that is held on screen longer, which delays the next cue's
start when it would overlap. Segments without word times (models that give none) are spread over their
span by characters: such cues are as coarse as the segments.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

from pipeline.timing import PAUSE_S, Word

MAX_LINE_CHARS = 42
MAX_LINES = 2
MIN_CUE_S = 1.0
MAX_CUE_S = 7.0
FORMATS = ("srt", "vtt", "json")
_SENTENCE_END = re.compile(r"[.!?。！？]['\")\]]*$")


@dataclass(frozen=True)
class Cue:
    start_s: float
    end_s: float
    lines: tuple[str, ...]


def _chunks(word: Word) -> list[Word]:
    """A word longer than a line split into line-long pieces over its time (a URL, say)."""
    if len(word.word) <= MAX_LINE_CHARS:
        return [word]
    pieces = [word.word[i : i + MAX_LINE_CHARS] for i in range(0, len(word.word), MAX_LINE_CHARS)]
    step = (word.end_s - word.start_s) / len(pieces)
    return [
        Word(p, word.start_s + i * step, word.start_s + (i + 1) * step, word.probability)
        for i, p in enumerate(pieces)
    ]


def _lines_with(lines: list[str], word: str) -> list[str] | None:
    """``lines`` with ``word`` added (to the last line, or a new one), or None when it breaks a limit."""
    if lines and len(lines[-1]) + 1 + len(word) <= MAX_LINE_CHARS:
        return [*lines[:-1], f"{lines[-1]} {word}"]
    return [*lines, word] if len(lines) < MAX_LINES else None


def cues(words: Iterable[Word]) -> list[Cue]:
    """Words in time order -> cues following the conventions above."""
    packed: list[tuple[float, float, list[str]]] = []
    lines: list[str] = []
    start = end = 0.0
    for word in (piece for w in words for piece in _chunks(w)):
        grown = _lines_with(lines, word.word) if lines else [word.word]
        closes = lines and (
            grown is None
            or word.end_s - start > MAX_CUE_S
            or (
                end - start >= MIN_CUE_S
                and (_SENTENCE_END.search(lines[-1]) or word.start_s - end >= PAUSE_S)
            )
        )
        if closes:
            packed.append((start, end, lines))
            grown, start = [word.word], word.start_s
        elif not lines:
            start = word.start_s
        lines, end = grown, max(end, word.end_s)
    if lines:
        packed.append((start, end, lines))
    out: list[Cue] = []
    for i, (start, end, text) in enumerate(packed):
        if out and start < out[-1].end_s:  # the previous cue was held on screen: start after it
            start = out[-1].end_s
        end = min(max(end, start + MIN_CUE_S), start + MAX_CUE_S)
        if i + 1 < len(packed):  # hold a short cue only until the next begins, unless that is too soon
            end = max(min(end, packed[i + 1][0]), start + MIN_CUE_S)
        out.append(Cue(start, end, tuple(text)))
    return out


def segment_words(segments: Iterable[dict]) -> list[Word]:
    """Segments (start_s, end_s, text) without word times -> words spread over each segment by
    characters (coarse: as exact as the segments)."""
    out = []
    for seg in segments:
        parts = seg["text"].split()
        total = sum(len(p) + 1 for p in parts) or 1
        per_char = (seg["end_s"] - seg["start_s"]) / total
        at = seg["start_s"]
        for p in parts:
            out.append(Word(p, at, at + len(p) * per_char, 1.0))
            at += (len(p) + 1) * per_char
    return out


def _clock(seconds: float, separator: str) -> str:
    millis = round(seconds * 1000)
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def render(cue_list: list[Cue], fmt: str, recording_id: str = "") -> str:
    """The cues as an SRT (``,`` before the milliseconds), WebVTT (its header, ``.``) or JSON file."""
    if fmt == "json":
        items = [{"start_s": c.start_s, "end_s": c.end_s, "lines": list(c.lines)} for c in cue_list]
        return json.dumps({"recording_id": recording_id, "cues": items}, ensure_ascii=False, indent=1) + "\n"
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    separator = "," if fmt == "srt" else "."
    blocks = [
        (f"{i}\n" if fmt == "srt" else "")
        + f"{_clock(c.start_s, separator)} --> {_clock(c.end_s, separator)}\n"
        + "\n".join(c.lines)
        for i, c in enumerate(cue_list, start=1)
    ]
    header = ["WEBVTT"] if fmt == "vtt" else []
    return "\n\n".join(header + blocks) + "\n"
