"""Attention mass as two Triton passes that recompute scores tile by tile and never write them out.

Pass 1 is a flash-attention forward without the values: the log-sum-exp of every query row over its
visible keys (online max and sum). Pass 2 gives each program one tile of span keys, kept in registers;
it walks the query tiles that can see them, adds up exp(s - lse) per key, and stores its column sums
once. Programs run per query head and the heads of a KV group are summed in PyTorch afterwards, so no
atomics are needed. Scores are kept in base 2 (exp2/log2) because that is what the hardware computes.

A caller whose fused attention already returned the log-sum-exp (``lse``, see
``pipeline.kernels.attention_with_lse``) skips pass 1: the mass then costs one pass over the span's
keys, about half an attention forward.

Same contract and result as ``pipeline.merging.mass.attention_mass`` (fp32 accumulation whatever the
input dtype). Importing this module needs triton; set TRITON_INTERPRET=1 before importing it to run
the kernels on CPU tensors.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

from pipeline.kernels import supported_head_dim

_LOG2E = math.log2(math.e)


@triton.jit
def _lse_step(
    q,
    k_base,
    start,
    positions,
    m_i,
    l_i,
    k_len,
    stride_kn,
    stride_kd,
    qk_scale,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    OPERAND: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """One key tile of the online log-sum-exp; MASKED tiles may hold keys past k_len or the diagonal."""
    cols = start + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    pointers = k_base + cols[None, :] * stride_kn + dims[:, None] * stride_kd
    k = tl.load(pointers, mask=cols[None, :] < k_len, other=0.0) if MASKED else tl.load(pointers)
    s = tl.dot(q, k.to(OPERAND), input_precision=PRECISION) * qk_scale
    if MASKED:
        visible = cols[None, :] < k_len
        if CAUSAL:
            visible = visible & (cols[None, :] <= positions[:, None])
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    return m_new, l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)


@triton.jit
def _row_lse_kernel(
    Q,
    K,
    LSE,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    q_len,
    k_len,
    q_heads,
    group,
    query_start,
    first_row,
    qk_scale,
    CAUSAL: tl.constexpr,
    OPERAND: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """LSE[b, h, m] = log2 sum_j 2^(qk_scale * q_m . k_j) over the keys j that query m sees."""
    bh = tl.program_id(1).to(tl.int64)  # offsets of large batches pass 2**31
    b = bh // q_heads
    h = bh % q_heads
    rows = first_row + tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + dims[None, :] * stride_qd,
        mask=rows[:, None] < q_len,
        other=0.0,
    ).to(OPERAND)
    k_base = K + b * stride_kb + (h // group) * stride_kh
    positions = query_start + rows
    # Tiles before full_end are visible to every row of this tile and need no mask.
    if CAUSAL:
        full_end = (query_start + first_row + tl.program_id(0) * BLOCK_M + 1) // BLOCK_N * BLOCK_N
        end = tl.minimum(query_start + first_row + (tl.program_id(0) + 1) * BLOCK_M, k_len)
    else:
        full_end = k_len // BLOCK_N * BLOCK_N
        end = k_len
    # The first tile holds key 0, which every row sees, so the running max is finite after it and
    # exp2(m_old - m_new) never meets -inf - -inf.
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    common = (k_len, stride_kn, stride_kd, qk_scale)
    for start in range(0, full_end, BLOCK_N):
        m_i, l_i = _lse_step(
            q,
            k_base,
            start,
            positions,
            m_i,
            l_i,
            *common,
            False,
            CAUSAL,
            OPERAND,
            PRECISION,
            BLOCK_N,
            HEAD_DIM,
        )
    for start in range(full_end, end, BLOCK_N):
        m_i, l_i = _lse_step(
            q,
            k_base,
            start,
            positions,
            m_i,
            l_i,
            *common,
            True,
            CAUSAL,
            OPERAND,
            PRECISION,
            BLOCK_N,
            HEAD_DIM,
        )
    tl.store(LSE + bh * q_len + rows, m_i + tl.log2(l_i), mask=rows < q_len)


@triton.jit
def _mass_step(
    q_base,
    lse_base,
    k,
    cols,
    start,
    acc,
    q_len,
    query_start,
    stride_qm,
    stride_qd,
    qk_scale,
    MASKED: tl.constexpr,
    OPERAND: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """Adds one query tile's probabilities for the resident key tile to acc [BLOCK_M, BLOCK_N].

    Rows past q_len get lse = +inf, hence probability 0, without a mask; MASKED tiles straddle the
    causal diagonal."""
    rows = start + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    in_rows = rows < q_len
    q = tl.load(
        q_base + rows[:, None] * stride_qm + dims[None, :] * stride_qd, mask=in_rows[:, None], other=0.0
    )
    lse = tl.load(lse_base + rows, mask=in_rows, other=float("inf"))
    s = tl.dot(q.to(OPERAND), k, input_precision=PRECISION) * qk_scale - lse[:, None]
    if MASKED:
        s = tl.where(cols[None, :] <= query_start + rows[:, None], s, float("-inf"))
    return acc + tl.exp2(s)


@triton.jit
def _column_mass_kernel(
    Q,
    K,
    LSE,
    OUT,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    q_len,
    q_heads,
    group,
    query_start,
    span_start,
    span_len,
    qk_scale,
    CAUSAL: tl.constexpr,
    OPERAND: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """OUT[b, h, j] = sum_m 2^(qk_scale * q_m . k_(span_start+j) - LSE[b, h, m]) over the queries m that see the key."""
    bh = tl.program_id(1).to(tl.int64)  # offsets of large batches pass 2**31
    b = bh // q_heads
    h = bh % q_heads
    first_col = span_start + tl.program_id(0) * BLOCK_N
    cols = first_col + tl.arange(0, BLOCK_N)
    in_span = cols < span_start + span_len
    dims = tl.arange(0, HEAD_DIM)
    # Columns past the span load zeros and are never stored, so the loop needs no column mask.
    k = tl.load(
        K + b * stride_kb + (h // group) * stride_kh + cols[None, :] * stride_kn + dims[:, None] * stride_kd,
        mask=in_span[None, :],
        other=0.0,
    ).to(OPERAND)
    q_base = Q + b * stride_qb + h * stride_qh
    lse_base = LSE + bh * q_len
    # Causal: rows before first_row see none of the tile, rows from full_row on see all of it.
    if CAUSAL:
        first_row = tl.maximum(first_col - query_start, 0) // BLOCK_M * BLOCK_M
        full_row = (
            first_row
            + tl.cdiv(tl.maximum(first_col + BLOCK_N - 1 - query_start - first_row, 0), BLOCK_M) * BLOCK_M
        )
    else:
        first_row = 0
        full_row = 0
    # Column sums are taken once at the end: summing each tile across rows would cost a cross-warp
    # reduction per step.
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    common = (q_len, query_start, stride_qm, stride_qd, qk_scale)
    for start in range(first_row, full_row, BLOCK_M):
        acc = _mass_step(
            q_base, lse_base, k, cols, start, acc, *common, True, OPERAND, PRECISION, BLOCK_M, HEAD_DIM
        )
    for start in range(full_row, q_len, BLOCK_M):
        acc = _mass_step(
            q_base, lse_base, k, cols, start, acc, *common, False, OPERAND, PRECISION, BLOCK_M, HEAD_DIM
        )
    tl.store(OUT + bh * span_len + cols - span_start, tl.sum(acc, 0), mask=in_span)


def dot_operands(dtype: torch.dtype, kernel: object) -> tuple[tl.dtype, str]:
    """(operand type, input_precision) of ``tl.dot`` for inputs of ``dtype`` in ``kernel``'s mode.

    fp32 uses exact fp32 products rather than TF32, to match the PyTorch paths. The interpreter
    (triton 3.9) multiplies the raw bits of bf16 tiles, so there they are widened to fp32 first.
    """
    if dtype == torch.float32 or (dtype == torch.bfloat16 and isinstance(kernel, InterpretedFunction)):
        return tl.float32, "ieee"
    if dtype in (torch.bfloat16, torch.float16):
        return (tl.bfloat16 if dtype == torch.bfloat16 else tl.float16), "tf32"
    raise ValueError(f"unsupported dtype {dtype}: use float32, bfloat16 or float16")


def _tiles(dtype: torch.dtype, head_dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): tiles that fit shared memory for this element size.

    The interpreter has no shared memory and is slow per program: it always takes the larger tiles.
    """
    if isinstance(_row_lse_kernel, InterpretedFunction):
        return 128, 64, 1, 1
    if dtype == torch.float32 or head_dim > 128:
        return 64, 32, 4, 2
    return 128, 64, 8, 3


