"""Attention of one new token per row over static KV buffers: ``decode_attention`` dispatches
(``pipeline.kernels.paths``) to the split-K Triton kernel ``decode_attention_triton`` or to masked SDPA
``decode_attention_torch``.

Split-K (flash-decoding): the keys of each row are cut into a fixed number of splits; one program per
(split, row, KV head) runs an online softmax over its part for all query heads of the group and writes
a partial (max, sum, weighted values); a second kernel merges the partials. The number of splits
depends on shapes only, while each program reads the current length from device memory and derives its
range from it, so one launch (or one CUDA graph) serves every length up to the capacity and the work
follows the length: programs whose range is empty write an empty partial and stop.

The Triton kernels exist where triton can run (``paths.HAS_TRITON``); set TRITON_INTERPRET=1 before
triton loads to run them on CPU tensors.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional

from pipeline.kernels.paths import HAS_TRITON, attention_kernels_usable, supported_head_dim

_LOG2E = math.log2(math.e)
_BLOCK_N = 64  # keys per inner step
_TARGET_PROGRAMS = 512  # enough to fill 132 SMs several times over

if HAS_TRITON:
    import triton
    import triton.language as tl

    from pipeline.kernels.attention_mass import dot_operands

    # Shapes enter as runtime ints, not compile-time constants or specialised values: one compiled kernel
    # then serves every capacity and batch (windows of any length), instead of one compile (~1 s) each.
    @triton.jit(do_not_specialize=["capacity", "splits"])
    def _split_kernel(
        Q,
        K,
        V,
        LENGTHS,
        PART_M,
        PART_L,
        PART_ACC,
        stride_qb,
        stride_qh,
        stride_qd,
        stride_kb,
        stride_kh,
        stride_kn,
        stride_kd,
        stride_vb,
        stride_vh,
        stride_vn,
        stride_vd,
        length_stride,
        capacity,
        kv_heads,
        group,
        qk_scale,
        splits,
        OPERAND: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr,
    ):
        """Partials of split ``split`` for the query heads of one KV head: PART_M/PART_L [B, H, splits] (base-2
        running max and sum), PART_ACC [B, H, splits, D] (values weighted by 2^(s - max), not yet divided)."""
        split = tl.program_id(0)
        # int64: b * stride_kb passes 2**31 at ~86 rows of 7B-shaped caches.
        b = (tl.program_id(1) // kv_heads).to(tl.int64)
        kv_head = tl.program_id(1) % kv_heads
        length = tl.minimum(tl.load(LENGTHS + b * length_stride), capacity)
        chunk = tl.cdiv(tl.cdiv(length, splits), BLOCK_N) * BLOCK_N
        start = split * chunk
        end = tl.minimum(start + chunk, length)
        heads = kv_head * group + tl.arange(0, BLOCK_G)
        in_group = tl.arange(0, BLOCK_G) < group
        dims = tl.arange(0, HEAD_DIM)
        q = tl.load(
            Q + b * stride_qb + heads[:, None] * stride_qh + dims[None, :] * stride_qd,
            mask=in_group[:, None],
            other=0.0,
        ).to(OPERAND)
        k_base = K + b * stride_kb + kv_head * stride_kh
        v_base = V + b * stride_vb + kv_head * stride_vh
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
        # A non-empty range starts with a valid key, so m_i is finite after the first step.
        for n in range(start, end, BLOCK_N):
            cols = n + tl.arange(0, BLOCK_N)
            valid = cols < end
            k = tl.load(
                k_base + cols[None, :] * stride_kn + dims[:, None] * stride_kd,
                mask=valid[None, :],
                other=0.0,
            ).to(OPERAND)
            s = tl.dot(q, k, input_precision=PRECISION) * qk_scale
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(
                v_base + cols[:, None] * stride_vn + dims[None, :] * stride_vd,
                mask=valid[:, None],
                other=0.0,
            ).to(OPERAND)
            acc = acc * alpha[:, None] + tl.dot(p.to(OPERAND), v, input_precision=PRECISION)
            m_i = m_new
        row = (b * kv_heads * group + heads) * splits + split
        tl.store(PART_M + row, m_i, mask=in_group)
        tl.store(PART_L + row, l_i, mask=in_group)
        tl.store(PART_ACC + row[:, None] * HEAD_DIM + dims[None, :], acc, mask=in_group[:, None])

    @triton.jit(do_not_specialize=["splits"])
    def _combine_kernel(
        PART_M,
        PART_L,
        PART_ACC,
        OUT,
        stride_ob,
        stride_oh,
        stride_od,
        q_heads,
        splits,
        BLOCK_S: tl.constexpr,
        HEAD_DIM: tl.constexpr,
    ):
        """OUT[b, h] = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s with M = max_s m_s (empty splits weigh 0)."""
        bh = tl.program_id(0).to(tl.int64)
        parts = tl.arange(0, BLOCK_S)
        in_splits = parts < splits
        dims = tl.arange(0, HEAD_DIM)
        m = tl.load(PART_M + bh * splits + parts, mask=in_splits, other=float("-inf"))
        l_s = tl.load(PART_L + bh * splits + parts, mask=in_splits, other=0.0)
        acc = tl.load(
            PART_ACC + (bh * splits + parts[:, None]) * HEAD_DIM + dims[None, :],
            mask=in_splits[:, None],
            other=0.0,
        )
        weight = tl.exp2(m - tl.max(m, 0))
        out = tl.sum(acc * weight[:, None], 0) / tl.sum(l_s * weight, 0)
        tl.store(
            OUT + (bh // q_heads) * stride_ob + (bh % q_heads) * stride_oh + dims * stride_od,
            out.to(OUT.dtype.element_ty),
        )


def decode_splits(batch: int, kv_heads: int, capacity: int) -> int:
    """Number of key splits: enough programs to fill the GPU, no more than the capacity has key blocks.

    Depends on shapes only, never on the current length, so a captured graph stays valid as it grows.
    """
    wanted = triton.cdiv(_TARGET_PROGRAMS, batch * kv_heads)
    return max(1, min(wanted, triton.cdiv(capacity, _BLOCK_N)))


def decode_attention_triton(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor, scale: float, *, splits: int | None = None
) -> Tensor:
    """Attention of one query token per row over the first ``lengths`` positions of static caches.

    q [B, H, D]; k_cache, v_cache [B, Hkv, capacity, D] (GQA: query head h reads KV head h // (H/Hkv));
    lengths: int tensor [B] (per row) or [] (all rows), each in 1 .. capacity, on q's device; read by
    the kernel, never by the host. ``splits`` defaults to ``decode_splits(B, Hkv, capacity)``.
    Returns [B, H, D] in q's dtype; softmax and accumulation in fp32.
    """
    batch, q_heads, head_dim = q.shape
    kv_heads, capacity = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape != v_cache.shape or k_cache.shape[0] != batch or k_cache.shape[3] != head_dim:
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k_cache.shape)}, v {tuple(v_cache.shape)} do not match"
        )
    if not supported_head_dim(head_dim):
        raise ValueError(f"head_dim {head_dim} is not a power of two >= 16")
    if q_heads % kv_heads:
        raise ValueError(f"{q_heads} query heads cannot share {kv_heads} KV heads")
    if lengths.shape not in ((), (batch,)) or lengths.dtype.is_floating_point or lengths.device != q.device:
        raise ValueError(f"lengths must be an int tensor [] or [{batch}] on {q.device}")
    splits = splits or decode_splits(batch, kv_heads, capacity)
    group = q_heads // kv_heads
    operand, precision = dot_operands(k_cache.dtype, _split_kernel)
    part_m = torch.empty(batch, q_heads, splits, dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty(batch, q_heads, splits, head_dim, dtype=torch.float32, device=q.device)
    _split_kernel[(splits, batch * kv_heads)](
        q,
        k_cache,
        v_cache,
        lengths,
        part_m,
        part_l,
        part_acc,
        *q.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        0 if lengths.dim() == 0 else lengths.stride(0),
        capacity,
        kv_heads,
        group,
        scale * _LOG2E,
        splits,
        OPERAND=operand,
        PRECISION=precision,
        BLOCK_G=max(16, triton.next_power_of_2(group)),  # tl.dot needs at least 16 rows
        BLOCK_N=_BLOCK_N,
        HEAD_DIM=head_dim,
        num_warps=4,
    )
    out = torch.empty(batch, q_heads, head_dim, dtype=q.dtype, device=q.device)
    _combine_kernel[(batch * q_heads,)](
        part_m,
        part_l,
        part_acc,
        out,
        *out.stride(),
        q_heads,
        splits,
        BLOCK_S=max(2, triton.next_power_of_2(splits)),
        HEAD_DIM=head_dim,
    )
    return out


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


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor, scale: float) -> Tensor:
    """One query token per row over static caches (shapes as ``decode_attention_torch``): the split-K
    Triton kernel where it can run (no host sync, CUDA-graph safe), masked SDPA elsewhere."""
    if attention_kernels_usable(q.device, q.shape[-1]):
        return decode_attention_triton(q, k_cache, v_cache, lengths, scale)
    return decode_attention_torch(q, k_cache, v_cache, lengths, scale)
