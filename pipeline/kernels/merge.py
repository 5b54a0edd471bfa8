"""Triton kernels of the merge step: edge scores, top-k selection, grouping and the weighted merge.

A layer's reduction on the GPU is a handful of launches and never syncs with the host:
``adjacent_similarity_triton`` (one pass over the keys, in the attention's layout),
``mark_top_k_triton`` per span (one program per row holds its scores in registers and finds the k-th
largest by a 32-step bisection of the bit pattern: no sort), ``group_rows_triton`` and
``group_index_triton`` (one program per row scans it in chunks), and ``merge_rows_triton``: one
program per output token and feature slice walks its group's member rows, so every kept row is read
once and every output row written once, with no atomics. Groups of one weighted member are copied bit
for bit.

Their PyTorch twins and the dispatch live with the plan they serve, in ``pipeline.merging.ops`` (same
results: fp32 sums in another order for the similarity; top-k ties go to the lowest index). The kernels
exist where triton can run (``paths.HAS_TRITON``); set TRITON_INTERPRET=1 before triton loads to run
them on CPU tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.kernels.paths import HAS_TRITON

# Dtypes merge_rows takes (it accumulates in fp32).
MERGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SCAN_BLOCK = 1024  # tokens per step of the row scans
_MAX_SELECT_BLOCK = 16384  # longest span the top-k kernel holds in registers

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _similarity_kernel(
        K,
        OUT,
        stride_kb,
        stride_kh,
        stride_kl,
        stride_kd,
        n_edges,
        heads,
        head_dim,
        eps,
        BLOCK_T: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """OUT[b, e] = cos(K[b, :, e], K[b, :, e + 1]) over all heads' dims for a tile of BLOCK_T edges,
        norms and dot in fp32; K is read in the attention's [B, H, L, hd] layout."""
        b = tl.program_id(1).to(tl.int64)
        edges = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        valid = edges < n_edges
        rows = K + b * stride_kb + edges[:, None].to(tl.int64) * stride_kl
        dot = tl.zeros([BLOCK_T], tl.float32)
        left = tl.zeros([BLOCK_T], tl.float32)
        right = tl.zeros([BLOCK_T], tl.float32)
        for h in range(heads):
            head = rows + h * stride_kh
            for start in range(0, head_dim, BLOCK_D):
                dims = start + tl.arange(0, BLOCK_D)
                mask = valid[:, None] & (dims[None, :] < head_dim)
                a = tl.load(head + dims[None, :] * stride_kd, mask=mask, other=0.0).to(tl.float32)
                c = tl.load(head + stride_kl + dims[None, :] * stride_kd, mask=mask, other=0.0).to(tl.float32)
                dot += tl.sum(a * c, 1)
                left += tl.sum(a * a, 1)
                right += tl.sum(c * c, 1)
        # As torch.nn.functional.normalize: each norm floored at eps.
        sim = dot / (tl.maximum(tl.sqrt(left), eps) * tl.maximum(tl.sqrt(right), eps))
        tl.store(OUT + b * n_edges + edges, sim, mask=valid)

    @triton.jit
    def _order_keys(pointers, valid, LARGEST: tl.constexpr):
        """fp32 scores -> int32 keys in the same order (reversed unless LARGEST)."""
        s = tl.load(pointers, mask=valid, other=0.0).to(tl.float32)
        if not LARGEST:
            s = -s
        bits = tl.where(s == 0.0, 0, s.to(tl.int32, bitcast=True))  # -0.0 ties with 0.0
        # Negative floats order backwards as integers: flipping their magnitude bits fixes that.
        return bits ^ ((bits >> 31) & 0x7FFFFFFF)

    @triton.jit
    def _mark_top_kernel(
        S,
        OUT,
        stride_sb,
        stride_si,
        stride_ob,
        stride_oi,
        size,
        k,
        LARGEST: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """OUT[b, i] = 1 for the k largest S[b, i] (ties: lowest i first), else 0, for i < size <= BLOCK.

        One program per row keeps the row's keys in registers for the whole search."""
        b = tl.program_id(0).to(tl.int64)
        index = tl.arange(0, BLOCK)
        valid = index < size
        keys = _order_keys(S + b * stride_sb + index * stride_si, valid, LARGEST)
        # Bisection from the top bit: the largest key T with at least k keys >= T is the k-th largest.
        # T is built in the unsigned image of the keys (key + 2^31, held in int64) so its bits set in order.
        threshold = tl.full([], 0, tl.int64)
        for bit in range(31, -1, -1):
            candidate = threshold | (tl.full([], 1, tl.int64) << bit)
            count = tl.sum(((keys >= (candidate - 2147483648).to(tl.int32)) & valid).to(tl.int32))
            threshold = tl.where(count >= k, candidate, threshold)
        kth = (threshold - 2147483648).to(tl.int32)
        above = keys > kth
        equal = ((keys == kth) & valid).to(tl.int32)
        # Keys equal to the k-th are taken in index order until k are chosen.
        rank = tl.cumsum(equal, 0) - equal
        chosen = above | ((equal == 1) & (rank < k - tl.sum((above & valid).to(tl.int32))))
        tl.store(OUT + b * stride_ob + index * stride_oi, chosen.to(tl.int8), mask=valid)

    @triton.jit
    def _group_kernel(
        MARKED,
        MASS,
        GROUPS,
        WEIGHTS,
        stride_mb,
        stride_ml,
        stride_wb,
        stride_wl,
        length,
        floor,
        WEIGHTED: tl.constexpr,
        EVICT: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """Every unmarked token starts a group: GROUPS = (running count of starts) - 1, at least 0.
        WEIGHTS = MASS floored at ``floor`` (WEIGHTED) or 1, and 0 at marked tokens when EVICT."""
        b = tl.program_id(0).to(tl.int64)
        starts_before = tl.full([], 0, tl.int32)
        for start in range(0, length, BLOCK):
            t = start + tl.arange(0, BLOCK)
            valid = t < length
            marked = tl.load(MARKED + b * stride_mb + t * stride_ml, mask=valid, other=1) != 0
            begins = (~marked).to(tl.int32)
            ids = starts_before + tl.cumsum(begins, 0) - 1
            starts_before += tl.sum(begins)
            tl.store(GROUPS + b * length + t, tl.maximum(ids, 0).to(tl.int64), mask=valid)
            if WEIGHTED:
                w = tl.load(MASS + b * stride_wb + t * stride_wl, mask=valid, other=1.0).to(tl.float32)
                w = tl.maximum(w, floor)
            else:
                w = tl.full([BLOCK], 1.0, tl.float32)
            if EVICT:
                w = tl.where(marked, 0.0, w)
            tl.store(WEIGHTS + b * length + t, w, mask=valid)

    @triton.jit
    def _minimum(a, b):
        return tl.minimum(a, b)

    @triton.jit
    def _index_kernel(GROUPS, WEIGHTS, LEAD, BOUNDS, length, n_out, BLOCK: tl.constexpr):
        """For each group g of row b: BOUNDS[b, g] = its first token, LEAD[b, g] = its first token of
        positive weight (its first token if none); BOUNDS[b, n_out] = length.

        Scans the row backwards, carrying the next group end and the next positive token from the
        chunk after, so each group's start sees both."""
        b = tl.program_id(0).to(tl.int64)
        groups = GROUPS + b * length
        none = length + 1
        next_end = tl.full([], 0, tl.int64) + none
        next_positive = tl.full([], 0, tl.int64) + none
        for chunk in range(0, tl.cdiv(length, BLOCK)):
            t = (tl.cdiv(length, BLOCK) - 1 - chunk) * BLOCK + tl.arange(0, BLOCK)
            valid = t < length
            g = tl.load(groups + t, mask=valid, other=-1)
            before = tl.load(groups + t - 1, mask=valid & (t > 0), other=-1)
            after = tl.load(groups + t + 1, mask=t + 1 < length, other=-1)
            w = tl.load(WEIGHTS + b * length + t, mask=valid, other=0.0)
            ends = tl.where(valid & (g != after), t + 1, none)
            positives = tl.where(valid & (w > 0), t, none)
            group_end = tl.minimum(tl.associative_scan(ends, 0, _minimum, reverse=True), next_end)
            positive = tl.minimum(tl.associative_scan(positives, 0, _minimum, reverse=True), next_positive)
            next_end = tl.minimum(next_end, tl.min(ends, 0))
            next_positive = tl.minimum(next_positive, tl.min(positives, 0))
            begins = valid & (g != before)
            lead = tl.where(positive < group_end, positive, t)
            tl.store(BOUNDS + b * (n_out + 1) + g, t, mask=begins)
            tl.store(LEAD + b * n_out + g, lead, mask=begins)
        tl.store(BOUNDS + b * (n_out + 1) + n_out, length.to(tl.int64))

    @triton.jit
    def _merge_kernel(
        X,
        WEIGHTS,
        LEAD,
        BOUNDS,
        OUT,
        stride_xb,
        stride_xl,
        stride_ob,
        stride_ol,
        length,
        n_out,
        width,
        BLOCK_D: tl.constexpr,
    ):
        """OUT[b, g, slice] = sum(w x) / sum(w) over the rows of group g in fp32, or a copy of its lead
        row when at most one member carries weight. Rows of weight 0 are never read."""
        g = tl.program_id(0).to(tl.int64)
        b = tl.program_id(2).to(tl.int64)
        dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        in_width = dims < width
        rows = X + b * stride_xb + dims
        begin = tl.load(BOUNDS + b * (n_out + 1) + g)
        end = tl.load(BOUNDS + b * (n_out + 1) + g + 1)
        acc = tl.zeros([BLOCK_D], tl.float32)
        total = tl.full([], 0.0, tl.float32)
        weighted = tl.full([], 0, tl.int32)
        for r in range(begin, end):
            w = tl.load(WEIGHTS + b * length + r)
            if w > 0:
                x = tl.load(rows + r * stride_xl, mask=in_width, other=0.0)
                acc += x.to(tl.float32) * w
                total += w
                weighted += 1
        out = OUT + b * stride_ob + g * stride_ol + dims
        if weighted > 1:
            tl.store(out, (acc * (1.0 / total)).to(OUT.dtype.element_ty), mask=in_width)
        else:
            lead = tl.load(LEAD + b * n_out + g)
            tl.store(out, tl.load(rows + lead * stride_xl, mask=in_width), mask=in_width)


def _block(n: int, most: int) -> int:
    return min(triton.next_power_of_2(max(n, 1)), most)


def adjacent_similarity_triton(keys: Tensor) -> Tensor:
    """keys [B, H, L, hd] (any strides; fp32/bf16/fp16) -> cosine similarity of neighbours over all
    heads' dims together [B, L-1] fp32: the attention's key layout is read in place, never copied."""
    batch, heads, length, head_dim = keys.shape
    out = torch.empty(batch, max(length - 1, 0), dtype=torch.float32, device=keys.device)
    if length > 1:
        block_t, block_d = 8, _block(head_dim, 256)
        _similarity_kernel[(triton.cdiv(length - 1, block_t), batch)](
            keys, out, *keys.stride(), length - 1, heads, head_dim, 1e-12, BLOCK_T=block_t, BLOCK_D=block_d
        )
    return out


def mark_top_k_triton(scores: Tensor, k: int, out: Tensor, *, largest: bool = True) -> None:
    """Writes out[b, i] = (scores[b, i] is among the k largest of row b, or smallest if not largest).

    scores [B, M] float, out [B, M] bool or int8 (views with any strides, e.g. every other element of
    a row). Ties at the k-th value go to the lowest indices, so the choice is deterministic; rows
    longer than 32,768 take torch.topk instead (ties in any order)."""
    if scores.shape != out.shape or scores.dim() != 2:
        raise ValueError(f"scores {tuple(scores.shape)} and out {tuple(out.shape)} must be one [B, M] shape")
    batch, size = scores.shape
    if not 0 <= k <= size:
        raise ValueError(f"k={k} must lie in 0..{size}")
    if size == 0:
        return
    if size > _MAX_SELECT_BLOCK:  # longer than one register tile: PyTorch's radix select
        chosen = scores.float().topk(k, dim=1, largest=largest, sorted=False).indices
        out.copy_(torch.zeros_like(out).scatter_(1, chosen, 1))
        return
    target = out.view(torch.int8) if out.dtype == torch.bool else out
    block = _block(size, _MAX_SELECT_BLOCK)
    _mark_top_kernel[(batch,)](
        scores,
        target,
        *scores.stride(),
        *target.stride(),
        size,
        k,
        LARGEST=largest,
        BLOCK=block,
        num_warps=4 if block <= 2048 else 8 if block <= 8192 else 16,
    )


def group_rows_triton(
    marked: Tensor, mass: Tensor | None, *, evict: bool, floor: float
) -> tuple[Tensor, Tensor]:
    """marked [B, L] bool: tokens that join the previous group (merges) or are dropped (evict).

    Returns groups [B, L] int64 (unmarked tokens start groups; marked tokens before the first one
    join group 0) and weights [B, L] fp32: ``mass`` floored at ``floor`` or 1, 0 at dropped tokens."""
    batch, length = marked.shape
    groups = torch.empty(batch, length, dtype=torch.int64, device=marked.device)
    weights = torch.empty(batch, length, dtype=torch.float32, device=marked.device)
    flags = marked.view(torch.int8)
    _group_kernel[(batch,)](
        flags,
        mass if mass is not None else weights,  # unread when not WEIGHTED
        groups,
        weights,
        *flags.stride(),
        *(mass.stride() if mass is not None else (0, 0)),
        length,
        floor,
        WEIGHTED=mass is not None,
        EVICT=evict,
        BLOCK=_block(length, _SCAN_BLOCK),
    )
    return groups, weights


def group_index_triton(groups: Tensor, weights: Tensor, n_out: int) -> tuple[Tensor, Tensor]:
    """groups [B, L] int64 (contiguous runs 0..n_out-1), weights [B, L] ->
    (lead [B, n_out] int64: each group's first token of positive weight, or its first token if none;
    bounds [B, n_out + 1] int64: each group's first token, then L)."""
    batch, length = groups.shape
    groups = groups.contiguous()
    weights = weights.float().contiguous()
    lead = torch.empty(batch, n_out, dtype=torch.int64, device=groups.device)
    bounds = torch.empty(batch, n_out + 1, dtype=torch.int64, device=groups.device)
    _index_kernel[(batch,)](groups, weights, lead, bounds, length, n_out, BLOCK=_block(length, _SCAN_BLOCK))
    return lead, bounds


def merge_rows_triton(x: Tensor, weights: Tensor, lead: Tensor, bounds: Tensor) -> Tensor:
    """x [B, L, F] (fp16/bf16/fp32) -> [B, n_out, F]: weighted mean of each group's rows, fp32 sums.

    weights [B, L] fp32 contiguous; lead, bounds as ``group_index`` gives them."""
    if x.dtype not in MERGE_DTYPES:
        raise ValueError(f"merge_rows takes {MERGE_DTYPES}, not {x.dtype}")
    batch, length, width = x.shape
    n_out = lead.shape[1]
    if x.stride(2) != 1:
        x = x.contiguous()
    out = torch.empty(batch, n_out, width, dtype=x.dtype, device=x.device)
    if n_out and width:
        # Whole rows of up to 4,096 features per program: fewer, longer programs keep more bytes in
        # flight than one per 1,024-feature slice, and read each group's bounds and weights once.
        block_d = _block(width, 4096)
        _merge_kernel[(n_out, triton.cdiv(width, block_d), batch)](
            x,
            weights,
            lead,
            bounds,
            out,
            x.stride(0),
            x.stride(1),
            out.stride(0),
            out.stride(1),
            length,
            n_out,
            width,
            BLOCK_D=block_d,
            num_warps=8 if block_d >= 2048 else 4,
        )
    return out
