"""The tasks a SpeechLM run can do, one record each in ``TASKS``: what the job configuration checks,
how window outputs combine, which result field holds them, what evaluation scores, and how an instruct
(chat) model is asked. A family's plain prompts for base checkpoints live in its own module.

Dense tasks (asr, st) need every window's words: window texts are stitched into one text
(pipeline.stitch). Sparse tasks give one short output per window: er labels and sqa answers are
normalised and the recording's result is the label (answer) with the most speech behind it
(``aggregate_labels`` weighted by each window's speech duration).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.errors import Refusal
from pipeline.stitch import normalise, words

EMOTIONS = ("neutral", "happy", "sad", "angry", "fearful", "disgusted", "surprised")
UNKNOWN = "unknown"

LANGUAGES = {
    "ar": "Arabic",
    "de": "German",
    "en": "English",
    "es": "Spanish",
    "fr": "French",
    "it": "Italian",
    "ja": "Japanese",
    "ko": "Korean",
    "nl": "Dutch",
    "pt": "Portuguese",
    "ru": "Russian",
    "zh": "Chinese",
}

# Words a model uses for each emotion; the first one found in an output decides its label.
_EMOTION_WORDS = {
    "neutral": "neutral neutrality calm none",
    "happy": "happy happiness joy joyful excited excitement cheerful glad pleased amused delighted",
    "sad": "sad sadness unhappy sorrow sorrowful depressed disappointed upset grief",
    "angry": "angry anger mad annoyed frustrated frustration furious irritated rage",
    "fearful": "fear fearful afraid scared anxious anxiety nervous frightened worried",
    "disgusted": "disgust disgusted disgusting",
    "surprised": "surprise surprised surprising amazed astonished shocked",
}
_EMOTION_OF = {word: label for label, synonyms in _EMOTION_WORDS.items() for word in synonyms.split()}
TIMESTAMPS = ("words", "segments", "none")
_SPECIAL_TOKEN = re.compile(r"<\|[^|>]*\|>")


class TaskError(Refusal, ValueError):
    """A task name or its arguments are invalid; the message says which and what is allowed."""


@dataclass(frozen=True)
class TaskRequest:
    """What to do with each window: task name (one of TASKS) and its arguments.

    language: the spoken language when known (asr, st); None lets a multilingual model detect it.
    timestamps: ``words`` (each window's words with times, from a model that gives them), ``segments``
    (sentence times; derived from word times where the model gives them) or ``none`` (window spans).
    """

    task: str = "asr"
    target_language: str | None = None  # st
    question: str | None = None  # sqa
    language: str | None = None
    timestamps: str = "none"

    def __post_init__(self) -> None:
        if self.timestamps not in TIMESTAMPS:
            raise TaskError(f"timestamps={self.timestamps!r} is not one of {', '.join(TIMESTAMPS)}")
        if self.task == "lid" and self.language:
            raise TaskError(
                f"task 'lid' detects the spoken language; language={self.language!r} contradicts it"
            )


def check_task(task: str) -> Task:
    """The task's record; TaskError naming the known tasks for any other name."""
    if task not in TASKS:
        raise TaskError(f"task={task!r} is not one of {', '.join(TASKS)}")
    return TASKS[task]


def is_dense(task: str) -> bool:
    """True when the task's window texts are stitched (asr, st), False when aggregated (er, sqa)."""
    return check_task(task).dense


def language_code(language: str) -> str:
    """The pipeline's one language normaliser: the ISO 639-1 code of a language given as a code or an
    English name ('German', 'german', 'de' -> 'de'; 'Swahili' -> 'sw' from Whisper's list), else the
    input lower-cased (a model's own list of languages then decides: ``models.base.check_request``)."""
    key = language.strip().lower()
    codes = {name.lower(): code for code, name in LANGUAGES.items()}
    if key in LANGUAGES or key in codes:
        return codes.get(key, key)
    # Whisper's list names the languages of every checkpoint here; only read beyond the prompt table.
    from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

    return TO_LANGUAGE_CODE.get(key, key)


def language_name(language: str) -> str:
    """English name of a language given as a code ('de') or a name ('German', 'german'), for prompts."""
    code = language_code(language)
    if code not in LANGUAGES:
        raise TaskError(
            f"language {language!r} is not one of {', '.join(sorted(LANGUAGES))} (or their names)"
        )
    return LANGUAGES[code]


def instruction(request: TaskRequest) -> str:
    """The task as an instruction to an instruct (chat) model; the audio comes before it in the turn."""
    task = check_task(request.task)
    if task.instruction is None:
        raise TaskError(f"task {request.task!r} has no instruction for chat models")
    return task.instruction(request)


def needed(request: TaskRequest, field: str) -> str:
    """The request's ``field`` (one the task needs: target_language, question), stripped."""
    value = getattr(request, field)
    if not value or not value.strip():
        raise TaskError(f"task {request.task!r} needs a {field}")
    return value.strip()


def target_language(request: TaskRequest) -> str:
    return needed(request, "target_language")


def question(request: TaskRequest) -> str:
    return needed(request, "question")


def _transcribe(request: TaskRequest) -> str:
    spoken = f" {language_name(request.language)}" if request.language else ""
    return f"Transcribe the{spoken} speech exactly as spoken. Output only the transcript."


def emotion_label(text: str) -> str:
    """Map a model's free-text emotion answer to one of EMOTIONS, or UNKNOWN if it names none."""
    for word in words(text.replace("-", " ")):
        label = _EMOTION_OF.get(normalise(word))
        if label is not None:
            return label
    return UNKNOWN


def normalise_output(task: str, text: str) -> str:
    """Clean one window's raw output: special tokens removed, whitespace collapsed, then the task's own
    normalisation (er -> an EMOTIONS label)."""
    record = check_task(task)
    text = " ".join(_SPECIAL_TOKEN.sub(" ", text).split())
    return text if record.normalise is None else record.normalise(text)


def aggregate_labels(labels: list[str], weights: list[float] | None = None) -> str:
    """The label with the largest total weight (e.g. seconds of speech in the windows that gave it).

    Labels are compared by their normalised words, so 'Yes.' and 'yes' count together; the first
    spelling seen is returned. Empty labels and UNKNOWN are ignored unless nothing else is given
    (then UNKNOWN). Ties go to the label seen first. weights: one per label, >= 0 (default: all 1).
    """
    weights = [1.0] * len(labels) if weights is None else list(weights)
    if len(weights) != len(labels):
        raise ValueError(f"{len(labels)} labels but {len(weights)} weights")
    if any(w < 0 for w in weights):
        raise ValueError("weights must be >= 0")
    if sum(weights) == 0:
        weights = [1.0] * len(labels)
    totals: dict[str, float] = defaultdict(float)
    spelling: dict[str, str] = {}
    for label, weight in zip(labels, weights, strict=True):
        key = " ".join(filter(None, (normalise(w) for w in words(label))))
        if key in ("", UNKNOWN):
            continue
        totals[key] += weight
        spelling.setdefault(key, label.strip())
    if not totals:
        return UNKNOWN
    best = max(totals.values())
    return spelling[next(key for key, total in totals.items() if total == best)]


@dataclass(frozen=True)
class Task:
    """One task, as every stage reads it.

    dense: window texts are stitched (True) or one output per window is aggregated by speech duration;
    result: the result field it fills (``text``, ``label`` or ``answer``; schemas.tables.RESULTS_SCHEMA);
    reference: the manifest field evaluation scores against (None: not scored); metric: how it is
    scored (pipeline.metrics.SCORERS); instruction: the request worded for an instruct (chat) model
    (None: no chat prompt asks it); needs: request fields it cannot do without (target_language,
    question), checked by the job configuration; normalise: a window output's own clean-up.
    """

    name: str
    dense: bool
    result: str
    reference: str | None
    metric: str | None
    instruction: Callable[[TaskRequest], str] | None
    needs: tuple[str, ...] = ()
    normalise: Callable[[str], str] | None = None


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("asr", True, "text", "text", "wer", _transcribe),
        Task(
            "st",
            True,
            "text",
            "translation_en",
            "bleu",
            lambda r: (
                f"Translate the speech into {language_name(target_language(r))}. Output only the translation."
            ),
            needs=("target_language",),
        ),
        Task(
            "er",
            False,
            "label",
            "text",
            "accuracy",
            lambda r: "Recognize the emotion of the speaker. Answer with one word.",
            normalise=emotion_label,
        ),
        Task("sqa", False, "answer", None, None, question, needs=("question",)),
        # lid: a language code per window, which the model gives without being asked (Whisper's detection)
        Task("lid", False, "label", "language", "accuracy", None),
    )
}
