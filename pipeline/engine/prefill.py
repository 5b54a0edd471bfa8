"""Merge-aware prefill over a ``DecoderStack``: the prompt through every layer, caches filled.

At a layer whose schedule ratio is positive the audio spans are reduced after attention (+ residual)
and before the MLP (``pipeline.merging.step.reduce_layer``), so that layer caches the full length and
later layers see fewer tokens; H2O instead shrinks that layer's cache per head and leaves the hidden
states alone. Every token keeps an explicit position id. Prompts come in groups that share a length and
spans (``PromptGroup``): each group prefills apart, into slots of caches the rows share
(``prefill_group``: the runner's free slots while the other rows keep decoding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.engine.cache import LayerCaches
from pipeline.engine.plan import LayerPlan, plan_layers
from pipeline.engine.stack import DecoderStack
from pipeline.merging import ops
from pipeline.merging.config import ReductionConfig
from pipeline.merging.step import MASS_USERS, LayerAttention, Span, reduce_layer

# Rows prefilled together hold at most this many tokens (at least one row): bounds transient memory.
PREFILL_TOKENS = 8192


@dataclass(frozen=True)
class PromptGroup:
    """Prompts that share a length and audio spans: embeds [B, L, D] (audio scattered in), spans."""

    embeds: Tensor
    spans: list[Span]

    @property
    def rows(self) -> int:
        return self.embeds.shape[0]

    @property
    def length(self) -> int:
        return self.embeds.shape[1]


@torch.inference_mode()
def prefill(
    stack: DecoderStack,
    groups: list[PromptGroup],
    cfg: ReductionConfig,
    max_new_tokens: int,
    prefill_tokens: int = PREFILL_TOKENS,
) -> tuple[Tensor, LayerCaches, list[LayerPlan]]:
    """Prompt groups into caches of their own (one slot per row, in group order) -> last-token logits
    [B, V], the caches, the plan of each row. Rows of different groups share the caches and can decode
    together."""
    if not groups:
        raise ValueError("no prompts to prefill")
    plans = [plan_layers(g.length, g.spans, cfg, stack.num_layers) for g in groups]
    row_plans = [plan for g, plan in zip(groups, plans, strict=True) for _ in range(g.rows)]
    first = groups[0].embeds
    caches = LayerCaches.for_rows(
        [p.cache_lengths for p in row_plans],
        max_new_tokens,
        stack.num_kv_heads,
        stack.head_dim,
        first.dtype,
        first.device,
    )
    logits, offset = [], 0
    for g, plan in zip(groups, plans, strict=True):
        slots = list(range(offset, offset + g.rows))
        logits.append(prefill_group(stack, g, cfg, plan, caches, slots, prefill_tokens))
        offset += g.rows
    return torch.cat(logits), caches, row_plans


@torch.inference_mode()
def prefill_group(
    stack: DecoderStack,
    group: PromptGroup,
    cfg: ReductionConfig,
    plan: LayerPlan,
    caches: LayerCaches,
    slots: list[int],
    prefill_tokens: int = PREFILL_TOKENS,
) -> Tensor:
    """One group's rows into ``slots`` of live caches (the other slots untouched) -> last-token logits
    [rows, V]. In chunks of at most ``prefill_tokens`` tokens (at least one row), so the transient
    activations stay bounded whatever the batch: memory then scales with the caches alone."""
    generator = torch.Generator(device=group.embeds.device).manual_seed(cfg.seed)
    chunk = max(1, prefill_tokens // group.length)
    logits = []
    for r in range(0, group.rows, chunk):
        rows = slots[r : r + chunk]
        embeds = group.embeds[r : r + chunk]
        logits.append(_prefill_rows(stack, embeds, group.spans, cfg, plan, caches, rows, generator))
    filled = {tuple(caches.row_filled(row)) for row in slots}
    if filled != {tuple(plan.cache_lengths)}:
        raise RuntimeError(f"cache lengths {sorted(filled)} differ from the plan {plan.cache_lengths}")
    return torch.cat(logits)


def _prefill_rows(
    stack: DecoderStack,
    embeds: Tensor,
    spans: list[Span],
    cfg: ReductionConfig,
    plan: LayerPlan,
    caches: LayerCaches,
    rows: list[int],
    generator: torch.Generator,
) -> Tensor:
    b, length, _ = embeds.shape
    positions = torch.arange(length, device=embeds.device).expand(b, length)
    hidden = embeds
    for i, layer in enumerate(stack.layers):
        cos, sin = stack.rope(positions)
        q, k, v = stack.qkv(layer, layer.attn_norm(hidden), cos, sin)
        ks = plan.removed[i]
        lse = None
        if any(ks) and cfg.method in MASS_USERS:
            attended, lse = stack.attend_with_lse(q, k, v)
        else:
            attended = stack.attend(q, k, v, causal=True)
        hidden = hidden + layer.o(attended)
        reduction = None
        if any(ks):
            attn = LayerAttention(q, k, v, scale=stack.scale, causal=True, lse=lse)
            hidden, k, v, reduction = reduce_layer(hidden, attn, spans, ks, cfg, generator)
        caches.fill(i, k, v, rows)
        if reduction is not None:
            if cfg.position == "right":
                positions = ops.right_aligned_positions(length, reduction.n_out, b, embeds.device)
            else:
                positions = reduction.positions(positions)
            spans = reduction.spans
        hidden = hidden + stack.mlp(layer, layer.mlp_norm(hidden))
    return stack.logits(hidden[:, -1])
