"""Token reduction maths: adjacent similarity, chain grouping, weighted merge, evictions.

Pure tensor functions, model-agnostic. A layer's reduction is planned once (``plan_reduction``) as a
``Reduction``: a non-decreasing group id per token and a weight per token; applying it to any
[B, L, ...] tensor gives the weighted mean of each group. Text outside the audio spans is never touched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from pipeline.merging.config import EVICT_METHODS, MERGE_METHODS

SIMILARITY_METHODS = ("fastadasp", "average", "a-tome")
MASS_METHODS = ("fastadasp", "random-merge", "fastv")
# Attention mass can underflow to 0; a group whose weights are all 0 would divide 0 by 0. Masses are
# sums of probabilities (order 1 and above), so this floor never changes a real weight.
_MIN_MASS = 1e-20


def adjacent_similarity(keys: Tensor) -> Tensor:
    """keys [B, L, D] (heads concatenated) -> cosine similarity of neighbours [B, L-1], fp32."""
    unit = torch.nn.functional.normalize(keys.float(), dim=-1)
    return (unit[:, :-1] * unit[:, 1:]).sum(-1)


@dataclass
class Reduction:
    """How one layer shortens a whole sequence of length L to ``n_out`` tokens.

    groups [B, L] int64, non-decreasing along L, values 0..n_out-1, every output id used;
    weights [B, L] fp32 >= 0 (an evicted token has weight 0 and sits in a neighbour's group);
    spans: audio spans (start, end) after the reduction, the same for every batch row.
    Each group is represented by its lead, the first member with positive weight: ``apply`` copies the
    lead's row for groups of one weighted member and takes the weighted mean (fp32) for merged groups.
    """

    groups: Tensor
    weights: Tensor
    n_out: int
    spans: list[tuple[int, int]]
    # Derived once, so that apply() is a row gather plus a small weighted sum over the merged tokens.
    # "Extras" are the L - n_out non-lead tokens of each row; rows are indexed in flattened [B * L].
    _lead: Tensor = field(init=False, repr=False)  # [B, n_out]
    _lead_rows: Tensor = field(init=False, repr=False)  # [B * n_out] rows of x copied to the output
    _extra_rows: Tensor = field(init=False, repr=False)  # [B * E] rows of x of the extras
    _extra_out: Tensor = field(init=False, repr=False)  # [B * E] output rows (groups) of the extras
    _extra_head: Tensor = field(init=False, repr=False)  # [B * E] first extra slot of the same group
    _w_extra: Tensor = field(init=False, repr=False)  # [B * E, 1] extra weights
    _w_lead: Tensor = field(init=False, repr=False)  # [B * E, 1] the group's lead weight, at heads only
    _inv_total: Tensor = field(init=False, repr=False)  # [B * E, 1] 1 / total weight of the group
    _merges: bool = field(init=False, repr=False)  # some extra carries weight (not a pure eviction)

    def __post_init__(self) -> None:
        batch, length = self.groups.shape
        device = self.groups.device
        index = torch.arange(length, device=device).expand(batch, length)
        # Lead = smallest index among positive-weight members (all-zero group: its first member).
        key = index + length * (self.weights <= 0)
        lead = torch.full((batch, self.n_out), 2 * length, dtype=torch.int64, device=device)
        self._lead = lead.scatter_reduce(1, self.groups, key, "amin") % length
        row0 = torch.arange(batch, device=device)[:, None]
        self._lead_rows = (self._lead + row0 * length).flatten()
        is_lead = torch.zeros((batch, length), dtype=torch.int8, device=device).scatter_(1, self._lead, 1)
        n_extra = length - self.n_out
        extra = torch.sort(is_lead, dim=1, stable=True).indices[:, :n_extra]
        extra_group = self.groups.gather(1, extra)
        starts = torch.ones_like(extra_group, dtype=torch.bool)
        starts[:, 1:] = extra_group[:, 1:] != extra_group[:, :-1]
        slot = torch.arange(n_extra, device=device).expand_as(starts)
        head = torch.where(starts, slot, 0).cummax(dim=1).values
        w_extra = self.weights.gather(1, extra)
        w_lead = torch.where(starts, self.weights.gather(1, self._lead.gather(1, extra_group)), 0.0)
        total = w_lead.scatter_add(1, head, w_extra).gather(1, head)
        self._extra_rows = (extra + row0 * length).flatten()
        self._extra_out = (extra_group + row0 * self.n_out).flatten()
        self._extra_head = (head + row0 * n_extra).flatten()
        self._w_extra = w_extra.reshape(-1, 1)
        self._w_lead = w_lead.reshape(-1, 1)
        self._inv_total = total.reciprocal().reshape(-1, 1)
        self._merges = bool((w_extra > 0).any())  # one host sync per plan

    @property
    def length(self) -> int:
        return self.groups.shape[1]

    def apply(self, x: Tensor) -> Tensor:
        """x [B, L, ...] -> [B, n_out, ...]: sum(w x) / sum(w) per group (fp32 sums), dtype kept.
        Groups of one weighted member are exact copies of its row."""
        batch, length = self.groups.shape
        if x.shape[:2] != (batch, length):
            raise ValueError(f"x has shape {tuple(x.shape)}, expected [{batch}, {length}, ...]")
        rows = x.reshape(batch * length, -1)
        out = rows.index_select(0, self._lead_rows)
        if self._merges:
            # Accumulate each merged group at its head slot (lead term once, plus every extra) in fp32:
            # multiplying by the fp32 weights promotes in the same kernel.
            acc = torch.mul(out.index_select(0, self._extra_out), self._w_lead)
            acc.index_add_(
                0, self._extra_head, torch.mul(rows.index_select(0, self._extra_rows), self._w_extra)
            )
            mean = acc.mul_(self._inv_total).to(out.dtype).index_select(0, self._extra_head)
            # Every extra of a group writes its group's mean, so duplicate targets are harmless.
            out.index_copy_(0, self._extra_out, mean)
        return out.reshape(batch, self.n_out, *x.shape[2:])

    def first_index(self) -> Tensor:
        """[B, n_out] index (0..L-1) of each group's first token carrying weight (its first token for
        merges; the surviving token for evictions)."""
        return self._lead

    def positions(self, pos: Tensor) -> Tensor:
        """pos [B, L] -> [B, n_out]: each group's position under the ``first`` policy."""
        return pos.gather(1, self._lead)


