"""Merge-aware prefill and greedy decoding over a ``DecoderStack``.

Prefill runs every layer over the whole prompt; at a layer whose schedule ratio is positive the audio
spans are reduced after attention (+ residual) and before the MLP, so that layer caches the full
length and later layers see fewer tokens. H2O instead shrinks that layer's cache per head and leaves
the hidden states alone. Every token keeps an explicit position id; decoding continues at the
original prompt length whatever the merges did. Prompts come in groups that share a length and
spans (``PromptGroup``): each group prefills apart, then all rows decode in one batch, every row over
its own cache lengths, so windows of different lengths batch without padding.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pipeline.device import sync
from pipeline.engine.cache import LayerCaches
from pipeline.engine.decode import GreedyDecoder
from pipeline.engine.decoder import DecoderStack
from pipeline.kernels import span_attention_mass
from pipeline.merging import ops, schedule
from pipeline.merging.config import KV_METHODS, ReductionConfig
from pipeline.merging.ops import MASS_METHODS

# Methods whose merge layers need the attention mass: their attention also returns its log-sum-exp.
MASS_USERS = (*MASS_METHODS, *KV_METHODS)

Span = tuple[int, int]
# Rows prefilled together hold at most this many tokens (at least one row): bounds transient memory.
PREFILL_TOKENS = 8192


@dataclass
class LayerPlan:
    """What each layer removes from each span (k[layer][span]) and the lengths this predicts."""

    removed: list[list[int]]
    cache_lengths: list[int]  # whole-sequence KV length of each layer after prefill
    audio_lengths: list[int]  # audio tokens (all spans) each layer caches
    prompt_length: int  # tokens of the prompt before any reduction


def plan_layers(length: int, spans: list[Span], cfg: ReductionConfig, num_layers: int) -> LayerPlan:
    """Predict, before running anything, how many tokens each layer removes and caches."""
    _check_spans(length, spans)
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


def _check_spans(length: int, spans: list[Span]) -> None:
    if not spans:
        raise ValueError("the prompt holds no audio span")
    prev_end = 0
    for s, e in spans:
        if not prev_end <= s < e <= length:
            raise ValueError(
                f"audio span ({s}, {e}) is empty, overlaps another or lies outside the prompt of {length} tokens"
            )
        prev_end = e


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


@dataclass
class Generation:
    """tokens [B, T] (after EOS: pad id), num_tokens [B] generated per row (EOS included); plans[b]:
    row b's layer plan (rows of one PromptGroup share it)."""

    tokens: Tensor
    num_tokens: Tensor
    plans: list[LayerPlan]
    prefill_s: float = 0.0
    decode_s: float = 0.0
    kv_bytes_full: int = 0
    kv_bytes_kept: int = 0
    steady_step_s: float = 0.0  # per decode step once warmed up (after CUDA-graph capture on GPU)
    first_logits: Tensor | None = field(default=None, repr=False)


