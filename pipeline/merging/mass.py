"""Attention mass: how much attention each key of an audio span receives, computed blockwise.

The weights of FastAdaSP's merge and FastV's / H2O's eviction scores. Only merge layers need it, so it
is computed apart from the model's fused attention, one block of queries at a time: the large buffers
are one block's B x Hq x block x Lk fp32 scores and their softmax, never B x Hq x Lq x Lk.
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
    total = torch.zeros((batch, kv_heads, end - start), dtype=torch.float32, device=q.device)
    # On CUDA, half-precision products run on tensor cores with fp32 output; elsewhere in fp32.
    tensor_cores = q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and k.dtype == q.dtype
    keys = (k if tensor_cores else k.float()).reshape(batch * kv_heads, k_len, dim)
    for first in range(0, q_len, block):
        last = min(first + block, q_len)  # exclusive, in q's own indexing
        pos = query_start + first  # absolute position of the block's first query
        if causal and query_start + last <= start:
            continue  # no query of this block sees the span
        visible = min(query_start + last, k_len) if causal else k_len
        queries = q[:, :, first:last].reshape(batch * kv_heads, group * (last - first), dim)
        span_end = min(end, visible)
        mass = _block_mass(
            queries, keys[:, :visible], scale, pos if causal else None, last - first, start, span_end
        )
        total[..., : span_end - start] += mass.view(batch, kv_heads, -1)
    return total if per_head else total.sum(dim=1)


def _block_mass(
    queries: Tensor, keys: Tensor, scale: float, causal_from: int | None, n: int, start: int, end: int
) -> Tensor:
    """queries [BH, G*n, D] (n queries of each of G heads), keys [BH, V, D] -> [BH, end-start] fp32, the
    softmax probabilities of keys start..end-1 summed over the queries. causal_from: absolute position of
    the first query (keys beyond a query's position are masked). A function of its own so that the
    block's buffers are freed before the next block is computed."""
    # Scaling q in its own precision rounds no more than q itself was rounded.
    scaled = (queries.float() * scale).to(keys.dtype)
    if keys.dtype == torch.float32:
        scores = torch.bmm(scaled, keys.transpose(1, 2))
    else:
        scores = torch.bmm(scaled, keys.transpose(1, 2), out_dtype=torch.float32)
    if causal_from is not None and causal_from < keys.shape[1]:
        # Only keys at or after the first query's position can be hidden from some query of the block.
        tail = keys.shape[1] - causal_from
        hidden = (
            torch.arange(tail, device=keys.device)[None, :] > torch.arange(n, device=keys.device)[:, None]
        )
        grouped = scores.view(scores.shape[0], -1, n, keys.shape[1])
        grouped[..., causal_from:].masked_fill_(hidden, float("-inf"))
    return scores.softmax(dim=-1)[..., start:end].sum(dim=1)
