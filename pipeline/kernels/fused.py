"""Fused elementwise kernels of a decode step, each with a PyTorch twin of the same semantics.

A captured decode layer then runs: [add residual + RMSNorm] -> qkv GEMM (bias in its epilogue) -> [rope
on q, k + write k, v into the cache] -> decode attention -> o GEMM -> [add residual + RMSNorm] -> gate_up GEMM ->
[silu(gate) * up] -> down GEMM, i.e. three small kernels where PyTorch launches about twenty.

``add_rmsnorm``, ``rope_and_cache`` and ``silu_mul`` run the Triton kernel for CUDA tensors and the
twin (``*_torch``) elsewhere; ``*_triton`` always run the kernel (on CPU tensors in the interpreter).
Every value is rounded to the input dtype where PyTorch rounds it (fp32 arithmetic in between), so in
bf16 the kernels differ from the twins only where the hardware's exp, rsqrt or summation order does.

The kernels exist where triton can run (``paths.HAS_TRITON``: a CUDA device, or TRITON_INTERPRET=1 set
before triton loads); elsewhere (a CPU process, or no triton installed) only the twins do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.kernels.paths import HAS_TRITON, triton_usable

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _add_rmsnorm_kernel(
        X,
        RES,
        W,
        OUT,
        RES_OUT,
        stride_x,
        stride_res,
        stride_out,
        stride_res_out,
        dim,
        eps,
        HAS_RESIDUAL: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """One row: RES_OUT = X + RES (input dtype); OUT = W * to_input_dtype(h * rsqrt(mean(h^2) + eps))."""
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        inside = cols < dim
        x = tl.load(X + row * stride_x + cols, mask=inside, other=0.0)
        if HAS_RESIDUAL:
            res = tl.load(RES + row * stride_res + cols, mask=inside, other=0.0)
            x = (x.to(tl.float32) + res.to(tl.float32)).to(X.dtype.element_ty)
            tl.store(RES_OUT + row * stride_res_out + cols, x, mask=inside)
        h = x.to(tl.float32)
        normed = (h * tl.rsqrt(tl.sum(h * h, 0) / dim + eps)).to(X.dtype.element_ty)
        w = tl.load(W + cols, mask=inside, other=0.0)
        out = w.to(tl.float32) * normed.to(tl.float32)
        tl.store(OUT + row * stride_out + cols, out.to(OUT.dtype.element_ty), mask=inside)

    @triton.jit
    def _rotate_half(x1, x2, c1, c2, s1, s2):
        """(x1, x2) * (c1, c2) + (-x2, x1) * (s1, s2), each product and the sum rounded to x's dtype."""
        a1 = (x1.to(tl.float32) * c1.to(tl.float32)).to(x1.dtype)
        a2 = (x2.to(tl.float32) * c2.to(tl.float32)).to(x1.dtype)
        b1 = (x2.to(tl.float32) * s1.to(tl.float32)).to(x1.dtype)
        b2 = (x1.to(tl.float32) * s2.to(tl.float32)).to(x1.dtype)
        out1 = (a1.to(tl.float32) - b1.to(tl.float32)).to(x1.dtype)
        return out1, (a2.to(tl.float32) + b2.to(tl.float32)).to(x1.dtype)

    @triton.jit
    def _rope_cache_kernel(
        QKV,
        COS,
        SIN,
        Q_OUT,
        K_CACHE,
        V_CACHE,
        INDEX,
        stride_qkv,
        stride_cos,
        stride_sin,
        stride_qb,
        stride_qh,
        stride_kb,
        stride_kh,
        stride_kn,
        stride_vb,
        stride_vh,
        stride_vn,
        index_stride,
        capacity,
        q_heads,
        kv_heads,
        half,
        BLOCK_HALF: tl.constexpr,
    ):
        """Program (row b, head j of q | k | v): q and k heads are rotated, q goes to Q_OUT[b, j], k and v
        to their cache at position INDEX[b]; a position outside [0, capacity) is not written."""
        b = tl.program_id(0).to(tl.int64)  # b * stride_kb passes 2^31 in caches of large batches
        head = tl.program_id(1)
        dims = tl.arange(0, BLOCK_HALF)
        inside = dims < half
        src = QKV + b * stride_qkv + head * 2 * half
        x1 = tl.load(src + dims, mask=inside, other=0.0)
        x2 = tl.load(src + half + dims, mask=inside, other=0.0)
        if head < q_heads + kv_heads:
            cos = COS + b * stride_cos
            sin = SIN + b * stride_sin
            c1 = tl.load(cos + dims, mask=inside, other=0.0)
            c2 = tl.load(cos + half + dims, mask=inside, other=0.0)
            s1 = tl.load(sin + dims, mask=inside, other=0.0)
            s2 = tl.load(sin + half + dims, mask=inside, other=0.0)
            x1, x2 = _rotate_half(x1, x2, c1, c2, s1, s2)
        position = tl.load(INDEX + b * index_stride)
        if head < q_heads:
            dst = Q_OUT + b * stride_qb + head * stride_qh
            tl.store(dst + dims, x1, mask=inside)
            tl.store(dst + half + dims, x2, mask=inside)
        elif (position >= 0) & (position < capacity):
            if head < q_heads + kv_heads:
                dst = K_CACHE + b * stride_kb + (head - q_heads) * stride_kh + position * stride_kn
            else:
                dst = V_CACHE + b * stride_vb + (head - q_heads - kv_heads) * stride_vh + position * stride_vn
            tl.store(dst + dims, x1, mask=inside)
            tl.store(dst + half + dims, x2, mask=inside)

    @triton.jit
    def _silu_mul_kernel(GATE_UP, OUT, stride_in, stride_out, inter, BLOCK: tl.constexpr):
        """OUT[n, i] = to_dtype(silu(gate)) * up with gate = GATE_UP[n, i], up = GATE_UP[n, inter + i]."""
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < inter
        gate = tl.load(GATE_UP + row * stride_in + cols, mask=inside, other=0.0).to(tl.float32)
        up = tl.load(GATE_UP + row * stride_in + inter + cols, mask=inside, other=0.0)
        act = (gate / (1.0 + tl.exp(-gate))).to(OUT.dtype.element_ty)
        out = act.to(tl.float32) * up.to(tl.float32)
        tl.store(OUT + row * stride_out + cols, out.to(OUT.dtype.element_ty), mask=inside)


