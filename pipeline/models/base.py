"""The contract between the pipeline and a model family.

A family is one module in ``pipeline/models/`` that provides:

- ``MODEL_TYPES``: the ``model_type`` values of ``config.json`` it serves;
- ``describe(checkpoint) -> ModelDescription``: read from the checkpoint's config files alone, never its
  weights (the driver, presets, evaluate and generate ask this before any model exists);
- ``load(checkpoint, device, dtype) -> SpeechModel``: the loaded adapter, holding the description it was
  built with; ``dtype=INT8`` asks for dynamic int8 quantization, which only families whose description
  lists ``int8`` in its ``dtypes`` accept.

``check_request`` is the one capability check: the jobs call it on the description before any work,
and every adapter calls it as a request reaches ``run``.

A ``SpeechModel`` turns a batch of mono float32 waveforms at ``sample_rate`` (each at most
``max_window_s`` long) plus a task into one ``WindowOutput`` per waveform. Decoder-only SpeechLMs share
``pipeline.models.speechlm.AudioLanguageModel`` and supply only their audio encoder call and prompt.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from pipeline.decoding.scheduler import Feed, Request, Scheduler
from pipeline.errors import Refusal
from pipeline.merging.config import ReductionConfig
from pipeline.stats import WindowStats
from pipeline.tasks import TaskError, TaskRequest, language_code
from pipeline.timing import Word

KINDS = ("base", "instruct")
# Every family here hears through a Whisper-style log-mel front end: 16 kHz audio, 30 s of it per window.
SAMPLE_RATE = 16000
WINDOW_S = 30.0
# The dtype that asks for dynamic int8 quantization (int8 weights, activations quantized per call; CPU).
INT8 = torch.qint8


class ModelError(Refusal, ValueError):
    """A model name, folder or checkpoint cannot be used; the message says why and what would work."""


class ModelTaskError(TaskError):
    """The model cannot do the request (task, language, timestamps, dtype); raised before any work."""


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
    (empty: any the prompt can name); multilingual: hears languages other than English, languages: the
    spoken-language codes it knows (empty: any); padding: the ``ReductionConfig.padding`` policies its
    encoder implements (an encoder that pads every window to its full length); dtypes: weight variants
    it loads besides its float ones (``int8``: ``dtype=INT8`` on CPU); word_times: gives word times
    (``TaskRequest.timestamps`` ``words``; Whisper checkpoints that name their alignment heads).
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
    languages: tuple[str, ...] = ()
    padding: tuple[str, ...] = ("keep",)
    dtypes: tuple[str, ...] = ()
    word_times: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r} is not one of {', '.join(KINDS)}")


def check_request(
    model: ModelDescription,
    request: TaskRequest,
    dtype: str | None = None,
    reduction: ReductionConfig | None = None,
) -> None:
    """Refuse what ``model`` cannot do with ``request`` (with weights of ``dtype``, e.g. ``int8``, and
    ``reduction``'s padding policy), naming what it can: ModelTaskError."""
    name = repr(model.name)
    if request.task not in model.tasks:
        raise ModelTaskError(
            f"model {name} cannot do task {request.task!r} (it does: {', '.join(sorted(model.tasks))})"
        )
    target = request.target_language
    if target and model.translate_to and language_code(target) not in model.translate_to:
        raise ModelTaskError(
            f"model {name} translates only into {', '.join(model.translate_to)}, not {target!r}"
        )
    spoken = request.language
    if spoken and not model.multilingual and language_code(spoken) != "en":
        raise ModelTaskError(f"model {name} is English-only; --language {spoken!r}")
    if spoken and model.languages and language_code(spoken) not in model.languages:
        raise ModelTaskError(f"language={spoken!r}: model {name} knows {', '.join(sorted(model.languages))}")
    if request.timestamps == "words" and not model.word_times:
        raise ModelTaskError(
            f"model {name} gives no word times (--timestamps words needs a Whisper checkpoint naming its "
            f"alignment heads); use --timestamps segments or none"
        )
    if dtype is not None and dtype not in model.dtypes:
        raise ModelTaskError(f"model {name} has no {dtype} variant (--{dtype} is for Whisper models)")
    if reduction is not None and reduction.padding not in model.padding:
        raise ModelTaskError(
            f"model {name} has no padding policy {reduction.padding!r} (it has: {', '.join(model.padding)})"
        )


@dataclass
class WindowOutput:
    text: str
    language: str | None = None  # the spoken language, where the model tells it (ISO 639-1 code)
    stats: WindowStats = field(default_factory=WindowStats)
    words: list[Word] | None = None  # seconds from the window's start; None: the model gives no word times


# A stream's source: pull(block) -> (key, waveform) pairs that arrived (blocking for one when block is
# set), None once no more will come. Its sink: emit(key, output or the exception that failed it).
Pull = Callable[[bool], list[tuple[Any, np.ndarray]] | None]
Emit = Callable[[Any, "WindowOutput | Exception"], None]


def once(items: list[tuple[Any, np.ndarray]]) -> Pull:
    """A source that gives ``items`` at the first pull and then closes."""
    left = [items]
    return lambda _block: left.pop() if left else None


class SpeechModel(Protocol):
    """run: a list of windows, outputs in order. stream: windows as they arrive, each output as it is
    ready (continuous batching: pipeline/decoding/scheduler.py)."""

    description: ModelDescription
    device: str
    batch_size: int | None  # rows decoding at once (None: as many as the device's memory holds)

    def run(
        self, waveforms: list[np.ndarray], request: TaskRequest, reduction: ReductionConfig
    ) -> list[WindowOutput]: ...

    def stream(self, pull: Pull, request: TaskRequest, reduction: ReductionConfig, emit: Emit) -> None: ...


def check_window(key: object, wave: np.ndarray, max_s: float) -> None:
    """A window is mono and at most ``max_s`` seconds long: else the ValueError its output becomes."""
    if wave.ndim != 1 or len(wave) > max_s * SAMPLE_RATE:
        raise ValueError(f"waveform {key} has shape {wave.shape}: expected mono, at most {max_s:g} s")


def run_streamed(
    model: SpeechModel, waveforms: list[np.ndarray], request: TaskRequest, reduction: ReductionConfig
) -> list[WindowOutput]:
    """``run`` as one stream of the windows, longest first (the shortest drain the queue), outputs in
    order; a waveform that is not a window raises before any work."""
    for i, wave in enumerate(waveforms):
        check_window(i, wave, WINDOW_S)
    order = sorted(range(len(waveforms)), key=lambda i: -len(waveforms[i]))
    outputs: dict[int, WindowOutput] = {}
    model.stream(once([(i, waveforms[i]) for i in order]), request, reduction, outputs.__setitem__)
    return [outputs[i] for i in range(len(waveforms))]


def window_feed(pull: Pull, emit: Emit) -> Feed:
    """A scheduler's feed from a stream's ``pull``: each arriving waveform a request (``work``), and one
    that is not a window its ValueError, emitted at once."""

    def feed(scheduler: Scheduler, block: bool) -> bool:
        items = pull(block)
        if items is None:
            return False
        for key, wave in items:
            try:
                check_window(key, wave, WINDOW_S)
            except ValueError as err:
                emit(key, err)
                continue
            scheduler.add([Request(key=key, work=wave)])
        return True

    return feed
