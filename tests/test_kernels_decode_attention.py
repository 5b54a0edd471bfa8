"""Split-K Triton decode attention against SDPA on the valid prefix of static caches.

Runs on CUDA when there is one, else in the Triton interpreter on CPU tensors (hence tiny shapes).
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional

pytest.importorskip("triton")

from pipeline.kernels.decode_attention import decode_attention_torch, decode_attention_triton, decode_splits

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(seed, batch, q_heads, kv_heads, capacity, dim, dtype):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, dim, generator=gen)
    k = torch.randn(batch, kv_heads, capacity, dim, generator=gen) * 2
    v = torch.randn(batch, kv_heads, capacity, dim, generator=gen)
    return q.to(DEVICE, dtype), k.to(DEVICE, dtype), v.to(DEVICE, dtype)


def _sdpa_prefix(q, k, v, lengths, scale):
    """Per row: SDPA in fp32 over the first lengths[b] keys -> [B, H, D] fp32."""
    rows = []
    for b, n in enumerate(lengths):
        out = functional.scaled_dot_product_attention(
            q[b, :, None].float(), k[b, :, :n].float(), v[b, :, :n].float(), scale=scale, enable_gqa=True
        )
        rows.append(out[:, 0])
    return torch.stack(rows)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_matches_sdpa_on_prefix_gqa(dtype, tol):
    q, k, v = _inputs(0, 3, 4, 2, 200, 64, dtype)
    lengths = [1, 77, 200]  # a single key, an odd length, the full capacity
    k[1, :, 77:] = float("nan")  # never read beyond the length
    v[1, :, 77:] = float("nan")
    got = decode_attention_triton(q, k, v, torch.tensor(lengths, device=DEVICE), 0.125)
    assert got.shape == (3, 4, 64) and got.dtype == dtype
    expected = _sdpa_prefix(q, k, v, lengths, 0.125)
    torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol)


def test_one_launch_follows_a_growing_scalar_length():
    q, k, v = _inputs(1, 2, 2, 2, 150, 32, torch.float32)
    length = torch.tensor(5, device=DEVICE)
    assert decode_splits(2, 2, 150) == 3  # fixed by the capacity: most splits are empty at length 5
    first = decode_attention_triton(q, k, v, length, 0.2)
    torch.testing.assert_close(first, _sdpa_prefix(q, k, v, [5, 5], 0.2), rtol=1e-5, atol=1e-5)
    length.fill_(131)  # as a captured graph sees it: same tensors, new value
    grown = decode_attention_triton(q, k, v, length, 0.2, splits=1)
    torch.testing.assert_close(grown, _sdpa_prefix(q, k, v, [131, 131], 0.2), rtol=1e-5, atol=1e-5)


def test_torch_fallback_masks_each_row():
    q, k, v = _inputs(2, 3, 6, 2, 40, 16, torch.float32)
    lengths = [40, 3, 17]
    got = decode_attention_torch(q, k, v, torch.tensor(lengths, device=DEVICE), 0.25)
    torch.testing.assert_close(got, _sdpa_prefix(q, k, v, lengths, 0.25), rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise():
    q, k, v = _inputs(3, 1, 3, 2, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="cannot share"):
        decode_attention_triton(q, k, v, torch.tensor([4], device=DEVICE), 0.25)
    with pytest.raises(ValueError, match="lengths"):
        decode_attention_triton(q[:, :2], k, v, torch.tensor([4.0], device=DEVICE), 0.25)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replays_with_new_lengths():
    q, k, v = _inputs(4, 2, 8, 2, 512, 128, torch.bfloat16)
    lengths = torch.tensor([3, 9], device=DEVICE)
    decode_attention_triton(q, k, v, lengths, 0.09)  # compile before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention_triton(q, k, v, lengths, 0.09)
    for new in ([3, 9], [64, 511], [512, 1]):
        lengths.copy_(torch.tensor(new, device=DEVICE))
        graph.replay()
        torch.testing.assert_close(out.float(), _sdpa_prefix(q, k, v, new, 0.09), rtol=2e-2, atol=2e-2)