_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _rows(x: Tensor) -> Tensor:
    """[..., D] -> [N, D] with a unit stride along D (a view where possible)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _check_dtype(*tensors: Tensor) -> None:
    for t in tensors:
        if t.dtype not in _DTYPES:
            raise ValueError(f"unsupported dtype {t.dtype}: use float32, bfloat16 or float16")


# --- add residual + RMSNorm ---------------------------------------------------------------------------


def add_rmsnorm_torch(
    x: Tensor, residual: Tensor | None, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """x, residual [..., D], weight [D] -> (normed, new_residual), both [..., D].

    new_residual = x + residual in x's dtype (x itself when ``residual`` is None); normed is
    transformers' Qwen2RMSNorm of it: fp32 mean of squares, rsqrt, cast back to the input dtype, times
    weight (dtype: the promotion of weight's and x's).
    """
    hidden = x if residual is None else x + residual
    h = hidden.float()
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(hidden.dtype), hidden


def add_rmsnorm_triton(
    x: Tensor, residual: Tensor | None, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """``add_rmsnorm_torch`` as one kernel launch: one program per row of D elements."""
    _check_dtype(x, weight)
    dim = x.shape[-1]
    if weight.shape != (dim,):
        raise ValueError(f"weight {tuple(weight.shape)} does not match hidden size {dim}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual {residual.dtype} {tuple(residual.shape)} differs from x {x.dtype}")
    rows = _rows(x)
    res = rows if residual is None else _rows(residual)
    out = torch.empty(rows.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    res_out = rows if residual is None else torch.empty_like(rows)
    block = triton.next_power_of_2(dim)
    _add_rmsnorm_kernel[(rows.shape[0],)](
        rows,
        res,
        weight.contiguous(),
        out,
        res_out,
        rows.stride(0),
        res.stride(0),
        out.stride(0),
        res_out.stride(0),
        dim,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK_D=block,
        num_warps=min(16, max(1, block // 512)),
    )
    return out.view(x.shape), x if residual is None else res_out.view(x.shape)


def add_rmsnorm(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(x + residual, RMSNorm of it) as ``add_rmsnorm_torch``: the Triton kernel on CUDA, else the twin.

    Engine use (hidden [B, D]): ``normed, residual = add_rmsnorm(h, residual, norm.weight,
    norm.variance_epsilon)`` with ``residual=None`` at the first norm.
    """
    if triton_usable(x.device):
        return add_rmsnorm_triton(x, residual, weight, eps)
    return add_rmsnorm_torch(x, residual, weight, eps)


