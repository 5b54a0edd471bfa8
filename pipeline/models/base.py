"""The contract between the pipeline and a model family.

A family is one module in ``pipeline/models/`` that provides:

- ``MODEL_TYPES``: the ``model_type`` values of ``config.json`` it serves;
- ``describe(checkpoint) -> ModelDescription``: read from the checkpoint's config files alone, never its
  weights (the driver, presets, evaluate and generate ask this before any model exists);
- ``load(checkpoint, device, dtype) -> SpeechModel``: the loaded adapter; ``dtype=INT8`` asks for dynamic
  int8 quantization, which only families whose description says ``int8`` accept.

A ``SpeechModel`` turns a batch of mono float32 waveforms at ``sample_rate`` (each at most
``max_window_s`` long) plus a task into one ``WindowOutput`` per waveform. Decoder-only SpeechLMs share
``pipeline.models.speechlm.AudioLanguageModel`` and supply only their audio encoder call and prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from pipeline.merging.config import ReductionConfig
from pipeline.stats import WindowStats
from pipeline.tasks import TaskRequest
from pipeline.timing import Word

KINDS = ("base", "instruct")
# Every family here hears through a Whisper-style log-mel front end: 16 kHz audio, 30 s of it per window.
SAMPLE_RATE = 16000
WINDOW_S = 30.0
# The dtype that asks for dynamic int8 quantization (int8 weights, activations quantized per call; CPU).
INT8 = torch.qint8


class ModelError(ValueError):
    """A model name, folder or checkpoint cannot be used; the message says why and what would work."""


@dataclass(frozen=True)
class Checkpoint:
    """Where a model comes from: ``name`` as the user gave it, ``folder`` holding its config files
    (and, once loaded, its weights; None for models built in code), ``packaged`` for models whose
    weights come from a Python package (no folder), the config's ``model_type``, and ``kind`` when the
    user says how to prompt it (None: from what the checkpoint ships)."""

    name: str
    model_type: str
    folder: Path | None = None
    packaged: bool = False
    kind: str | None = None


@dataclass(frozen=True)
class ModelDescription:
    """What the pipeline must know of a model before any weights are read.

    family: the family module's name; kind: ``base`` (plain prompts) or ``instruct`` (prompted with
    the chat template it ships); reducing_layers: layers a reduction schedule counts over (decoder
    layers of a SpeechLM, encoder layers of Whisper); translate_to: target languages of ``st``
    (empty: any the prompt can name); drops_padding: the adapter has a ``padding`` option (``keep`` or
    ``drop`` the encoder output of a window's padding, a reduction of its own); int8: loads with
    ``dtype=INT8`` on CPU; word_times: gives word times (``TaskRequest.timestamps`` ``words``; Whisper
    checkpoints that name their alignment heads).
    """

    name: str
    family: str
    kind: str
    tasks: frozenset[str]
    sample_rate: int
    max_window_s: float
    reducing_layers: int
    translate_to: tuple[str, ...] = ()
    multilingual: bool = False
    drops_padding: bool = False
    int8: bool = False
    word_times: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r} is not one of {', '.join(KINDS)}")


@dataclass
class WindowOutput:
    text: str
    language: str | None = None  # the spoken language, where the model tells it (ISO 639-1 code)
    stats: WindowStats = field(default_factory=WindowStats)
    loop_cut: bool = False  # decoding fell into a loop and was cut (pipeline.models.whisper_decoding)
    words: list[Word] | None = None  # seconds from the window's start; None: the model gives no word times


class SpeechModel(Protocol):
    description: ModelDescription
    device: str

    def run(
        self, waveforms: list[np.ndarray], request: TaskRequest, reduction: ReductionConfig
    ) -> list[WindowOutput]: ...