@torch.inference_mode()
def prefill(
    stack: DecoderStack,
    groups: list[PromptGroup],
    cfg: ReductionConfig,
    max_new_tokens: int,
    prefill_tokens: int = PREFILL_TOKENS,
) -> tuple[Tensor, LayerCaches, list[LayerPlan]]:
    """Prompt groups -> last-token logits [B, V] (rows in group order), filled caches, plan per row.

    Each group is prefilled apart (its rows share a length), in chunks of at most ``prefill_tokens``
    tokens (at least one row), so the transient activations stay bounded whatever the batch: memory
    then scales with the caches alone. Rows of different groups share the caches and decode together.
    """
    if not groups:
        raise ValueError("no prompts to prefill")
    plans = [plan_layers(g.length, g.spans, cfg, stack.num_layers) for g in groups]
    row_plans = [plan for g, plan in zip(groups, plans, strict=True) for _ in range(g.rows)]
    first = groups[0].embeds
    caches = LayerCaches(
        [p.cache_lengths for p in row_plans],
        max_new_tokens,
        stack.num_kv_heads,
        stack.head_dim,
        first.dtype,
        first.device,
    )
    logits, offset = [], 0
    for g, plan in zip(groups, plans, strict=True):
        generator = torch.Generator(device=g.embeds.device).manual_seed(cfg.seed)
        chunk = max(1, prefill_tokens // g.length)
        for r in range(0, g.rows, chunk):
            rows = slice(offset + r, offset + min(r + chunk, g.rows))
            embeds = g.embeds[r : r + chunk]
            logits.append(_prefill_rows(stack, embeds, g.spans, cfg, plan, caches, rows, generator))
        offset += g.rows
    caches.check_filled()
    return torch.cat(logits), caches, row_plans


def _prefill_rows(
    stack: DecoderStack,
    embeds: Tensor,
    spans: list[Span],
    cfg: ReductionConfig,
    plan: LayerPlan,
    caches: LayerCaches,
    rows: slice,
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
        if any(ks) and cfg.method in KV_METHODS:
            k, v = _h2o_evict(stack, q, k, v, lse, spans, ks, cfg)
        caches.fill(i, k, v, rows)
        if any(ks) and cfg.method not in KV_METHODS:
            reduction = _plan_reduction(stack, q, k, lse, spans, ks, cfg, generator)
            hidden = reduction.apply(hidden)
            if cfg.position == "right":
                positions = ops.right_aligned_positions(length, reduction.n_out, b, embeds.device)
            else:
                positions = reduction.positions(positions)
            spans = reduction.spans
        hidden = hidden + stack.mlp(layer, layer.mlp_norm(hidden))
    return stack.logits(hidden[:, -1])


def _span_mass(
    stack: DecoderStack, q: Tensor, k: Tensor, lse: Tensor, span: Span, cfg: ReductionConfig, per_head: bool
) -> Tensor:
    """Attention mass the keys of one span receive: [B, S] or per KV head [B, Hkv, S]; lse [B, H, L]
    from this layer's attention."""
    start = span[1] if cfg.mass == "tail" else 0
    if start >= q.shape[2]:
        raise ValueError("mass='tail' needs text after the audio span to use as queries")
    return span_attention_mass(
        q[:, :, start:],
        k,
        scale=stack.scale,
        causal=True,
        span=span,
        query_start=start,
        per_head=per_head,
        lse=lse[:, :, start:],
    )


def _plan_reduction(
    stack: DecoderStack,
    q: Tensor,
    k: Tensor,
    lse: Tensor | None,
    spans: list[Span],
    ks: list[int],
    cfg: ReductionConfig,
    generator: torch.Generator,
) -> ops.Reduction:
    b, _, length, _ = k.shape
    mass = None
    if cfg.method in MASS_METHODS:
        mass = torch.zeros(b, length, dtype=torch.float32, device=k.device)
        for span, n in zip(spans, ks, strict=True):
            if n:
                mass[:, span[0] : span[1]] = _span_mass(stack, q, k, lse, span, cfg, per_head=False)
    return ops.plan_reduction(
        cfg.method, length, spans, ks, keys=k, mass=mass, generator=generator, max_chain=cfg.max_chain
    )


def _h2o_evict(
    stack: DecoderStack,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lse: Tensor,
    spans: list[Span],
    ks: list[int],
    cfg: ReductionConfig,
) -> tuple[Tensor, Tensor]:
    """Keep, per KV head, the most attended keys of each span: k, v [B, Hkv, L, hd] -> [B, Hkv, L - sum(ks), hd]."""
    keep = []
    prev = 0
    for span, n in zip(spans, ks, strict=True):
        keep.append(torch.arange(prev, span[0], device=k.device).expand(*k.shape[:2], -1))
        scores = _span_mass(stack, q, k, lse, span, cfg, per_head=True)
        keep.append(ops.h2o_keep_indices(scores, n) + span[0])
        prev = span[1]
    keep.append(torch.arange(prev, k.shape[2], device=k.device).expand(*k.shape[:2], -1))
    index = torch.cat(keep, dim=2)[..., None].expand(-1, -1, -1, k.shape[-1])
    return k.gather(2, index), v.gather(2, index)


@torch.inference_mode()
def generate(
    stack: DecoderStack,
    groups: list[PromptGroup],
    cfg: ReductionConfig,
    *,
    max_new_tokens: int,
    eos_token_ids: list[int],
    pad_token_id: int,
) -> Generation:
    """Greedy decoding of every row of the prompt groups, all rows in one decode batch.

    -> Generation with tokens [B, max_new_tokens or fewer], rows in group order. Groups of different
    lengths prefill apart and decode together, each row attending to its own cache lengths, so a
    row's tokens do not depend on the other rows. Rows stop at any EOS id; the loop ends when all
    rows have stopped or the budget is spent.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    device = groups[0].embeds.device if groups else torch.device("cpu")
    sync(device)
    t0 = time.perf_counter()
    logits, caches, plans = prefill(stack, groups, cfg, max_new_tokens)
    tokens = logits.argmax(-1)
    sync(device)
    t1 = time.perf_counter()
    prompt_lengths = torch.tensor([g.length for g in groups for _ in range(g.rows)], device=device)
    decoder = GreedyDecoder(
        stack,
        caches,
        prompt_lengths,
        tokens,
        max_new_tokens=max_new_tokens,
        eos_token_ids=eos_token_ids,
        pad_token_id=pad_token_id,
    )
    out, steps = decoder.run()
    sync(device)
    t2 = time.perf_counter()
    eos = decoder.eos
    stopped_at = torch.where(torch.isin(out[:, :steps], eos), torch.arange(steps, device=device), steps).amin(
        -1
    )
    num_tokens = torch.clamp(stopped_at + 1, max=steps)
    steps = int(num_tokens.max())
    return Generation(
        tokens=out[:, :steps],
        num_tokens=num_tokens,
        plans=plans,
        prefill_s=t1 - t0,
        decode_s=t2 - t1,
        kv_bytes_full=sum(g.rows * g.length for g in groups) * stack.num_layers * stack.kv_bytes_per_token(),
        kv_bytes_kept=caches.nbytes(),
        steady_step_s=decoder.steady_s / max(decoder.steady_steps, 1),
        first_logits=logits,
    )