# --- rope + cache write ----------------------------------------------------------------------------


def _rope_heads(
    qkv: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor, index: Tensor
) -> tuple[int, int, int]:
    """(query heads, KV heads, head_dim) of a fused qkv row, after checking every input against it."""
    batch, kv_heads, _, head_dim = k_cache.shape
    heads, rest = divmod(qkv.shape[-1], head_dim)
    q_heads = heads - 2 * kv_heads
    if qkv.dim() != 2 or qkv.shape[0] != batch or rest or q_heads <= 0 or q_heads % kv_heads:
        raise ValueError(
            f"qkv {tuple(qkv.shape)} is not [B, (H + 2 Hkv) * hd] for cache {tuple(k_cache.shape)}"
        )
    if head_dim % 2:
        raise ValueError(f"rope needs an even head_dim, got {head_dim}")
    if v_cache.shape != k_cache.shape or v_cache.dtype != qkv.dtype or k_cache.dtype != qkv.dtype:
        raise ValueError("k_cache and v_cache must share one shape and qkv's dtype")
    if any(t.dtype != qkv.dtype or t.numel() != batch * head_dim for t in (cos, sin)):
        raise ValueError(f"cos/sin must hold [B, hd] = [{batch}, {head_dim}] in qkv's dtype {qkv.dtype}")
    if index.shape not in ((), (batch,)) or index.dtype.is_floating_point or index.device != qkv.device:
        raise ValueError(f"index must be an int tensor [] or [{batch}] on {qkv.device}")
    return q_heads, kv_heads, head_dim


def rope_and_cache_torch(
    qkv: Tensor,
    cos: Tensor,
    sin: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    index: Tensor,
) -> Tensor:
    """One decode token per row: rotate q and k, store k and v in the caches, return q.

    qkv [B, (H + 2 Hkv) * hd] (the fused projection, bias included: q heads, then k, then v); cos, sin
    [B, hd] (or any shape with B * hd elements, e.g. [B, 1, 1, hd]) in qkv's dtype; k_cache, v_cache
    [B, Hkv, capacity, hd]; index: int tensor [] (all rows) or [B] on the device, the cache position to
    write, in [0, capacity). Rope is rotate-half:
    x * cos + cat(-x2, x1) * sin, each product and the sum rounded to the dtype (as transformers'
    apply_rotary_pos_emb). Returns q [B, H, hd]. No host synchronisation.
    """
    q_heads, kv_heads, head_dim = _rope_heads(qkv, cos, sin, k_cache, v_cache, index)
    batch = qkv.shape[0]
    heads = qkv.view(batch, -1, head_dim)
    cos, sin = cos.reshape(batch, 1, head_dim), sin.reshape(batch, 1, head_dim)
    half = head_dim // 2
    rotated = torch.cat((-heads[..., half:], heads[..., :half]), dim=-1)
    qk = heads[:, : q_heads + kv_heads] * cos + rotated[:, : q_heads + kv_heads] * sin
    rows = torch.arange(batch, device=qkv.device)
    positions = index.expand(batch)
    k_cache[rows, :, positions] = qk[:, q_heads:]
    v_cache[rows, :, positions] = heads[:, q_heads + kv_heads :]
    return qk[:, :q_heads]