def right_aligned_positions(n_original: int, n_now: int, batch: int, device: torch.device | str) -> Tensor:
    """[batch, n_now] int64: the reference's policy, a layer holding n_now of n_original tokens uses
    positions n_original-n_now .. n_original-1."""
    if not 0 <= n_now <= n_original:
        raise ValueError(f"n_now={n_now} must lie in 0..n_original={n_original}")
    return torch.arange(n_original - n_now, n_original, device=device).repeat(batch, 1)


def _check_spans(length: int, spans: list[tuple[int, int]], ks: list[int], method: str) -> None:
    if len(ks) != len(spans):
        raise ValueError(f"got {len(ks)} counts ks for {len(spans)} spans")
    previous_end = 0
    for (start, end), k in zip(spans, ks, strict=True):
        if not previous_end <= start < end <= length:
            raise ValueError(
                f"span ({start}, {end}) is empty, overlaps the previous one or lies outside 0..{length}"
            )
        previous_end = end
        n = end - start
        most = n // 2 if method == "a-tome" else n - 1
        if not 0 <= k <= most:
            raise ValueError(f"k={k} for span ({start}, {end}): {method} removes 0..{most} of {n} tokens")


def _batch_of(length: int, keys: Tensor | None, mass: Tensor | None) -> tuple[int, torch.device]:
    if keys is not None:
        if keys.dim() != 3 or keys.shape[1] != length:
            raise ValueError(f"keys has shape {tuple(keys.shape)}, expected [B, {length}, D]")
        if mass is not None and mass.shape != keys.shape[:2]:
            raise ValueError(f"mass has shape {tuple(mass.shape)}, expected {tuple(keys.shape[:2])}")
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


def _top(scores: Tensor, k: int) -> Tensor:
    return scores.topk(k, dim=1, sorted=False).indices


def plan_reduction(
    method: str,
    length: int,
    spans: list[tuple[int, int]],
    ks: list[int],
    *,
    keys: Tensor | None = None,
    mass: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Reduction:
    """One layer's reduction of a batch of sequences of ``length`` tokens.

    spans: audio spans (start, end), identical for all rows; ks[i]: tokens span i loses.
    keys [B, length, D]: this layer's keys (heads concatenated) for similarity methods;
    mass [B, length] fp32: attention mass each token receives, for weights (fastadasp, random-merge)
    and scores (fastv). Merges select edges (t, t+1) inside a span; a run of selected edges collapses
    into one token. Evictions drop tokens; a dropped token joins the previous group with weight 0.
    """
    if method not in (*MERGE_METHODS, *EVICT_METHODS):
        raise ValueError(f"method={method!r} is not one of {', '.join((*MERGE_METHODS, *EVICT_METHODS))}")
    if method in SIMILARITY_METHODS and keys is None:
        raise ValueError(f"method={method!r} needs keys")
    if method in MASS_METHODS and mass is None:
        raise ValueError(f"method={method!r} needs mass")
    _check_spans(length, spans, ks, method)
    batch, device = _batch_of(length, keys, mass)

    joined = torch.zeros((batch, length), dtype=torch.bool, device=device)  # t merges into t-1
    dropped = torch.zeros((batch, length), dtype=torch.bool, device=device)
    for (start, end), k in zip(spans, ks, strict=True):
        if k == 0:
            continue
        n = end - start
        if method in EVICT_METHODS:
            if method == "fastv":
                scores = -mass[:, start:end].float()
            else:
                scores = _uniform((batch, n), device, generator)
            dropped[:, start:end].scatter_(1, _top(scores, k), True)
            continue
        if method == "random-merge":
            edge_scores = _uniform((batch, n - 1), device, generator)
        else:
            edge_scores = adjacent_similarity(keys[:, start:end])
        # a-tome: disjoint pairs (start+2i, start+2i+1), i.e. edges 0, 2, 4, ... of the span.
        edges = _top(edge_scores[:, ::2], k) * 2 if method == "a-tome" else _top(edge_scores, k)
        joined[:, start + 1 : end].scatter_(1, edges, True)

    kept = ~dropped
    starts = kept & ~joined
    # Tokens before a row's first kept token (evictions at position 0) join group 0.
    groups = (starts.long().cumsum(1) - 1).clamp_min(0)
    if method in ("fastadasp", "random-merge"):
        weights = mass.float().clamp_min(_MIN_MASS)
    else:
        weights = torch.ones((batch, length), dtype=torch.float32, device=device)
    weights = torch.where(dropped, 0.0, weights)

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
