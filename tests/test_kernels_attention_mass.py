"""Two-pass Triton attention mass against the blockwise PyTorch mass and an explicit softmax.

Runs on CUDA when there is one, else in the Triton interpreter on CPU tensors (hence tiny shapes).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from pipeline.kernels.attention_mass import attention_mass_torch, attention_mass_triton
from tests.test_kernels_attention_mass_torch import explicit_mass

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 5e-4  # fp32 sums in another order; on GPU also the hardware's exp2/log2


def _inputs(seed, q_heads, kv_heads, q_len, k_len, dim, dtype):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, q_heads, q_len, dim, generator=gen) * 1.5
    k = torch.randn(2, kv_heads, k_len, dim, generator=gen)
    return q.to(DEVICE, dtype), k.to(DEVICE, dtype)


@pytest.mark.parametrize(
    ("causal", "query_start", "span", "dim", "dtype"),
    [
        (True, 0, (3, 187), 32, torch.float32),  # whole prompt as queries
        (True, 150, (20, 141), 64, torch.bfloat16),  # tail queries after the span (mass="tail")
        (True, 37, (40, 200), 16, torch.float16),  # span up to the last key
        (False, 0, (0, 200), 64, torch.bfloat16),
        (False, 60, (71, 130), 32, torch.float32),
    ],
)
def test_matches_blockwise_and_explicit_softmax(causal, query_start, span, dim, dtype):
    q, k = _inputs(dim + query_start, 4, 2, 200 - query_start, 200, dim, dtype)
    kwargs = {"scale": dim**-0.5, "causal": causal, "span": span, "query_start": query_start}
    got = attention_mass_triton(q, k, per_head=True, **kwargs)
    assert got.shape == (2, 2, span[1] - span[0]) and got.dtype == torch.float32
    blockwise = attention_mass_torch(q, k, per_head=True, block=64, **kwargs)
    torch.testing.assert_close(got, blockwise, rtol=TOL, atol=TOL)
    explicit = explicit_mass(q.cpu(), k.cpu(), dim**-0.5, causal, span, query_start)
    torch.testing.assert_close(got.double().cpu(), explicit, rtol=TOL, atol=TOL)


def test_summed_heads_and_conservation_over_all_keys():
    q, k = _inputs(1, 4, 1, 130, 130, 32, torch.float32)  # one KV head shared by all four query heads
    got = attention_mass_triton(q, k, scale=0.3, causal=True, span=(0, 130))
    assert got.shape == (2, 130)
    # Every query spreads probability 1 over the keys it sees: 4 heads x 130 queries per row.
    torch.testing.assert_close(got.sum(-1), torch.full((2,), 4.0 * 130, device=DEVICE), rtol=1e-5, atol=0)
    torch.testing.assert_close(
        got, attention_mass_torch(q, k, scale=0.3, causal=True, span=(0, 130)), rtol=1e-4, atol=1e-5
    )


def test_span_no_query_sees_is_zero_and_bad_shapes_raise():
    q, k = _inputs(2, 2, 2, 20, 40, 16, torch.float32)
    unseen = attention_mass_triton(q, k, scale=0.25, causal=True, span=(25, 40))  # queries at 0..19
    assert unseen.shape == (2, 15) and not unseen.any()
    with pytest.raises(ValueError, match="outside"):
        attention_mass_triton(q, k, scale=0.25, causal=True, span=(30, 41))
    with pytest.raises(ValueError, match="do not match"):
        attention_mass_triton(q[:, :1].expand(2, 3, 20, 16), k, scale=0.25, causal=True, span=(0, 5))
    with pytest.raises(ValueError, match="power of two"):
        attention_mass_triton(q[..., :12], k[..., :12], scale=0.25, causal=True, span=(0, 5))
    with pytest.raises(ValueError, match="need keys"):
        attention_mass_triton(q, k, scale=0.25, causal=True, span=(0, 5), query_start=30)
