"""Blockwise attention mass against an explicit softmax, and its memory bound."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from pipeline.kernels.attention_mass import attention_mass_torch


def explicit_mass(q, k, scale, causal, span, query_start):
    """Full [B, Hq, Lq, Lk] softmax in float64, summed over queries: [B, Hkv, S]."""
    group = q.shape[1] // k.shape[1]
    keys = k.double().repeat_interleave(group, dim=1)
    scores = q.double() @ keys.transpose(-1, -2) * scale
    if causal:
        pos = torch.arange(query_start, query_start + q.shape[2])
        scores = scores.masked_fill(torch.arange(k.shape[2])[None] > pos[:, None], float("-inf"))
    probs = scores.softmax(-1)[..., span[0] : span[1]].sum(2)
    return probs.reshape(q.shape[0], k.shape[1], group, -1).sum(2)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("q_heads", "kv_heads"), [(4, 4), (6, 2), (4, 1)])
@pytest.mark.parametrize("query_start", [0, 23])
@pytest.mark.parametrize("block", [1, 7, 512])
def test_matches_explicit_softmax(causal, q_heads, kv_heads, query_start, block):
    gen = torch.Generator().manual_seed(q_heads + kv_heads + query_start)
    k = torch.randn(2, kv_heads, 40, 8, generator=gen)
    q = torch.randn(2, q_heads, 40 - query_start, 8, generator=gen) * 2
    span = (5, 30)
    expected = explicit_mass(q, k, 0.35, causal, span, query_start)
    per_head = attention_mass_torch(
        q, k, scale=0.35, causal=causal, span=span, query_start=query_start, block=block, per_head=True
    )
    assert per_head.shape == (2, kv_heads, 25) and per_head.dtype == torch.float32
    torch.testing.assert_close(per_head.double(), expected, rtol=1e-5, atol=1e-5)
    total = attention_mass_torch(
        q, k, scale=0.35, causal=causal, span=span, query_start=query_start, block=block
    )
    torch.testing.assert_close(total.double(), expected.sum(1), rtol=1e-5, atol=1e-5)


def test_tail_queries_and_bf16_inputs():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 50, 16, generator=gen).bfloat16()
    k = torch.randn(1, 2, 50, 16, generator=gen).bfloat16()
    full = explicit_mass(q, k, 0.25, True, (10, 30), 0)
    tail = explicit_mass(q[:, :, 30:], k, 0.25, True, (10, 30), 30)
    got = attention_mass_torch(
        q[:, :, 30:], k, scale=0.25, causal=True, span=(10, 30), query_start=30, block=8
    )
    torch.testing.assert_close(got.double(), tail.sum(1), rtol=1e-5, atol=1e-5)
    assert (full.sum(1) > got.double()).all()  # the tail sees fewer queries than the full estimator


def test_probabilities_of_all_keys_sum_to_query_count():
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 2, 30, 4, generator=gen), torch.randn(1, 2, 30, 4, generator=gen)
    mass = attention_mass_torch(q, k, scale=1.0, causal=True, span=(0, 30), block=4)
    assert mass.sum().item() == pytest.approx(2 * 30, rel=1e-5)


def largest_allocation(block: int) -> int:
    q, k = torch.randn(1, 8, 1024, 32), torch.randn(1, 2, 1024, 32)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        attention_mass_torch(q, k, scale=0.2, causal=False, span=(100, 900), block=block)
    return max(event.cpu_memory_usage for event in prof.events())


def test_memory_is_bounded_by_the_block():
    block_scores = 8 * 64 * 1024 * 4  # Hq x block x Lk fp32
    assert largest_allocation(64) <= block_scores
    assert largest_allocation(1024) >= 16 * block_scores  # one block = everything: B x Hq x Lq x Lk


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"span": (0, 41)}, "outside"),
        ({"span": (5, 5)}, "outside"),
        ({"query_start": 1}, "causal queries"),
        ({"block": 0}, "block"),
        ({"k": torch.randn(1, 3, 40, 8)}, "do not match"),
    ],
)
def test_bad_input_raises(kwargs, message):
    args = {"q": torch.randn(1, 4, 40, 8), "k": torch.randn(1, 2, 40, 8), "span": (0, 10)}
    args |= {"scale": 1.0, "causal": True} | kwargs
    with pytest.raises(ValueError, match=message):
        attention_mass_torch(**args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_memory_is_bounded_by_the_block():
    q = torch.randn(1, 8, 4096, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 2, 4096, 64, device="cuda", dtype=torch.bfloat16)

    def peak_bytes(block: int) -> tuple[int, torch.Tensor]:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        mass = attention_mass_torch(q, k, scale=0.125, causal=True, span=(100, 4000), block=block)
        return torch.cuda.max_memory_allocated() - base, mass

    peak_bytes(256)  # warm-up: cuBLAS allocates its workspace once, through the same allocator
    peak, got = peak_bytes(256)
    block_scores = 8 * 256 * 4096 * 4
    # One block's scores and their softmax, plus cuBLAS / small buffers (seen: 3.9 blocks on an H200).
    assert peak < 5 * block_scores
    assert peak_bytes(4096)[0] > 4 * peak  # one block for all queries: 16 times the scores
    expected = explicit_mass(q.cpu()[:, :, :512], k.cpu(), 0.125, True, (100, 4000), 0).sum(1)
    part = attention_mass_torch(q[:, :, :512], k, scale=0.125, causal=True, span=(100, 4000), block=100)
    # bf16 on CUDA: the product runs on tensor cores from q * scale rounded to bf16 (~0.2% per logit).
    torch.testing.assert_close(part.double().cpu(), expected, rtol=1e-2, atol=1e-3)
    exact = attention_mass_torch(q[:, :, :512].float(), k.float(), scale=0.125, causal=True, span=(100, 4000))
    torch.testing.assert_close(exact.double().cpu(), expected, rtol=1e-4, atol=1e-4)
    assert got.shape == (1, 3900)
