"""Layer planning: before anything runs, how many audio tokens each layer removes and caches.

The plan sizes the per-layer caches (``pipeline.engine.cache``), the memory a batch needs
(``pipeline.engine.memory``) and is checked against what prefill filled.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.merging import schedule
from pipeline.merging.config import ReductionConfig
from pipeline.merging.ops import check_spans
from pipeline.merging.step import Span


@dataclass
class LayerPlan:
    """What each layer removes from each span (k[layer][span]) and the lengths this predicts."""

    removed: list[list[int]]
    cache_lengths: list[int]  # whole-sequence KV length of each layer after prefill
    audio_lengths: list[int]  # audio tokens (all spans) each layer caches
    prompt_length: int  # tokens of the prompt before any reduction


def plan_layers(length: int, spans: list[Span], cfg: ReductionConfig, num_layers: int) -> LayerPlan:
    """Predict, before running anything, how many tokens each layer removes and caches."""
    if not spans:
        raise ValueError("the prompt holds no audio span")
    check_spans(length, spans)
    audio = sum(e - s for s, e in spans)
    if not cfg.enabled:
        return LayerPlan([[0] * len(spans)] * num_layers, [length] * num_layers, [audio] * num_layers, length)
    ratios = schedule.resolve_ratios(cfg, num_layers)
    per_span = [schedule.removed_counts(e - s, ratios, cfg.method) for s, e in spans]
    per_span_len = [schedule.span_lengths(e - s, ratios, cfg.method) for s, e in spans]
    removed = [[counts[i] for counts in per_span] for i in range(num_layers)]
    audio_lengths = [sum(lens[i] for lens in per_span_len) for i in range(num_layers)]
    cache = [length - audio + a for a in audio_lengths]
    return LayerPlan(removed, cache, audio_lengths, length)
