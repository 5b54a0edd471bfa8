"""Task instructions, output normalisation and label aggregation."""

from __future__ import annotations

import pytest

from pipeline.tasks import (
    EMOTIONS,
    TASKS,
    UNKNOWN,
    TaskError,
    TaskRequest,
    aggregate_labels,
    emotion_label,
    instruction,
    is_dense,
    language_code,
    normalise_output,
)


def test_instructions_for_chat_models() -> None:
    assert instruction(TaskRequest("asr")).startswith("Transcribe the speech")
    assert instruction(TaskRequest("asr", language="de")).startswith("Transcribe the German speech")
    assert instruction(TaskRequest("st", target_language="zh")).startswith(
        "Translate the speech into Chinese."
    )
    assert "German" in instruction(TaskRequest("st", target_language="german"))
    assert "emotion" in instruction(TaskRequest("er"))
    assert instruction(TaskRequest("sqa", question=" Who chairs the meeting? ")) == "Who chairs the meeting?"
    assert language_code("German") == language_code("de") == "de"


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (TaskRequest("st"), "target_language"),
        (TaskRequest("st", target_language="Klingon"), "Klingon"),
        (TaskRequest("sqa", question="  "), "question"),
        (TaskRequest("summarise"), "summarise"),
    ],
)
def test_instruction_errors(request_: TaskRequest, message: str) -> None:
    with pytest.raises(TaskError, match=message):
        instruction(request_)


def test_dense_and_sparse() -> None:
    assert [is_dense(t) for t in TASKS] == [True, True, False, False, False]
    with pytest.raises(TaskError):
        is_dense("asr2")


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("neutral", "neutral"),
        ("The speaker sounds Angry.", "angry"),
        ("joy, excitement", "happy"),
        ("sadness", "sad"),
        ("Surprised!", "surprised"),
        ("scared", "fearful"),
        ("disgust", "disgusted"),
        ("semi-frustrated tone", "angry"),
        ("I cannot tell", UNKNOWN),
    ],
)
def test_emotion_label(text: str, label: str) -> None:
    assert emotion_label(text) == label
    assert label in (*EMOTIONS, UNKNOWN)


def test_normalise_output() -> None:
    assert normalise_output("asr", "<|en|> Hello,\n  world. <|endoftext|>") == "Hello, world."
    assert normalise_output("er", "<|en|>happiness") == "happy"
    assert normalise_output("sqa", "  Yes.  ") == "Yes."


def test_aggregate_labels_weighted_by_speech() -> None:
    assert aggregate_labels(["happy", "sad", "sad"], [10.0, 3.0, 4.0]) == "happy"
    assert aggregate_labels(["happy", "sad", "sad"]) == "sad"
    assert aggregate_labels(["Yes.", "no", "yes"], [2.0, 3.0, 2.0]) == "Yes."
    assert aggregate_labels(["unknown", "", "angry"], [9.0, 9.0, 1.0]) == "angry"
    assert aggregate_labels(["unknown", ""]) == UNKNOWN
    assert aggregate_labels(["sad", "happy"], [1.0, 1.0]) == "sad"  # tie: first seen
    assert aggregate_labels(["sad", "happy"], [0.0, 0.0]) == "sad"
    with pytest.raises(ValueError, match="weights"):
        aggregate_labels(["sad"], [1.0, 2.0])
    with pytest.raises(ValueError, match=">= 0"):
        aggregate_labels(["sad"], [-1.0])
