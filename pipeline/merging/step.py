"""One layer's reduction applied to its hidden states: the merge step of every loop that reduces.

The decoder's prefill (``pipeline.engine.prefill``) and Whisper's encoder
(``pipeline.models.whisper_encoder``) each run a layer's attention, add the residual, and hand what
the attention computed to ``reduce_layer`` before the MLP. It scores the audio spans (attention mass
and key similarity, as the method needs), plans the layer's ``Reduction`` and applies it, or, for
``h2o``, evicts keys from what the layer caches and leaves the hidden states alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.kernels.attention_mass import attention_mass
from pipeline.merging.config import KV_METHODS, ReductionConfig
from pipeline.merging.ops import MASS_METHODS, Reduction, h2o_keep_indices, plan_reduction

# Methods whose reducing layers need the attention mass: their attention also returns its log-sum-exp.
MASS_USERS = (*MASS_METHODS, *KV_METHODS)

Span = tuple[int, int]


@dataclass(frozen=True)
class LayerAttention:
    """What one layer's attention computed, as the merge step reads it.

    q [B, H, L, hd]; k, v [B, Hkv, L, hd]: the layer's keys and values (what its cache keeps; v only
    where a KV method may evict); scale: of the scores q.k (1.0 for queries scaled beforehand); causal;
    lse [B, H, L] fp32: each query's log-sum-exp from the attention, or None (the mass then computes
    it); keys: the keys similarity reads, [B, L, D] heads concatenated or [B, Hkv, L, hd] (default: k).
    """

    q: Tensor
    k: Tensor
    v: Tensor | None
    scale: float
    causal: bool
    lse: Tensor | None = None
    keys: Tensor | None = None


def reduce_layer(
    hidden: Tensor,
    attn: LayerAttention,
    spans: list[Span],
    ks: list[int],
    cfg: ReductionConfig,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor, Tensor | None, Reduction | None]:
    """hidden [B, L, D] after attention + residual -> (hidden, k, v, reduction).

    Merges and evictions: hidden [B, L - sum(ks), D] and the plan (its spans and positions for the
    next layer); k, v unchanged (the layer caches its full length). ``h2o``: hidden unchanged, k and v
    [B, Hkv, L - sum(ks), hd] (per KV head the most attended keys of each span), no plan.
    spans: audio spans (start, end) shared by the rows; ks[i]: tokens span i loses.
    """
    if cfg.method in KV_METHODS:
        k, v = _h2o_evict(attn, spans, ks, cfg)
        return hidden, k, v, None
    b, _, length, _ = attn.k.shape
    mass = None
    if cfg.method in MASS_METHODS:
        mass = torch.zeros(b, length, dtype=torch.float32, device=attn.k.device)
        for span, n in zip(spans, ks, strict=True):
            if n:
                mass[:, span[0] : span[1]] = _span_mass(attn, span, cfg, per_head=False)
    reduction = plan_reduction(
        cfg.method,
        length,
        spans,
        ks,
        keys=attn.k if attn.keys is None else attn.keys,
        mass=mass,
        generator=generator,
        max_chain=cfg.max_chain,
    )
    return reduction.apply(hidden), attn.k, attn.v, reduction


def _span_mass(attn: LayerAttention, span: Span, cfg: ReductionConfig, per_head: bool) -> Tensor:
    """Attention mass the keys of one span receive: [B, S] or per KV head [B, Hkv, S]; ``tail`` takes
    only the queries after the span."""
    start = span[1] if cfg.mass == "tail" else 0
    if start >= attn.q.shape[2]:
        raise ValueError("mass='tail' needs text after the audio span to use as queries")
    return attention_mass(
        attn.q[:, :, start:],
        attn.k,
        scale=attn.scale,
        causal=attn.causal,
        span=span,
        query_start=start,
        per_head=per_head,
        lse=None if attn.lse is None else attn.lse[:, :, start:],
    )


def _h2o_evict(
    attn: LayerAttention, spans: list[Span], ks: list[int], cfg: ReductionConfig
) -> tuple[Tensor, Tensor]:
    """Keep, per KV head, the most attended keys of each span: k, v [B, Hkv, L, hd] -> [B, Hkv, L - sum(ks), hd]."""
    k, v = attn.k, attn.v
    if v is None:
        raise ValueError(f"method={cfg.method!r} evicts from the KV cache: the merge step needs the values")
    keep = []
    prev = 0
    for span, n in zip(spans, ks, strict=True):
        keep.append(torch.arange(prev, span[0], device=k.device).expand(*k.shape[:2], -1))
        scores = _span_mass(attn, span, cfg, per_head=True)
        keep.append(h2o_keep_indices(scores, n) + span[0])
        prev = span[1]
    keep.append(torch.arange(prev, k.shape[2], device=k.device).expand(*k.shape[:2], -1))
    index = torch.cat(keep, dim=2)[..., None].expand(-1, -1, -1, k.shape[-1])
    return k.gather(2, index), v.gather(2, index)
