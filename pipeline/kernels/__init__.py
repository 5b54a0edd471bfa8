"""Triton kernels for the merge engine, with the PyTorch paths they replace where Triton cannot run.

``span_attention_mass`` and ``cached_decode_attention`` pick the Triton kernel for CUDA tensors when
triton is installed and PyTorch otherwise (CPU); ``forced_path`` (``paths``) overrides that. The
kernel modules import triton and are imported only when a kernel is used, so ``pipeline`` imports
fine without triton:
``attention_mass.attention_mass_triton`` (attention mass; one pass when given the log-sum-exp that
``attention_with_lse`` returns with the layer's attention) and ``decode_attention.decode_attention``
(split-K decode attention).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional

from pipeline.kernels.paths import PATHS, forced_path, triton_usable
from pipeline.merging import (
    mass as blockwise,
)  # not a bare name: the submodule attention_mass would shadow it


def supported_head_dim(head_dim: int) -> bool:
    """Whether the kernels take this head size: a power of two >= 16 (tiles span whole heads, unmasked)."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def attention_kernels_usable(device: torch.device, head_dim: int) -> bool:
    """Whether attention on ``device`` with this head size takes the Triton kernels (mass, split-K decode
    attention): what decides CUDA-graph decoding (no host sync) and the mass's memory footprint."""
    return triton_usable(device) and supported_head_dim(head_dim)


def span_attention_mass(
    q: Tensor,
    k: Tensor,
    *,
    scale: float,
    causal: bool,
    span: tuple[int, int],
    query_start: int = 0,
    per_head: bool = False,
    lse: Tensor | None = None,
) -> Tensor:
    """``pipeline.merging.mass.attention_mass`` (q [B, Hq, Lq, D], k [B, Hkv, Lk, D] -> [B, S] or
    [B, Hkv, S] fp32; lse [B, Hq, Lq] from ``attention_with_lse`` saves a pass), by the fused Triton
    kernel where it can run, blockwise in PyTorch elsewhere."""
    args = {"scale": scale, "causal": causal, "span": span, "query_start": query_start, "per_head": per_head}
    if attention_kernels_usable(q.device, q.shape[-1]):
        from pipeline.kernels.attention_mass import attention_mass_triton

        return attention_mass_triton(q, k, lse=lse, **args)
    return blockwise.attention_mass(q, k, lse=lse, **args)


def attention_with_lse(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float, causal: bool
) -> tuple[Tensor, Tensor]:
    """Fused attention that also returns what it computed on the way: each query's log-sum-exp of its
    scaled scores (natural log, fp32), which the attention mass needs and would otherwise recompute.

    q [B, H, L, D], k/v [B, Hkv, L, D] (same length: prefill) -> (out [B, H, L, D], lse [B, H, L]).
    PyTorch's public SDPA does not return the log-sum-exp, so this calls the ATen kernels SDPA itself
    dispatches to (same outputs): flash on CPU, flash (fp16/bf16) or memory-efficient (fp32) on CUDA.
    """
    if k.shape[1] != q.shape[1]:  # these kernels take no grouped KV heads; only merge layers pay this
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    aten = torch.ops.aten
    if q.device.type == "cpu":
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    elif q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
        out, lse = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
    else:  # the memory-efficient kernel pads the log-sum-exp's rows to a multiple of 32
        out, lse = aten._scaled_dot_product_efficient_attention(
            q, k, v, None, True, 0.0, causal, scale=scale
        )[:2]
        lse = lse[..., : q.shape[2]]
    return out, lse.float()


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
    if attention_kernels_usable(q.device, q.shape[-1]):
        from pipeline.kernels.decode_attention import decode_attention

        return decode_attention(q, k_cache, v_cache, lengths, scale)
    return decode_attention_torch(q, k_cache, v_cache, lengths, scale)


__all__ = [
    "PATHS",
    "attention_kernels_usable",
    "attention_with_lse",
    "cached_decode_attention",
    "decode_attention_torch",
    "forced_path",
    "span_attention_mass",
    "supported_head_dim",
    "triton_usable",
]
