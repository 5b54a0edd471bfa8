"""Efficiency statistics of one window, summed into one row per recording."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class WindowStats:
    """Counts and timings of one window. Times are seconds; KV bytes cover audio and text tokens.

    audio_tokens_in: audio tokens entering the first layer. audio_tokens_kept: audio tokens summed
    over layers divided by the layer count (the average per-layer length, what the KV cache holds).
    """

    audio_seconds: float = 0.0
    audio_tokens_in: int = 0
    audio_tokens_kept: float = 0.0
    kv_bytes_full: int = 0
    kv_bytes_kept: int = 0
    encode_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    generated_tokens: int = 0

    def __add__(self, other: WindowStats) -> WindowStats:
        return WindowStats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def to_dict(self) -> dict:
        return asdict(self)
