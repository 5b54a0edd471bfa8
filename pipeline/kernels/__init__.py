"""Triton kernels for the merge engine, with the PyTorch paths they replace where Triton cannot run.

``span_attention_mass`` and ``cached_decode_attention`` pick the Triton kernel for CUDA tensors when
triton is installed and PyTorch otherwise (CPU). The kernel modules import triton and are imported
only when a kernel is used, so ``pipeline`` imports fine without triton:
``attention_mass.attention_mass_triton`` (two-pass attention mass) and
``decode_attention.decode_attention`` (split-K decode attention).
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor
from torch.nn import functional

from pipeline.merging import (
    mass as blockwise,
)  # not a bare name: the submodule attention_mass would shadow it


def triton_usable(device: torch.device) -> bool:
    """Whether the Triton kernels run on ``device``: a CUDA device and triton installed."""
    return device.type == "cuda" and importlib.util.find_spec("triton") is not None


def supported_head_dim(head_dim: int) -> bool:
    """Whether the kernels take this head size: a power of two >= 16 (tiles span whole heads, unmasked)."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def span_attention_mass(
    q: Tensor,
    k: Tensor,
    *,
    scale: float,
    causal: bool,
    span: tuple[int, int],
    query_start: int = 0,
    per_head: bool = False,
) -> Tensor:
    """``pipeline.merging.mass.attention_mass`` (q [B, Hq, Lq, D], k [B, Hkv, Lk, D] -> [B, S] or
    [B, Hkv, S] fp32), by the fused Triton kernel where it can run, blockwise in PyTorch elsewhere."""
    if triton_usable(q.device) and supported_head_dim(q.shape[-1]):
        from pipeline.kernels.attention_mass import attention_mass_triton

        return attention_mass_triton(
            q, k, scale=scale, causal=causal, span=span, query_start=query_start, per_head=per_head
        )
    return blockwise.attention_mass(
        q, k, scale=scale, causal=causal, span=span, query_start=query_start, per_head=per_head
    )


def decode_attention_torch(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor, scale: float
) -> Tensor:
    """SDPA over the filled prefix: q [B, H, D], caches [B, Hkv, capacity, D], lengths [B] or [] -> [B, H, D].

    Reads the longest length on the host (free on CPU, a sync on GPU), so its cost follows the length.
    """
    longest = int(lengths.max())
    valid = torch.arange(longest, device=q.device) < lengths.reshape(-1, 1)  # [B or 1, longest]
    out = functional.scaled_dot_product_attention(
        q[:, :, None],
        k_cache[:, :, :longest],
        v_cache[:, :, :longest],
        attn_mask=valid[:, None, None, :],
        scale=scale,
        enable_gqa=q.shape[1] != k_cache.shape[1],
    )
    return out[:, :, 0]


def cached_decode_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor, scale: float
) -> Tensor:
    """One query token per row over static caches (shapes as ``decode_attention_torch``): the split-K
    Triton kernel where it can run (no host sync, CUDA-graph safe), masked SDPA elsewhere."""
    if triton_usable(q.device) and supported_head_dim(q.shape[-1]):
        from pipeline.kernels.decode_attention import decode_attention

        return decode_attention(q, k_cache, v_cache, lengths, scale)
    return decode_attention_torch(q, k_cache, v_cache, lengths, scale)


__all__ = [
    "cached_decode_attention",
    "decode_attention_torch",
    "span_attention_mass",
    "supported_head_dim",
    "triton_usable",
]
