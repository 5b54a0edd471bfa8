"""Fused attention with its log-sum-exp, and the attention mass that reuses it (one pass instead of two)."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.kernels.attention_mass import attention_mass, attention_mass_torch, attention_with_lse
from tests.test_kernels_attention_mass_torch import explicit_mass

CUDA = torch.cuda.is_available()


def _qkv(seed, q_heads, kv_heads, length, dim, device="cpu", dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, q_heads, length, dim, generator=gen) * 1.5
    k, v = (torch.randn(2, kv_heads, length, dim, generator=gen) for _ in range(2))
    return (t.to(device, dtype) for t in (q, k, v))


def _explicit_lse(q, k, scale, causal):
    keys = k.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = q.double() @ keys.transpose(-1, -2) * scale
    if causal:
        n = q.shape[2]
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return scores.logsumexp(-1)


@pytest.mark.parametrize(("q_heads", "kv_heads"), [(4, 4), (4, 2)])
@pytest.mark.parametrize("causal", [True, False])
def test_cpu_output_is_sdpa_and_lse_is_exact(q_heads, kv_heads, causal):
    q, k, v = _qkv(q_heads + kv_heads, q_heads, kv_heads, 37, 16)
    out, lse = attention_with_lse(q, k, v, scale=0.25, causal=causal)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=causal, scale=0.25, enable_gqa=q_heads != kv_heads
    )
    assert torch.equal(out, expected)  # the same kernel SDPA runs on CPU: merge layers change nothing
    assert lse.shape == (2, q_heads, 37) and lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), _explicit_lse(q, k, 0.25, causal), rtol=1e-6, atol=1e-5)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # memory-efficient / flash kernels
def test_cuda_lse_matches_explicit(dtype):
    q, k, v = _qkv(3, 4, 2, 301, 64, "cuda", dtype)  # 301: not a multiple of the efficient kernel's 32
    out, lse = attention_with_lse(q, k, v, scale=0.125, causal=True)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=0.125, enable_gqa=True
    )
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
    explicit = _explicit_lse(q.cpu().float(), k.cpu().float(), 0.125, True)
    torch.testing.assert_close(lse.cpu().double(), explicit, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("block", [1, 7, 512])
@pytest.mark.parametrize(("causal", "query_start"), [(True, 0), (True, 23), (False, 0)])
def test_blockwise_mass_with_lse_matches_explicit_softmax(block, causal, query_start):
    q, k, v = _qkv(block, 6, 2, 40, 8)
    _, lse = attention_with_lse(q, k, v, scale=0.35, causal=causal)
    q, lse = q[:, :, query_start:], lse[:, :, query_start:]
    span = (5, 30)
    got = attention_mass_torch(
        q,
        k,
        scale=0.35,
        causal=causal,
        span=span,
        query_start=query_start,
        block=block,
        per_head=True,
        lse=lse,
    )
    expected = explicit_mass(q, k, 0.35, causal, span, query_start)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_mass_reads_the_given_lse():
    """A log-sum-exp larger by log 2 halves every probability: proof the given one is used, not recomputed."""
    q, k, v = _qkv(0, 4, 4, 50, 16)
    _, lse = attention_with_lse(q, k, v, scale=0.25, causal=True)
    args = {"scale": 0.25, "causal": True, "span": (10, 40)}
    exact = attention_mass(q, k, **args)
    torch.testing.assert_close(attention_mass(q, k, lse=lse, **args), exact, rtol=1e-5, atol=1e-5)
    halved = attention_mass(q, k, lse=lse + math.log(2), **args)
    torch.testing.assert_close(halved, exact / 2, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="lse"):
        attention_mass_torch(q, k, lse=lse[:, :, 1:], **args)


def test_triton_mass_with_lse_skips_pass_one():
    """Triton path (CUDA, or the interpreter on CPU): same mass from the given lse as from its own pass 1."""
    pytest.importorskip("triton")
    from pipeline.kernels.attention_mass import attention_mass_triton

    device = "cuda" if CUDA else "cpu"
    q, k, v = _qkv(5, 4, 2, 150, 32, device)
    _, lse = attention_with_lse(q, k, v, scale=32**-0.5, causal=True)
    args = {"scale": 32**-0.5, "causal": True, "span": (20, 141), "per_head": True}
    own = attention_mass_triton(q, k, **args)
    given = attention_mass_triton(q, k, lse=lse, **args)
    torch.testing.assert_close(given, own, rtol=5e-4, atol=5e-4)
    tail = attention_mass_triton(q[:, :, 141:], k, query_start=141, lse=lse[:, :, 141:], **args)
    torch.testing.assert_close(
        tail, attention_mass_triton(q[:, :, 141:], k, query_start=141, **args), rtol=5e-4, atol=5e-4
    )
    torch.testing.assert_close(
        attention_mass_triton(q, k, lse=lse + math.log(2), **args), own / 2, rtol=5e-4, atol=5e-4
    )