def rope_and_cache_triton(
    qkv: Tensor,
    cos: Tensor,
    sin: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    index: Tensor,
) -> Tensor:
    """``rope_and_cache_torch`` as one kernel launch (one program per row and head of q, k and v).

    Differs on bad input only: an index outside [0, capacity) writes nothing (the twin raises).
    """
    q_heads, kv_heads, head_dim = _rope_heads(qkv, cos, sin, k_cache, v_cache, index)
    _check_dtype(qkv)
    batch = qkv.shape[0]
    cos, sin = _rows(cos.reshape(batch, head_dim)), _rows(sin.reshape(batch, head_dim))
    qkv = _rows(qkv)
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("caches need a unit stride along head_dim")
    q = torch.empty(batch, q_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    half = head_dim // 2
    _rope_cache_kernel[(batch, q_heads + 2 * kv_heads)](
        qkv,
        cos,
        sin,
        q,
        k_cache,
        v_cache,
        index,
        qkv.stride(0),
        cos.stride(0),
        sin.stride(0),
        q.stride(0),
        q.stride(1),
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        0 if index.dim() == 0 else index.stride(0),
        k_cache.shape[2],
        q_heads,
        kv_heads,
        half,
        BLOCK_HALF=triton.next_power_of_2(half),
        num_warps=1,
    )
    return q


def rope_and_cache(
    qkv: Tensor,
    cos: Tensor,
    sin: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    index: Tensor,
) -> Tensor:
    """``rope_and_cache_torch`` (see there for shapes): the Triton kernel on CUDA, else the twin.

    Engine use, layer i of a decode step over n rows: ``q = rope_and_cache(linear(normed, qkv_weight,
    qkv_bias), cos, sin, caches.k[i][:n], caches.v[i][:n], written[i])`` with ``written =
    caches.lengths[:, :n] + steps[:n]`` (each row's own step) computed once per step; attention then
    reads ``written[i] + 1`` keys (pipeline/engine/runner.py).
    """
    if triton_usable(qkv.device):
        return rope_and_cache_triton(qkv, cos, sin, k_cache, v_cache, index)
    return rope_and_cache_torch(qkv, cos, sin, k_cache, v_cache, index)


# --- silu(gate) * up ------------------------------------------------------------------------------------

_SILU_BLOCK = 1024


def silu_mul_torch(gate_up: Tensor) -> Tensor:
    """gate_up [..., 2I] (gate, then up) -> silu(gate) * up [..., I], silu rounded to the dtype first."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def silu_mul_triton(gate_up: Tensor) -> Tensor:
    """``silu_mul_torch`` as one kernel launch."""
    _check_dtype(gate_up)
    if gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up has an odd last dim {gate_up.shape[-1]}")
    rows = _rows(gate_up)
    inter = rows.shape[1] // 2
    out = torch.empty(rows.shape[0], inter, dtype=rows.dtype, device=rows.device)
    block = min(_SILU_BLOCK, triton.next_power_of_2(inter))
    _silu_mul_kernel[(rows.shape[0], triton.cdiv(inter, block))](
        rows, out, rows.stride(0), out.stride(0), inter, BLOCK=block, num_warps=4
    )
    return out.view(*gate_up.shape[:-1], inter)


def silu_mul(gate_up: Tensor) -> Tensor:
    """silu(gate) * up of gate_up [..., 2I] -> [..., I]: the Triton kernel on CUDA, else the twin.

    Engine use: ``layer.down(silu_mul(linear(normed, layer.gate_up_weight)))``.
    """
    if triton_usable(gate_up.device):
        return silu_mul_triton(gate_up)
    return silu_mul_torch(gate_up)


@dataclass(frozen=True)
class StepOps:
    """The elementwise ops a decode step calls: ``FUSED`` (the dispatchers, as the engine runs), or the
    PyTorch twins everywhere (benchmarks/decode_step.py measures the kernels against those)."""

    add_rmsnorm: Callable[[Tensor, Tensor | None, Tensor, float], tuple[Tensor, Tensor]]
    rope_and_cache: Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]
    silu_mul: Callable[[Tensor], Tensor]


FUSED = StepOps(add_rmsnorm, rope_and_cache, silu_mul)
