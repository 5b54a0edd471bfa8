"""Token reduction maths: adjacent similarity, chain grouping, weighted merge, evictions.

Pure tensor functions, model-agnostic. A layer's reduction is planned once (``plan_reduction``) as a
``Reduction``: a non-decreasing group id per token and a weight per token; applying it to any
[B, L, ...] tensor gives the weighted mean of each group. Text outside the audio spans is never touched.

Two paths give the same plans and results: CUDA tensors take the Triton kernels of
``pipeline.kernels.merge`` when triton is installed (a few launches, no host sync, one pass over the
hidden states); everything else takes PyTorch. ``pipeline.kernels.paths.forced_path`` picks one explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor

from pipeline.kernels import merge
from pipeline.kernels.paths import triton_usable
from pipeline.merging.config import CHAIN_METHODS, EVICT_METHODS, MERGE_METHODS

SIMILARITY_METHODS = ("fastadasp", "average", "a-tome")
MASS_METHODS = ("fastadasp", "random-merge", "fastv")
WEIGHTED_METHODS = ("fastadasp", "random-merge")
# Attention mass can underflow to 0; a group whose weights are all 0 would divide 0 by 0. Masses are
# sums of probabilities (order 1 and above), so this floor never changes a real weight.
_MIN_MASS = 1e-20


def _per_head(keys: Tensor) -> Tensor:
    """keys [B, L, D] (heads concatenated) or [B, H, L, hd] (the attention's layout) -> [B, H, L, hd], a view."""
    return keys[:, None] if keys.dim() == 3 else keys


def adjacent_similarity(keys: Tensor) -> Tensor:
    """keys [B, L, D] or [B, H, L, hd] -> cosine similarity of neighbours [B, L-1] fp32, over all heads'
    dims together (as if concatenated)."""
    keys = _per_head(keys)
    if triton_usable(keys.device):
        return merge.adjacent_similarity_triton(keys)
    unit = torch.nn.functional.normalize(keys.transpose(1, 2).flatten(2).float(), dim=-1)
    return (unit[:, :-1] * unit[:, 1:]).sum(-1)


@dataclass
class _RowGather:
    """The PyTorch path's index: apply() as a row gather plus a small weighted sum over the merged
    tokens. "Extras" are the L - n_out non-lead tokens of each row; rows index the flattened [B * L]."""

    lead: Tensor  # [B, n_out]
    lead_rows: Tensor  # [B * n_out] rows of x copied to the output
    extra_rows: Tensor  # [B * E] rows of x of the extras
    extra_out: Tensor  # [B * E] output rows (groups) of the extras
    extra_head: Tensor  # [B * E] first extra slot of the same group
    w_extra: Tensor  # [B * E, 1] extra weights
    w_lead: Tensor  # [B * E, 1] the group's lead weight, at heads only
    inv_total: Tensor  # [B * E, 1] 1 / total weight of the group
    merges: bool  # some extra carries weight (not a pure eviction)

    @classmethod
    def build(cls, groups: Tensor, weights: Tensor, n_out: int) -> _RowGather:
        batch, length = groups.shape
        device = groups.device
        index = torch.arange(length, device=device).expand(batch, length)
        # Lead = smallest index among positive-weight members (all-zero group: its first member).
        key = index + length * (weights <= 0)
        lead = torch.full((batch, n_out), 2 * length, dtype=torch.int64, device=device)
        lead = lead.scatter_reduce(1, groups, key, "amin") % length
        row0 = torch.arange(batch, device=device)[:, None]
        is_lead = torch.zeros((batch, length), dtype=torch.int8, device=device).scatter_(1, lead, 1)
        n_extra = length - n_out
        extra = torch.sort(is_lead, dim=1, stable=True).indices[:, :n_extra]
        extra_group = groups.gather(1, extra)
        starts = torch.ones_like(extra_group, dtype=torch.bool)
        starts[:, 1:] = extra_group[:, 1:] != extra_group[:, :-1]
        slot = torch.arange(n_extra, device=device).expand_as(starts)
        head = torch.where(starts, slot, 0).cummax(dim=1).values
        w_extra = weights.float().gather(1, extra)
        w_lead = torch.where(starts, weights.float().gather(1, lead.gather(1, extra_group)), 0.0)
        total = w_lead.scatter_add(1, head, w_extra).gather(1, head)
        return cls(
            lead=lead,
            lead_rows=(lead + row0 * length).flatten(),
            extra_rows=(extra + row0 * length).flatten(),
            extra_out=(extra_group + row0 * n_out).flatten(),
            extra_head=(head + row0 * n_extra).flatten(),
            w_extra=w_extra.reshape(-1, 1),
            w_lead=w_lead.reshape(-1, 1),
            inv_total=total.reciprocal().reshape(-1, 1),
            merges=bool((w_extra > 0).any()),  # one host sync per plan
        )

    def apply(self, rows: Tensor) -> Tensor:
        """rows [B * L, F] -> [B * n_out, F]."""
        out = rows.index_select(0, self.lead_rows)
        if self.merges:
            # Accumulate each merged group at its head slot (lead term once, plus every extra) in fp32:
            # multiplying by the fp32 weights promotes in the same kernel.
            acc = torch.mul(out.index_select(0, self.extra_out), self.w_lead)
            acc.index_add_(0, self.extra_head, torch.mul(rows.index_select(0, self.extra_rows), self.w_extra))
            mean = acc.mul_(self.inv_total).to(out.dtype).index_select(0, self.extra_head)
            # Every extra of a group writes its group's mean, so duplicate targets are harmless.
            out.index_copy_(0, self.extra_out, mean)
        return out


@dataclass
class Reduction:
    """How one layer shortens a whole sequence of length L to ``n_out`` tokens.

    groups [B, L] int64, non-decreasing along L, values 0..n_out-1, every output id used;
    weights [B, L] fp32 >= 0 (an evicted token has weight 0 and sits in a neighbour's group), every
    group holding a positive weight; spans: audio spans (start, end) after the reduction, the same for
    every batch row. Each group is represented by its lead, the first member with positive weight:
    ``apply`` copies the lead's row for groups of one weighted member and takes the weighted mean
    (fp32) for merged groups.
    """

    groups: Tensor
    weights: Tensor
    n_out: int
    spans: list[tuple[int, int]]
    _lead: Tensor = field(init=False, repr=False)  # [B, n_out]
    # Triton path: [B, n_out + 1] first token of each group, then L; None on the PyTorch path.
    _bounds: Tensor | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if triton_usable(self.groups.device):
            self._lead, self._bounds = merge.group_index_triton(self.groups, self.weights, self.n_out)
        else:
            self._lead, self._bounds = self._gather.lead, None

    @cached_property
    def _gather(self) -> _RowGather:
        return _RowGather.build(self.groups, self.weights, self.n_out)

    @property
    def length(self) -> int:
        return self.groups.shape[1]

    def apply(self, x: Tensor) -> Tensor:
        """x [B, L, ...] -> [B, n_out, ...]: sum(w x) / sum(w) per group (fp32 sums), dtype kept.
        Groups of one weighted member are exact copies of its row."""
        batch, length = self.groups.shape
        if x.shape[:2] != (batch, length):
            raise ValueError(f"x has shape {tuple(x.shape)}, expected [{batch}, {length}, ...]")
        if self._bounds is not None and triton_usable(x.device) and x.dtype in merge.MERGE_DTYPES:
            out = merge.merge_rows_triton(
                x.reshape(batch, length, -1), self.weights, self._lead, self._bounds
            )
        else:
            out = self._gather.apply(x.reshape(batch * length, -1))
        return out.reshape(batch, self.n_out, *x.shape[2:])

    def positions(self, pos: Tensor) -> Tensor:
        """pos [B, L] -> [B, n_out]: each group's position under the ``first`` policy."""
        return pos.gather(1, self._lead)


def right_aligned_positions(n_original: int, n_now: int, batch: int, device: torch.device | str) -> Tensor:
    """[batch, n_now] int64: the reference's policy, a layer holding n_now of n_original tokens uses
    positions n_original-n_now .. n_original-1."""
    if not 0 <= n_now <= n_original:
        raise ValueError(f"n_now={n_now} must lie in 0..n_original={n_original}")
    return torch.arange(n_original - n_now, n_original, device=device).repeat(batch, 1)


def capped_most(n: int, cap: int) -> int:
    """Tokens the capped greedy selection is sure to remove from a span of n tokens. It only stops
    early when every unselected edge joins two runs of more than ``cap`` tokens together; m such runs
    hold at least floor(m / 2) * (cap + 1) tokens (plus one for odd m), which bounds m."""
    runs = max(2 * ((n - 1) // (cap + 1)) + 1, 2 * (n // (cap + 1)))
    return n - min(runs, n)


def check_spans(length: int, spans: list[tuple[int, int]]) -> None:
    """Raise unless every span (start, end) is non-empty, after the previous one and inside the
    ``length`` tokens."""
    previous_end = 0
    for start, end in spans:
        if not previous_end <= start < end <= length:
            raise ValueError(
                f"audio span ({start}, {end}) is empty, overlaps the previous one or lies outside the "
                f"prompt of {length} tokens"
            )
        previous_end = end


def _check_counts(
    length: int, spans: list[tuple[int, int]], ks: list[int], method: str, max_chain: int | None
) -> None:
    if len(ks) != len(spans):
        raise ValueError(f"got {len(ks)} counts ks for {len(spans)} spans")
    check_spans(length, spans)
    for (start, end), k in zip(spans, ks, strict=True):
        n = end - start
        most = n // 2 if method == "a-tome" else n - 1
        if max_chain is not None:
            most = capped_most(n, max_chain)
        if not 0 <= k <= most:
            capped = "" if max_chain is None else f" with max_chain={max_chain}"
            raise ValueError(
                f"k={k} for span ({start}, {end}): {method}{capped} removes 0..{most} of {n} tokens"
            )


def _batch_of(length: int, keys: Tensor | None, mass: Tensor | None) -> tuple[int, torch.device]:
    if keys is not None:
        if keys.dim() not in (3, 4) or keys.shape[-2 if keys.dim() == 4 else 1] != length:
            raise ValueError(
                f"keys has shape {tuple(keys.shape)}, expected [B, {length}, D] or [B, H, {length}, hd]"
            )
        if mass is not None and mass.shape != (keys.shape[0], length):
            raise ValueError(f"mass has shape {tuple(mass.shape)}, expected {(keys.shape[0], length)}")
        return keys.shape[0], keys.device
    if mass is None:
        raise ValueError("plan_reduction needs keys or mass (they also give the batch size)")
    if mass.dim() != 2 or mass.shape[1] != length:
        raise ValueError(f"mass has shape {tuple(mass.shape)}, expected [B, {length}]")
    return mass.shape[0], mass.device


def _uniform(shape: tuple[int, int], device: torch.device, generator: torch.Generator | None) -> Tensor:
    """Random scores drawn on the generator's device, so a CPU generator gives the same plan anywhere."""
    where = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=where).to(device)


def _mark_top(scores: Tensor, k: int, out: Tensor, *, largest: bool = True) -> None:
    """Sets out[b, i] (a bool view [B, M] of the plan's marks) for the k largest (or smallest) of
    scores [B, M]."""
    if triton_usable(scores.device):
        merge.mark_top_k_triton(scores, k, out, largest=largest)
    else:
        out.scatter_(1, scores.float().topk(k, dim=1, largest=largest, sorted=False).indices, True)


def _mark_top_capped(scores: Tensor, k: int, cap: int, out: Tensor) -> None:
    """Sets out[b, e] (a bool view [B, n-1] of the plan's marks) for k edges of an n-token span, taken
    by decreasing scores [B, n-1] (ties: lower edge first) and skipping any edge that would join more
    than ``cap`` tokens; callers keep k <= capped_most(n, cap), so k edges are always found. A host loop
    (one sync per span) on either path, so both give the same marks."""
    chosen = torch.zeros(out.shape, dtype=torch.bool)
    for b, edges in enumerate(scores.float().argsort(dim=1, descending=True, stable=True).tolist()):
        # first[i] / last[i]: the first / last token of i's run, kept exact at the run's two ends.
        first, last = list(range(len(edges) + 1)), list(range(len(edges) + 1))
        taken = []
        for e in edges:
            lo, hi = first[e], last[e + 1]  # edge e joins the run ending at e to the one starting at e+1
            if hi - lo >= cap:
                continue
            first[hi], last[lo] = lo, hi
            taken.append(e)
            if len(taken) == k:
                break
        chosen[b, taken] = True
    out |= chosen.to(out.device)


def _group(marked: Tensor, mass: Tensor | None, evict: bool) -> tuple[Tensor, Tensor]:
    """marked [B, L] (joins the previous token, or dropped when evict), mass [B, L] or None ->
    groups [B, L] int64, weights [B, L] fp32 (mass floored, or 1; 0 where dropped)."""
    if triton_usable(marked.device):
        return merge.group_rows_triton(marked, mass, evict=evict, floor=_MIN_MASS)
    # Tokens before a row's first unmarked token (evictions at position 0) join group 0.
    groups = ((~marked).long().cumsum(1) - 1).clamp_min(0)
    if mass is not None:
        weights = mass.float().clamp_min(_MIN_MASS)
    else:
        weights = torch.ones(marked.shape, dtype=torch.float32, device=marked.device)
    return groups, torch.where(marked, 0.0, weights) if evict else weights


def plan_reduction(
    method: str,
    length: int,
    spans: list[tuple[int, int]],
    ks: list[int],
    *,
    keys: Tensor | None = None,
    mass: Tensor | None = None,
    generator: torch.Generator | None = None,
    max_chain: int | None = None,
) -> Reduction:
    """One layer's reduction of a batch of sequences of ``length`` tokens.

    spans: audio spans (start, end), identical for all rows; ks[i]: tokens span i loses.
    keys [B, length, D] (heads concatenated) or [B, H, length, hd] (the attention's layout, read in
    place): this layer's keys for similarity methods;
    mass [B, length] fp32: attention mass each token receives, for weights (fastadasp, random-merge)
    and scores (fastv). Merges select edges (t, t+1) inside a span; a run of selected edges collapses
    into one token. Evictions drop tokens; a dropped token joins the previous group with weight 0.
    max_chain (chain methods only, see ReductionConfig): no run of selected edges joins more than
    max_chain tokens; span i then loses at most capped_most(n_i, max_chain).
    """
    if method not in (*MERGE_METHODS, *EVICT_METHODS):
        raise ValueError(f"method={method!r} is not one of {', '.join((*MERGE_METHODS, *EVICT_METHODS))}")
    if method in SIMILARITY_METHODS and keys is None:
        raise ValueError(f"method={method!r} needs keys")
    if method in MASS_METHODS and mass is None:
        raise ValueError(f"method={method!r} needs mass")
    if max_chain is not None and (
        method not in CHAIN_METHODS or isinstance(max_chain, bool) or max_chain < 2
    ):
        raise ValueError(
            f"max_chain={max_chain!r} needs an integer >= 2 and one of {', '.join(CHAIN_METHODS)}"
        )
    _check_counts(length, spans, ks, method, max_chain)
    batch, device = _batch_of(length, keys, mass)

    # Evictions mark dropped tokens; merges mark each token that joins its left neighbour.
    marked = torch.zeros((batch, length), dtype=torch.bool, device=device)
    for (start, end), k in zip(spans, ks, strict=True):
        if k == 0:
            continue
        n = end - start
        if method == "fastv":
            _mark_top(mass[:, start:end], k, marked[:, start:end], largest=False)
        elif method == "random-evict":
            _mark_top(_uniform((batch, n), device, generator), k, marked[:, start:end])
        else:
            if method == "random-merge":
                edge_scores = _uniform((batch, n - 1), device, generator)
            else:
                edge_scores = adjacent_similarity(_per_head(keys)[:, :, start:end])
            if method == "a-tome":  # disjoint pairs (start+2i, start+2i+1): edges 0, 2, 4, ...
                _mark_top(edge_scores[:, ::2], k, marked[:, start + 1 : end : 2])
            elif max_chain is not None:
                _mark_top_capped(edge_scores, k, max_chain, marked[:, start + 1 : end])
            else:
                _mark_top(edge_scores, k, marked[:, start + 1 : end])
    weighted = mass if method in WEIGHTED_METHODS else None
    groups, weights = _group(marked, weighted, method in EVICT_METHODS)

    out_spans, removed = [], 0
    for (start, end), k in zip(spans, ks, strict=True):
        out_spans.append((start - removed, end - removed - k))
        removed += k
    return Reduction(groups=groups, weights=weights, n_out=length - removed, spans=out_spans)


def h2o_keep_indices(mass_per_head: Tensor, k: int) -> Tensor:
    """mass_per_head [B, H, S] (mass each audio key of one span receives, per KV head) ->
    [B, H, S-k] int64: the kept positions in ascending order, the k least attended dropped per head."""
    if mass_per_head.dim() != 3:
        raise ValueError(f"mass_per_head has shape {tuple(mass_per_head.shape)}, expected [B, H, S]")
    size = mass_per_head.shape[-1]
    if not 0 <= k < size:
        raise ValueError(f"k={k} must lie in 0..{size - 1} (a head keeps at least one of {size} keys)")
    return mass_per_head.topk(size - k, dim=-1, sorted=False).indices.sort(dim=-1).values
