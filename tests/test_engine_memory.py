"""Memory-aware batching: merged caches let more rows fit; prefill transients stop growing; the
Qwen2-Audio adapter batches by it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.engine.batching import fit_batch
from pipeline.engine.memory import Footprint, footprint, max_batch
from pipeline.merging.config import ReductionConfig
from pipeline.models.tiny_random import build_tiny_random
from pipeline.tasks import TaskRequest


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
    # Grouped KV heads (4 query, 2 KV): merge layers' attention takes K and V repeated per query head.
    item = stack.embed_tokens.weight.element_size()
    assert merged.per_prefill_row - plain.per_prefill_row == 2 * stack.num_heads * 780 * stack.head_dim * item
    assert stack.num_heads != stack.num_kv_heads
    budget = 64 * 2**20
    assert max_batch(budget, merged) > max_batch(budget, plain)


def _tower_batches(qwen) -> list[int]:
    """Batch sizes the audio tower sees: one forward per generate call."""
    seen: list[int] = []
    qwen.model.model.audio_tower.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[0]))
    return seen


def batch_size(qwen, prompt: str, count: int, cfg: ReductionConfig) -> int:
    """What the adapter asks the engine for a window of ``count`` audio tokens."""
    ids, spans = qwen.prompt(prompt, [count])
    return fit_batch(qwen.stack, len(ids), spans, cfg, qwen.max_new_tokens, qwen.batch_size)


def test_adapter_batches_windows_of_any_length_up_to_its_size():
    qwen = build_tiny_random()
    qwen.max_new_tokens, qwen.batch_size = 2, 4
    seen = _tower_batches(qwen)
    rng = np.random.default_rng(0)
    seconds = [1.0, 2.5, 0.5, 1.7, 3.0, 1.0, 2.2, 0.8, 1.3, 2.0]  # mixed lengths batch together
    waves = [(0.1 * rng.standard_normal(int(16000 * t))).astype(np.float32) for t in seconds]
    outputs = qwen.run(waves, TaskRequest("asr"), ReductionConfig())
    assert len(outputs) == 10 and seen == [4, 4, 2]
    # Longest first: each output belongs to its own window.
    assert [o.stats.audio_seconds for o in outputs] == seconds
    assert batch_size(qwen, "<|audio_bos|><|AUDIO|><|audio_eos|>", 25, ReductionConfig()) == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_adapter_batch_follows_free_memory_on_cuda():
    qwen = build_tiny_random().to("cuda")
    prompt, count = "<|audio_bos|><|AUDIO|><|audio_eos|>Transcribe:", 750
    plain = batch_size(qwen, prompt, count, ReductionConfig())
    merged = batch_size(qwen, prompt, count, ReductionConfig(method="fastadasp", target=0.5))
    assert 1 <= plain <= merged  # merged caches are shorter: at least as many windows fit
    qwen.batch_size = 3
    assert batch_size(qwen, prompt, count, ReductionConfig()) == min(3, plain)


def test_token_counts_from_lengths_match_the_feature_mask():
    """The adapter sizes and groups windows from their lengths, without computing mel features."""
    qwen = build_tiny_random()
    waves = [np.zeros(n, np.float32) for n in (1, 159, 160, 161, 16000, 16001, 33333, 479_999, 480_000)]
    _, mask = qwen.features(waves)
    _, from_mask = qwen.model.model.audio_tower._get_feat_extract_output_lengths(mask.sum(-1))
    assert qwen.audio_token_counts(waves) == from_mask.tolist()
