"""Efficiency statistics of one window, summed into one row per recording."""

from __future__ import annotations

import resource
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class WindowStats:
    """Counts and timings of one window. Times are seconds; KV bytes cover audio and text tokens.

    audio_tokens_in: audio tokens entering the first layer. audio_tokens_kept: audio tokens summed
    over layers divided by the layer count (the average per-layer length, what the KV cache holds).
    encode_s, prefill_s, decode_s: the window's shares of the passes it was in (its encoder pass,
    its prefill or prompt steps, and each decoding step: a step's time over the rows in it).
    loop_cuts: times decoding fell into a loop and was cut (a family's loop guard, e.g.
    ``pipeline.decoding.policy``); evaluation reports them, the stats table does not.
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
    loop_cuts: int = 0

    def __add__(self, other: WindowStats) -> WindowStats:
        return WindowStats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def to_dict(self) -> dict:
        return asdict(self)


def apportion(seconds: float, work: Sequence[float]) -> list[float]:
    """``seconds`` shared in proportion to ``work`` (equally where there is none); the shares sum to it."""
    total = sum(work)
    if total <= 0:
        return [seconds / len(work)] * len(work)
    return [seconds * w / total for w in work]