def _check(q: Tensor, k: Tensor, span: tuple[int, int], query_start: int, causal: bool) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must be [B, heads, L, D]")
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3] or q.shape[1] % k.shape[1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} do not match (B, heads, D)")
    if not 0 <= span[0] < span[1] <= k.shape[2]:
        raise ValueError(f"span {span} lies outside the {k.shape[2]} keys")
    if query_start < 0 or (causal and query_start + q.shape[2] > k.shape[2]):
        raise ValueError(f"queries from position {query_start} need keys k cannot give")
    if not supported_head_dim(q.shape[3]):
        raise ValueError(f"head_dim {q.shape[3]} is not a power of two >= 16")
    if q.dtype != k.dtype or q.device != k.device:
        raise ValueError(f"q ({q.dtype}, {q.device}) and k ({k.dtype}, {k.device}) differ")


def attention_mass_triton(
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
    """Mass each key in ``span`` [s, e) receives, summed over queries (and heads), in two fused passes
    (one when ``lse``, each query's natural-log log-sum-exp [B, Hq, Lq], is given).

    q [B, Hq, Lq, D]: queries at absolute positions query_start .. query_start+Lq-1;
    k [B, Hkv, Lk, D]: keys at positions 0 .. Lk-1 (GQA: query head h uses key head h // (Hq/Hkv)).
    Any strides; fp32, bf16 or fp16, q and k alike. Extra memory: fp32 [B, Hq, Lq] + [B, Hq, e-s].
    Returns [B, e-s] fp32, or [B, Hkv, e-s] when per_head (the query heads of one group summed).
    """
    _check(q, k, span, query_start, causal)
    if lse is not None and lse.shape != q.shape[:3]:
        raise ValueError(f"lse {tuple(lse.shape)} must be [B, Hq, Lq] = {tuple(q.shape[:3])}")
    operand, precision = dot_operands(q.dtype, _row_lse_kernel)
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    span_len = span[1] - span[0]
    out = torch.zeros(batch, q_heads, span_len, dtype=torch.float32, device=q.device)
    # Causal queries before the span see none of it: skip their rows in both passes.
    first_row = max(span[0] - query_start, 0) if causal else 0
    if first_row < q_len:
        block_m, block_n, warps, stages = _tiles(q.dtype, head_dim)
        common = {
            "q_heads": q_heads,
            "group": group,
            "query_start": query_start,
            "qk_scale": scale * _LOG2E,
            "CAUSAL": causal,
            "OPERAND": operand,
            "PRECISION": precision,
            "HEAD_DIM": head_dim,
            "num_warps": warps,
            "num_stages": stages,
        }
        strides = (*q.stride(), *k.stride())
        if lse is None:
            lse = torch.empty(batch, q_heads, q_len, dtype=torch.float32, device=q.device)
            _row_lse_kernel[(triton.cdiv(q_len - first_row, block_m), batch * q_heads)](
                q,
                k,
                lse,
                *strides,
                q_len,
                k_len,
                first_row=first_row,
                BLOCK_M=block_m,
                BLOCK_N=block_n,
                **common,
            )
        else:  # pass 2 works in base 2 and indexes a contiguous [B, Hq, Lq]
            lse = (lse.float() * _LOG2E).contiguous()
        # Pass 2 keeps a key tile resident and streams query tiles: the roles of the two block sizes swap.
        _column_mass_kernel[(triton.cdiv(span_len, block_m), batch * q_heads)](
            q,
            k,
            lse,
            out,
            *strides,
            q_len,
            span_start=span[0],
            span_len=span_len,
            BLOCK_M=block_n,
            BLOCK_N=block_m,
            **common,
        )
    per_kv_head = out.view(batch, kv_heads, group, span_len).sum(2)
    return per_kv_head if per_head else per_kv_head.sum(1)
