"""The contract between the pipeline and a model adapter.

An adapter turns a batch of mono float32 waveforms at ``sample_rate`` (each at most ``max_window_s``
long) plus a task into one ``WindowOutput`` per waveform. Everything model-specific (feature
extraction, prompts, merging hooks, decoding) stays behind this interface so that workers/ and jobs/
never import a model family directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from pipeline.merging.config import ReductionConfig
from pipeline.stats import WindowStats
from pipeline.tasks import TaskRequest


@dataclass
class WindowOutput:
    text: str
    language: str | None = None  # the spoken language, where the model tells it (ISO 639-1 code)
    stats: WindowStats = field(default_factory=WindowStats)


class SpeechModel(Protocol):
    name: str
    sample_rate: int
    max_window_s: float
    tasks: frozenset[str]
    device: str

    def run(
        self, waveforms: list[np.ndarray], request: TaskRequest, reduction: ReductionConfig
    ) -> list[WindowOutput]: ...
