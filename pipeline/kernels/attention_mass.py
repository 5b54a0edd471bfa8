"""Attention mass: how much attention each key of an audio span receives, summed over queries.

The weights of FastAdaSP's merge and FastV's / H2O's eviction scores. Only merge layers need it, so it
is computed apart from the model's fused attention. Three functions with one contract:
``attention_mass`` dispatches (``pipeline.kernels.paths``) to ``attention_mass_triton`` or
``attention_mass_torch``.

PyTorch (``attention_mass_torch``): blockwise, one block of queries at a time, so the large buffers
are one block's B x Hq x block x Lk fp32 scores and their softmax, never B x Hq x Lq x Lk. When the
caller's attention already gave each query's log-sum-exp (``lse``, see ``attention_with_lse``), only
the span's columns are scored: p = exp(s - lse), B x Hq x block x S per block.

Triton (``attention_mass_triton``): two passes that recompute scores tile by tile and never write them
out. Pass 1 is a flash-attention forward without the values: the log-sum-exp of every query row over
its visible keys (online max and sum). Pass 2 gives each program one tile of span keys, kept in
registers; it walks the query tiles that can see them, adds up exp(s - lse) per key, and stores its
column sums once. Programs run per query head and the heads of a KV group are summed in PyTorch
afterwards, so no atomics are needed. Scores are kept in base 2 (exp2/log2) because that is what the
hardware computes. Given ``lse``, pass 1 is skipped: the mass then costs one pass over the span's
keys, about half an attention forward. fp32 accumulation whatever the input dtype.

The Triton kernels exist where triton can run (``paths.HAS_TRITON``); set TRITON_INTERPRET=1 before
triton loads to run them on CPU tensors.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pipeline.kernels.paths import HAS_TRITON, attention_kernels_usable, supported_head_dim

_LOG2E = math.log2(math.e)

if HAS_TRITON:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

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
            K
            + b * stride_kb
            + (h // group) * stride_kh
            + cols[None, :] * stride_kn
            + dims[:, None] * stride_kd,
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


def attention_mass_torch(
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
    sees, as fused attention returns it (``attention_with_lse``); computed if None.
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


def attention_mass(
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
    """Mass each key in ``span`` receives (shapes as ``attention_mass_torch``): the fused Triton kernel
    where it can run, blockwise in PyTorch elsewhere."""
    args = {"scale": scale, "causal": causal, "span": span, "query_start": query_start, "per_head": per_head}
    if attention_kernels_usable(q.device, q.shape[-1]):
        return attention_mass_triton(q, k, lse=lse, **args)
    return attention_mass_torch(q, k, lse=lse, **args)


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
