"""Attention mass: how much attention each key of an audio span receives, computed blockwise.

The weights of FastAdaSP's merge and FastV's / H2O's eviction scores. Only merge layers need it, so it
is computed apart from the model's fused attention, one block of queries at a time: peak memory is
B x Hq x block x Lk fp32 scores, never B x Hq x Lq x Lk.
"""

from __future__ import annotations

import torch
from torch import Tensor


def attention_mass(
    q: Tensor,
    k: Tensor,
    *,
    scale: float,
    causal: bool,
    span: tuple[int, int],
    query_start: int = 0,
    block: int = 512,
    per_head: bool = False,
) -> Tensor:
    """Mass each key in ``span`` [s, e) receives, summed over queries (and heads).

    q [B, Hq, Lq, D]: queries at absolute positions query_start .. query_start+Lq-1;
    k [B, Hkv, Lk, D]: keys at positions 0 .. Lk-1 (GQA: Hq a multiple of Hkv, query head h uses
    key head h // (Hq/Hkv)). Softmax over all keys (key j visible to query p iff j <= p when causal).
    Returns [B, e-s] fp32, or [B, Hkv, e-s] when per_head (the query heads of one group summed).
    """
    batch, q_heads, q_len, dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    start, end = span
    if k.shape[0] != batch or k.shape[3] != dim or q_heads % kv_heads:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} do not match (B, heads, D)")
    if not 0 <= start < end <= k_len:
        raise ValueError(f"span ({start}, {end}) lies outside the {k_len} keys")
    if causal and query_start + q_len > k_len:
        raise ValueError(f"causal queries up to position {query_start + q_len - 1} need that many keys")
    if block < 1:
        raise ValueError(f"block={block} must be >= 1")
    group = q_heads // kv_heads
    keys = k.float()
    total = torch.zeros((batch, kv_heads, end - start), dtype=torch.float32, device=q.device)
    for first in range(0, q_len, block):
        last = min(first + block, q_len)  # exclusive, in q's own indexing
        top = query_start + last  # causal: keys at positions >= top are invisible to the whole block
        if causal and top <= start:
            continue  # no query of this block sees the span
        visible = min(top, k_len) if causal else k_len
        queries = q[:, :, first:last].float().reshape(batch, kv_heads, group * (last - first), dim)
        scores = torch.matmul(queries, keys[:, :, :visible].transpose(-1, -2)).mul_(scale)
        if causal:
            pos = torch.arange(query_start + first, query_start + last, device=q.device)
            hidden = torch.arange(visible, device=q.device)[None, :] > pos[:, None]  # [block, visible]
            scores.view(batch, kv_heads, group, last - first, visible).masked_fill_(hidden, float("-inf"))
        norm = scores.logsumexp(dim=-1, keepdim=True)
        span_end = min(end, visible)
        total[..., : span_end - start] += (scores[..., start:span_end] - norm).exp_().sum(dim=2)
    return total if per_head else total.sum(dim=1)
