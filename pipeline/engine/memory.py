"""Memory-aware batching: how many windows of one shape fit in the free device memory.

Merging shortens every later layer's cache, so the same memory holds more concurrent windows; this
is where most of FastAdaSP's throughput gain comes from in a memory-bound decoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.engine.plan import plan_layers
from pipeline.engine.prefill import PREFILL_TOKENS
from pipeline.engine.stack import DecoderStack
from pipeline.merging.config import ReductionConfig
from pipeline.merging.step import MASS_USERS, Span

# Query block of the PyTorch attention-mass path (pipeline.kernels.attention_mass.attention_mass_torch): its fp32 scores are
# B x Hq x block x L. The Triton kernel keeps scores on chip and needs no such buffer.
MASS_BLOCK = 512


@dataclass(frozen=True)
class Footprint:
    """Device bytes a batch of one prompt shape needs beyond the weights: per row, the preallocated
    KV caches and the logits; per row of one prefill group (at most ``prefill_rows`` rows), the
    transient prefill activations."""

    per_row: int
    per_prefill_row: int
    prefill_rows: int


def footprint(
    stack: DecoderStack,
    length: int,
    spans: list[Span],
    cfg: ReductionConfig,
    max_new_tokens: int,
    fused_mass: bool = False,
) -> Footprint:
    """Bytes for prompts of ``length`` tokens with ``spans`` under ``cfg`` (see ``Footprint``).

    Prefill transient per row (first layer, the longest): hidden + residual + attention output, the
    fused qkv, the MLP's gate/up and product; at merge layers that need the attention mass, the fp32
    scores of one query block unless the fused Triton mass kernel runs (``fused_mass``), and K and V
    repeated per query head (grouped-KV models) for the attention that returns its log-sum-exp.
    """
    plan = plan_layers(length, spans, cfg, stack.num_layers)
    kv = sum(n + max_new_tokens for n in plan.cache_lengths) * stack.kv_bytes_per_token()
    logits = stack.lm_head.weight.shape[0] * 4
    item = stack.embed_tokens.weight.element_size()
    intermediate = stack.layers[0].gate_up_weight.shape[0]
    qkv = (stack.num_heads + 2 * stack.num_kv_heads) * stack.head_dim
    activations = length * (3 * stack.hidden_size + qkv + 3 * intermediate // 2) * item
    mass = 0
    if cfg.enabled and cfg.method in MASS_USERS:
        if not fused_mass:
            mass = stack.num_heads * min(MASS_BLOCK, length) * length * 4
        if stack.num_heads != stack.num_kv_heads:  # attention_with_lse takes K and V per query head
            mass += 2 * stack.num_heads * length * stack.head_dim * item
    return Footprint(kv + logits, activations + mass, max(1, PREFILL_TOKENS // length))


def max_batch(free_bytes: int, need: Footprint, reserve: float = 0.1, limit: int = 256) -> int:
    """Largest batch that fits in ``free_bytes`` with a ``reserve`` share kept free (0 if none fits)."""
    usable = int(free_bytes * (1.0 - reserve))
    batch = usable // (need.per_row + need.per_prefill_row)
    if batch > need.prefill_rows:  # prefill groups stop growing: only the caches scale further
        batch = (usable - need.prefill_rows * need.per_prefill_row) // need.per_row
    return max(0, min(limit, batch))


def free_device_bytes(device: torch.device) -> int:
    """Free bytes on a CUDA device (what the allocator can still get)."""
    if device.type != "cuda":
        raise ValueError("free memory is only known for CUDA devices; pass a budget explicitly")
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
