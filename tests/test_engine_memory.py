"""Memory-aware batching: merged caches let more rows fit; prefill transients stop growing."""

from __future__ import annotations

from pipeline.engine.memory import Footprint, footprint, max_batch
from pipeline.merging.config import ReductionConfig
from pipeline.models.qwen2_audio import build_tiny_random


def test_max_batch_counts_caches_and_bounded_prefill():
    need = Footprint(per_row=100, per_prefill_row=50, prefill_rows=4)
    assert max_batch(1000, need, reserve=0.0) == 8  # 4 prefill rows (200) + 8 rows of caches (800)
    assert max_batch(449, need, reserve=0.0) == 2
    assert max_batch(100, need, reserve=0.0) == 0


def test_merging_shrinks_the_per_row_footprint():
    stack = build_tiny_random().stack
    spans = [(10, 760)]
    plain = footprint(stack, 780, spans, ReductionConfig(), 64, fused_mass=True)
    merged = footprint(
        stack, 780, spans, ReductionConfig(method="fastadasp", target=0.5), 64, fused_mass=True
    )
    assert merged.per_row < plain.per_row
    assert merged.per_prefill_row == plain.per_prefill_row
    budget = 64 * 2**20
    assert max_batch(budget, merged) > max_batch(budget, plain)
