"""Reduction planning and application: invariants over random inputs plus explicit cases."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.kernels.paths import forced_path
from pipeline.merging.config import CHAIN_METHODS, EVICT_METHODS, MERGE_METHODS
from pipeline.merging.ops import (
    Reduction,
    adjacent_similarity,
    capped_most,
    h2o_keep_indices,
    plan_reduction,
    right_aligned_positions,
)

METHODS = (*MERGE_METHODS, *EVICT_METHODS)


def first_index(red: Reduction) -> torch.Tensor:
    """[B, n_out] index (0..L-1) of each group's first token carrying weight (its first token for
    merges; the surviving token for evictions): its position under the ``first`` policy at 0..L-1."""
    batch, length = red.groups.shape
    return red.positions(torch.arange(length, device=red.groups.device).expand(batch, length))


def reference_apply(groups: torch.Tensor, weights: torch.Tensor, n_out: int, x: torch.Tensor) -> torch.Tensor:
    """Plain scatter formulation of sum(w x) / sum(w) per group, in float64."""
    batch, _, width = x.shape
    index = groups[..., None].expand(-1, -1, width)
    num = torch.zeros(batch, n_out, width, dtype=torch.float64).scatter_add_(
        1, index, weights.double()[..., None] * x.double()
    )
    den = torch.zeros(batch, n_out, dtype=torch.float64).scatter_add_(1, groups, weights.double())
    return num / den[..., None]


def draw_spans(draw, max_spans: int, max_len: int, most) -> tuple[list[tuple[int, int]], list[int], int]:
    """1..max_spans audio spans of 1..max_len tokens between text, a count in [0, most(n)] for each,
    and the sequence length."""
    spans, ks, cursor = [], [], draw(st.integers(0, 3))
    for _ in range(draw(st.integers(1, max_spans))):
        n = draw(st.integers(1, max_len))
        spans.append((cursor, cursor + n))
        ks.append(draw(st.integers(0, most(n))))
        cursor += n + draw(st.integers(0, 3))
    return spans, ks, cursor


@st.composite
def problems(draw):
    """A batch, a sequence with 1-3 audio spans between text, a method and per-span counts."""
    method = draw(st.sampled_from(METHODS))
    batch = draw(st.integers(1, 3))
    spans, ks, length = draw_spans(draw, 3, 16, lambda n: n // 2 if method == "a-tome" else n - 1)
    seed = draw(st.integers(0, 2**16))
    return method, batch, length, spans, ks, seed


def make_inputs(batch: int, length: int, seed: int, width: int = 6):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, length, 4, generator=gen)
    mass = torch.rand(batch, length, generator=gen) * 5 + 0.01
    x = torch.randn(batch, length, width, generator=gen)
    return keys, mass, x


def span_of(t: int, spans: list[tuple[int, int]]) -> int | None:
    return next((i for i, (s, e) in enumerate(spans) if s <= t < e), None)


@settings(max_examples=150, deadline=None)
@given(problems())
def test_reduction_invariants(problem):
    method, batch, length, spans, ks, seed = problem
    keys, mass, x = make_inputs(batch, length, seed)
    red = plan_reduction(
        method, length, spans, ks, keys=keys, mass=mass, generator=torch.Generator().manual_seed(seed)
    )
    groups, weights = red.groups, red.weights
    assert red.n_out == length - sum(ks)
    # Groups: contiguous runs 0..n_out-1 in order.
    assert groups.shape == (batch, length) and groups.dtype == torch.int64
    assert (groups[:, 0] == 0).all() and (groups[:, -1] == red.n_out - 1).all()
    steps = groups[:, 1:] - groups[:, :-1]
    assert ((steps == 0) | (steps == 1)).all()
    lead = first_index(red)
    assert (lead[:, 1:] > lead[:, :-1]).all()  # order kept
    assert (groups.gather(1, lead) == torch.arange(red.n_out)).all()
    assert (weights >= 0).all()

    out = red.apply(x)
    assert out.shape == (batch, red.n_out, x.shape[-1])
    torch.testing.assert_close(
        out.double(), reference_apply(groups, weights, red.n_out, x), rtol=1e-5, atol=1e-5
    )
    # Conservation of weighted sums.
    group_weight = torch.zeros(batch, red.n_out).scatter_add_(1, groups, weights)
    torch.testing.assert_close(
        (group_weight[..., None] * out).sum(1), (weights[..., None] * x).sum(1), rtol=1e-4, atol=1e-4
    )

    # Text untouched, exactly k removed per span, spans mapped to the reported output spans.
    for b in range(batch):
        for t in range(length):
            i = span_of(t, spans)
            g = int(groups[b, t])
            if i is None:
                assert int(lead[b, g]) == t and torch.equal(out[b, g], x[b, t])
            elif weights[b, t] > 0:
                s_out, e_out = red.spans[i]
                assert s_out <= g < e_out
    for (s, e), k, (s_out, e_out) in zip(spans, ks, red.spans, strict=True):
        assert e_out - s_out == e - s - k
    # Members of a group all lie in one span (or it is a single text token).
    for b in range(batch):
        members: dict[int, set] = {}
        for t in range(length):
            if weights[b, t] > 0:
                members.setdefault(int(groups[b, t]), set()).add(span_of(t, spans))
        assert all(len(v) == 1 for v in members.values())

    sizes = torch.zeros(batch, red.n_out, dtype=torch.int64).scatter_add_(1, groups, (weights > 0).long())
    if method in EVICT_METHODS:
        # One surviving member per group, whose row is copied exactly.
        assert (sizes == 1).all()
        assert torch.equal(out, x.gather(1, lead[..., None].expand(-1, -1, x.shape[-1])))
        assert int((weights == 0).sum()) == batch * sum(ks)
    else:
        assert (weights > 0).all()
    if method == "a-tome":
        assert sizes.max() <= 2
        # A token joined to its left neighbour sits at an odd offset: pairs are (s+2i, s+2i+1).
        for t in ((steps == 0).nonzero()[:, 1] + 1).tolist():
            start = spans[span_of(t, spans)][0]
            assert (t - start) % 2 == 1


@settings(max_examples=40, deadline=None)
@given(problems())
def test_zero_counts_are_the_identity(problem):
    method, batch, length, spans, _, seed = problem
    keys, mass, x = make_inputs(batch, length, seed)
    red = plan_reduction(method, length, spans, [0] * len(spans), keys=keys, mass=mass)
    assert red.n_out == length and red.spans == spans
    assert torch.equal(red.groups, torch.arange(length).expand(batch, -1))
    assert torch.equal(red.apply(x), x)


@st.composite
def capped_problems(draw):
    """A chain method, a cap and 1-2 spans with counts the capped selection can always reach."""
    method = draw(st.sampled_from(CHAIN_METHODS))
    cap = draw(st.integers(2, 5))
    spans, ks, length = draw_spans(draw, 2, 24, lambda n: capped_most(n, cap))
    return method, cap, length, spans, ks, draw(st.integers(0, 2**16))


@settings(max_examples=150, deadline=None)
@given(capped_problems())
def test_max_chain_caps_every_group_and_removes_exactly_k(problem):
    method, cap, length, spans, ks, seed = problem
    keys, mass, _ = make_inputs(2, length, seed)

    def plan(max_chain):
        gen = torch.Generator().manual_seed(seed)
        return plan_reduction(
            method, length, spans, ks, keys=keys, mass=mass, generator=gen, max_chain=max_chain
        )

    red = plan(cap)
    sizes = torch.zeros(2, red.n_out, dtype=torch.int64).scatter_add_(
        1, red.groups, torch.ones_like(red.groups)
    )
    assert sizes.max() <= cap
    assert red.n_out == length - sum(ks)
    for b in range(2):
        for (s, e), k in zip(spans, ks, strict=True):
            assert int(red.groups[b, e - 1] - red.groups[b, s]) == e - s - 1 - k  # exactly k lost per span
    # A cap no chain can reach selects the same edges as plain top-k (random scores: no ties).
    if all(k == 0 or e - s <= cap for (s, e), k in zip(spans, ks, strict=True)):
        assert torch.equal(red.groups, plan(None).groups)


def test_capped_most_is_what_greedy_can_always_reach():
    # Worst stalls: runs alternating 1, cap (every neighbouring pair joins more than cap tokens).
    assert [capped_most(n, 2) for n in range(1, 9)] == [0, 1, 1, 1, 2, 2, 2, 3]
    assert capped_most(700, 2) == 233 and capped_most(700, 3) == 350
    assert capped_most(4, 9) == 3  # span shorter than the cap: anything up to n - 1


def test_max_chain_splits_a_run_of_similar_tokens():
    keys = chain_keys()  # tokens 3..6 identical: edges 3, 4, 5 tie for the top
    red = plan_reduction("average", 10, [(1, 9)], [3], keys=keys, max_chain=2)
    sizes = torch.bincount(red.groups[0])
    assert sizes.max() == 2 and red.n_out == 7
    assert red.groups[0, :7].tolist() == [0, 1, 2, 3, 3, 4, 4]  # ties by edge order: (3, 4), then (5, 6)


def test_max_chain_gives_the_same_plan_on_the_triton_path():
    keys, mass, _ = make_inputs(2, 80, 3)
    spans, ks = [(4, 40), (44, 78)], [11, 9]
    plans = []
    for path in ("pytorch", "triton"):
        with forced_path(path):
            plans.append(plan_reduction("fastadasp", 80, spans, ks, keys=keys, mass=mass, max_chain=3))
    assert torch.equal(plans[0].groups, plans[1].groups)
    torch.testing.assert_close(plans[0].weights, plans[1].weights)


@pytest.mark.parametrize("method", ["random-merge", "random-evict"])
def test_random_methods_are_deterministic_per_seed(method):
    keys, mass, _ = make_inputs(2, 40, 0)

    def plan(seed):
        gen = torch.Generator().manual_seed(seed)
        return plan_reduction(method, 40, [(5, 35)], [10], keys=keys, mass=mass, generator=gen).groups

    assert torch.equal(plan(1), plan(1))
    assert not torch.equal(plan(1), plan(2))


def test_adjacent_similarity_is_neighbour_cosine():
    keys = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [0.0, -1.0]]], dtype=torch.bfloat16)
    sim = adjacent_similarity(keys)
    assert sim.dtype == torch.float32
    torch.testing.assert_close(sim, torch.tensor([[1.0, 0.0, -1.0]]))


def chain_keys() -> torch.Tensor:
    """10 tokens, tokens 3..6 share one direction (a run of 3 similar edges), others alternate."""
    keys = torch.zeros(1, 10, 4)
    for t in range(10):
        keys[0, t, t % 2] = 1.0
        keys[0, t, 2] = 0.1 * t
    keys[0, 3:7] = torch.tensor([0.0, 0.0, 0.0, 1.0])
    return keys


def test_fastadasp_collapses_a_chain_into_one_weighted_token():
    keys = chain_keys()
    mass = torch.arange(1.0, 11.0)[None]
    x = torch.arange(10.0)[None, :, None]
    red = plan_reduction("fastadasp", 10, [(1, 9)], [3], keys=keys, mass=mass)
    assert red.groups.tolist() == [[0, 1, 2, 3, 3, 3, 3, 4, 5, 6]]
    assert red.spans == [(1, 6)]
    expected = (mass[0, 3:7] * x[0, 3:7, 0]).sum() / mass[0, 3:7].sum()
    out = red.apply(x)
    torch.testing.assert_close(out[0, 3, 0], expected)
    assert out[0, [0, 1, 2, 4, 5, 6], 0].tolist() == [0.0, 1.0, 2.0, 7.0, 8.0, 9.0]
    average = plan_reduction("average", 10, [(1, 9)], [3], keys=keys).apply(x)
    assert average[0, 3, 0].item() == pytest.approx(4.5)


def test_a_tome_merges_only_aligned_pairs():
    keys = chain_keys()  # the similar run 3..6 holds the aligned pairs (3, 4) and (5, 6) of span (1, 9)
    red = plan_reduction("a-tome", 10, [(1, 9)], [2], keys=keys)
    assert red.groups.tolist() == [[0, 1, 2, 3, 3, 4, 4, 5, 6, 7]]


def test_fastv_drops_the_least_attended():
    mass = torch.tensor([[9.0, 5.0, 0.1, 7.0, 0.2, 6.0, 9.0]])
    x = torch.arange(7.0)[None, :, None]
    red = plan_reduction("fastv", 7, [(1, 6)], [2], mass=mass)
    assert red.apply(x)[0, :, 0].tolist() == [0.0, 1.0, 3.0, 5.0, 6.0]
    assert red.weights.tolist() == [[1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0]]


def test_eviction_at_sequence_start_keeps_the_surviving_position():
    mass = torch.tensor([[0.1, 0.2, 5.0, 6.0]])
    red = plan_reduction("fastv", 4, [(0, 4)], [2], mass=mass)
    assert first_index(red).tolist() == [[2, 3]]
    pos = torch.arange(4)[None] + 100
    assert red.positions(pos).tolist() == [[102, 103]]
    x = torch.randn(1, 4, 3, dtype=torch.bfloat16)
    assert torch.equal(red.apply(x), x[:, 2:])


def test_positions_first_and_right_aligned():
    keys = chain_keys()
    red = plan_reduction("average", 10, [(1, 9)], [3], keys=keys)
    pos = torch.arange(10)[None]
    assert red.positions(pos).tolist() == [[0, 1, 2, 3, 7, 8, 9]]
    right = right_aligned_positions(10, 7, 2, "cpu")
    assert right.tolist() == [[3, 4, 5, 6, 7, 8, 9]] * 2
    with pytest.raises(ValueError, match="n_now"):
        right_aligned_positions(5, 6, 1, "cpu")


def test_bf16_groups_are_summed_in_fp32():
    # In bf16, 256 + 1 + 1 rounds to 256 (the spacing at 256 is 2); the fp32 mean is exactly 86.
    x = torch.tensor([[[256.0], [1.0], [1.0]]], dtype=torch.bfloat16)
    keys = torch.ones(1, 3, 2)
    out = plan_reduction("average", 3, [(0, 3)], [2], keys=keys).apply(x)
    assert out.dtype == torch.bfloat16 and out.item() == 86.0


def test_apply_keeps_trailing_dims():
    keys, mass, _ = make_inputs(2, 12, 3)
    x = torch.randn(2, 12, 3, 5)
    red = plan_reduction("fastadasp", 12, [(2, 10)], [4], keys=keys, mass=mass)
    flat = red.apply(x.reshape(2, 12, 15)).reshape(2, 8, 3, 5)
    assert torch.equal(red.apply(x), flat)


def test_zero_mass_does_not_divide_by_zero():
    keys = torch.ones(1, 4, 2)
    red = plan_reduction("fastadasp", 4, [(0, 4)], [3], keys=keys, mass=torch.zeros(1, 4))
    assert torch.isfinite(red.apply(torch.randn(1, 4, 2))).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "h2o"}, "method='h2o' is not one of"),
        ({"method": "tome"}, "method='tome' is not one of"),
        ({"ks": [8]}, "k=8 for span"),
        ({"ks": [-1]}, "k=-1 for span"),
        ({"method": "a-tome", "ks": [5]}, "a-tome removes 0..4"),
        ({"spans": [(5, 13)]}, "outside"),
        ({"spans": [(2, 6), (4, 8)], "ks": [1, 1]}, "overlaps"),
        ({"spans": [(3, 3)]}, "empty"),
        ({"ks": [1, 1]}, "2 counts"),
        ({"keys": None}, "needs keys"),
        ({"mass": None}, "needs mass"),
        ({"method": "random-evict", "keys": None, "mass": None}, "needs keys or mass"),
        ({"mass": torch.ones(2, 12)}, "mass has shape"),
        ({"max_chain": 2, "ks": [4]}, "fastadasp with max_chain=2 removes 0..3 of 8"),
        ({"max_chain": 1}, "max_chain=1 needs an integer >= 2"),
        ({"method": "a-tome", "max_chain": 2}, "max_chain=2 needs an integer >= 2 and one of fastadasp"),
        ({"keys": torch.ones(1, 11, 4)}, "keys has shape"),
    ],
)
def test_bad_input_raises(kwargs, message):
    args = {"method": "fastadasp", "length": 12, "spans": [(2, 10)], "ks": [2]}
    args |= {"keys": torch.randn(1, 12, 4), "mass": torch.ones(1, 12)}
    args |= kwargs
    with pytest.raises(ValueError, match=message):
        plan_reduction(**args)


def test_h2o_keep_indices_sorted_and_per_head():
    gen = torch.Generator().manual_seed(0)
    mass = torch.rand(2, 3, 20, generator=gen)
    keep = h2o_keep_indices(mass, 6)
    assert keep.shape == (2, 3, 14) and keep.dtype == torch.int64
    assert (keep[..., 1:] > keep[..., :-1]).all()
    for b in range(2):
        for h in range(3):
            expected = sorted(mass[b, h].argsort(descending=True)[:14].tolist())
            assert keep[b, h].tolist() == expected
    assert not torch.equal(keep[0, 0], keep[0, 1])
    assert torch.equal(h2o_keep_indices(mass, 0), torch.arange(20).expand(2, 3, 20))
    with pytest.raises(ValueError, match="k=20"):
        h2o_keep_indices(mass, 20)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", METHODS)
def test_cuda_matches_cpu(method, dtype):
    """CUDA takes the Triton kernels where triton is installed: same plan, copies exact, sums close."""
    keys, mass, x = make_inputs(2, 300, 0, width=16)
    x = x.to(dtype)
    spans, ks = [(10, 150), (160, 290)], [40, 60]

    def run(device):
        gen = torch.Generator().manual_seed(0)
        red = plan_reduction(
            method, 300, spans, ks, keys=keys.to(device), mass=mass.to(device), generator=gen
        )
        return red.groups.cpu(), first_index(red).cpu(), red.apply(x.to(device)).cpu()

    groups_cpu, lead_cpu, out_cpu = run("cpu")
    groups_gpu, lead_gpu, out_gpu = run("cuda")
    assert torch.equal(groups_cpu, groups_gpu) and torch.equal(lead_cpu, lead_gpu)
    size = torch.zeros(2, out_cpu.shape[1], dtype=torch.int64).scatter_add_(
        1, groups_cpu, torch.ones_like(groups_cpu)
    )
    single = (size == 1) | (method in EVICT_METHODS)
    assert torch.equal(out_gpu[single], out_cpu[single])
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(out_gpu, out_cpu, rtol=tol, atol=1e-5)


def test_forced_path_rejects_unknown_names():
    with pytest.raises(ValueError, match="path='gpu'"), forced_path("gpu"):
        pass
