"""Memory-aware batching: how many windows of one shape fit in the free device memory.

Merging shortens every later layer's cache, so the same memory holds more concurrent windows; this
is where most of FastAdaSP's throughput gain comes from in a memory-bound decoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.engine.decoder import DecoderStack
from pipeline.engine.generate import Span, plan_layers
from pipeline.merging.config import ReductionConfig

# Bytes of fp32 scores in one attention-mass query block (B x Hq x block x L); mass.py uses block=512.
MASS_BLOCK = 512


@dataclass(frozen=True)
class RowFootprint:
    """Device bytes one batch row needs: its KV caches and the prefill's transient activations."""

    kv_bytes: int
    prefill_bytes: int

    @property
    def total(self) -> int:
        return self.kv_bytes + self.prefill_bytes


def row_footprint(
    stack: DecoderStack, length: int, spans: list[Span], cfg: ReductionConfig, max_new_tokens: int
) -> RowFootprint:
    """Per-row bytes for a prompt of ``length`` tokens with ``spans`` under ``cfg``.

    KV: every layer's planned prefill length plus the decode budget (the caches are preallocated).
    Prefill peak (first layer, the longest): hidden + residual, the fused qkv, the MLP's gate/up and
    product, and the fp32 attention-mass scores of one query block, in the model's dtype.
    """
    plan = plan_layers(length, spans, cfg, stack.num_layers)
    kv = sum(n + max_new_tokens for n in plan.cache_lengths) * stack.kv_bytes_per_token()
    item = stack.embed_tokens.weight.element_size()
    intermediate = stack.layers[0].gate_up_weight.shape[0]
    qkv = (stack.num_heads + 2 * stack.num_kv_heads) * stack.head_dim
    activations = length * (3 * stack.hidden_size + qkv + 2 * intermediate) * item
    mass = stack.num_heads * min(MASS_BLOCK, length) * length * 4 if cfg.enabled else 0
    return RowFootprint(kv_bytes=kv, prefill_bytes=activations + mass)


def max_batch(free_bytes: int, footprint: RowFootprint, reserve: float = 0.1, limit: int = 256) -> int:
    """Largest batch whose rows fit in ``free_bytes`` with ``reserve`` kept free (0 if none fits)."""
    usable = int(free_bytes * (1.0 - reserve))
    return max(0, min(limit, usable // footprint.total))


def free_device_bytes(device: torch.device) -> int:
    """Free bytes on a CUDA device (what the allocator can still get)."""
    if device.type != "cuda":
        raise ValueError("free memory is only known for CUDA devices; pass a budget explicitly")
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
