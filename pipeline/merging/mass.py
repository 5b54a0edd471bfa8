"""Attention mass: how much attention each key of an audio span receives, computed blockwise.

The weights of FastAdaSP's merge and FastV's / H2O's eviction scores. Only merge layers need it, so it
is computed apart from the model's fused attention, one block of queries at a time: the large buffers
are one block's B x Hq x block x Lk fp32 scores and their softmax, never B x Hq x Lq x Lk.

When the caller's attention already gave each query's log-sum-exp (``lse``), only the span's columns
are scored: p = exp(s - lse), B x Hq x block x S per block, and no pass over the other keys.
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
    lse: Tensor | None = None,
) -> Tensor:
    """Mass each key in ``span`` [s, e) receives, summed over queries (and heads).

    q [B, Hq, Lq, D]: queries at absolute positions query_start .. query_start+Lq-1;
    k [B, Hkv, Lk, D]: keys at positions 0 .. Lk-1 (GQA: Hq a multiple of Hkv, query head h uses
    key head h // (Hq/Hkv)). Softmax over all keys (key j visible to query p iff j <= p when causal).
    Returns [B, e-s] fp32, or [B, Hkv, e-s] when per_head (the query heads of one group summed).
    lse [B, Hq, Lq] fp32: each query's natural-log log-sum-exp of its scaled scores over the keys it
    sees, as fused attention returns it (``pipeline.kernels.attention_with_lse``); computed if None.
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
    if lse is not None and lse.shape != q.shape[:3]:
        raise ValueError(f"lse {tuple(lse.shape)} must be [B, Hq, Lq] = {tuple(q.shape[:3])}")
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
        causal_from = pos if causal else None
        if lse is None:
            mass = _block_mass(queries, keys[:, :visible], scale, causal_from, last - first, start, span_end)
        else:
            rows_lse = lse[:, :, first:last].reshape(batch * kv_heads, -1, 1).float()
            mass = _block_mass_given_lse(
                queries, keys[:, start:span_end], rows_lse, scale, causal_from, last - first, start
            )
        total[..., : span_end - start] += mass.view(batch, kv_heads, -1)
    return total if per_head else total.sum(dim=1)


def _block_scores(
    queries: Tensor, keys: Tensor, scale: float, causal_from: int | None, n: int, key0: int
) -> Tensor:
    """queries [BH, G*n, D] (n queries of each of G heads), keys [BH, V, D] at absolute positions
    key0.. -> scaled scores [BH, G*n, V] fp32, -inf where a key lies after its query (causal_from: the
    absolute position of the block's first query, None when not causal)."""
    # Scaling q in its own precision rounds no more than q itself was rounded.
    scaled = (queries.float() * scale).to(keys.dtype)
    if keys.dtype == torch.float32:
        scores = torch.bmm(scaled, keys.transpose(1, 2))
    else:
        scores = torch.bmm(scaled, keys.transpose(1, 2), out_dtype=torch.float32)
    if causal_from is not None and causal_from < key0 + keys.shape[1]:
        # Only keys at or after the first query's position can be hidden from some query of the block.
        skip = max(causal_from - key0, 0)
        cols = torch.arange(key0 + skip, key0 + keys.shape[1], device=keys.device)
        hidden = cols[None, :] > causal_from + torch.arange(n, device=keys.device)[:, None]
        grouped = scores.view(scores.shape[0], -1, n, keys.shape[1])
        grouped[..., skip:].masked_fill_(hidden, float("-inf"))
    return scores


def _block_mass(
    queries: Tensor, keys: Tensor, scale: float, causal_from: int | None, n: int, start: int, end: int
) -> Tensor:
    """Softmax of a block's queries over keys [BH, V, D] (positions 0..V-1), columns start..end-1
    summed over the queries -> [BH, end-start] fp32. A function of its own so that the block's
    buffers are freed before the next block is computed."""
    scores = _block_scores(queries, keys, scale, causal_from, n, 0)
    return scores.softmax(dim=-1)[..., start:end].sum(dim=1)


def _block_mass_given_lse(
    queries: Tensor, span_keys: Tensor, lse: Tensor, scale: float, causal_from: int | None, n: int, start: int
) -> Tensor:
    """As _block_mass over only the span's keys [BH, S, D] (positions start..), each query's
    probabilities exp(s - lse) from its known log-sum-exp lse [BH, G*n, 1] -> [BH, S] fp32."""
    scores = _block_scores(queries, span_keys, scale, causal_from, n, start)
    return (scores - lse).exp().sum(dim=1)
