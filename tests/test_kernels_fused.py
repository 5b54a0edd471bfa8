"""Fused decode-step kernels against their PyTorch twins and transformers' own Qwen2 modules.

The twins must equal transformers bit for bit; the Triton kernels run on CUDA when there is one, else
in the interpreter on CPU tensors (tiny shapes): fp32 within 1e-6, bf16 within a few bf16 steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config
from transformers.activations import ACT2FN
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm, Qwen2RotaryEmbedding, apply_rotary_pos_emb

from pipeline.kernels import fused

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not fused.HAS_TRITON, reason="triton is not installed")
EXACT = {"rtol": 0, "atol": 0}
# bf16: a step or two (2^-8..2^-7 relative each) where rsqrt, exp or a sum order differ; the interpreter
# also truncates every fp32 -> bf16 cast where hardware rounds to nearest: up to three more steps there.
BF16_STEPS = 2**-6 if DEVICE == "cuda" else 2**-5
TOL = {torch.float32: {"rtol": 1e-6, "atol": 1e-6}, torch.bfloat16: {"rtol": BF16_STEPS, "atol": BF16_STEPS}}
ONE_ROUNDING = {torch.float32: EXACT, torch.bfloat16: EXACT if DEVICE == "cuda" else TOL[torch.bfloat16]}
REPO = Path(__file__).resolve().parents[1]


def _randn(gen, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(DEVICE, dtype)


def _qwen2_norm(hidden_size, weight, eps):
    norm = Qwen2RMSNorm(hidden_size, eps=eps).to(DEVICE, weight.dtype)
    norm.weight.data.copy_(weight)
    return norm


@pytest.mark.parametrize(
    ("dtype", "weight_dtype", "with_residual"),
    [
        (torch.float32, torch.float32, True),
        (torch.float32, torch.float32, False),
        (torch.bfloat16, torch.bfloat16, True),
        (torch.bfloat16, torch.float32, False),  # fp32 weight promotes the output, as in transformers
    ],
)
def test_add_rmsnorm_matches_qwen2_rmsnorm(dtype, weight_dtype, with_residual):
    gen = torch.Generator().manual_seed(0)
    dim = 200  # not a power of two: the row block is masked
    x = _randn(gen, 3, 1, dim, dtype=dtype, scale=3.0)  # [B, 1, D] as the engine's hidden
    residual = _randn(gen, 3, 1, dim, dtype=dtype, scale=5.0) if with_residual else None
    weight = _randn(gen, dim, dtype=weight_dtype)
    hidden = x if residual is None else x + residual
    expected = _qwen2_norm(dim, weight, 1e-6)(hidden)

    twin, twin_residual = fused.add_rmsnorm_torch(x, residual, weight, 1e-6)
    torch.testing.assert_close(twin, expected, **EXACT)
    assert torch.equal(twin_residual, hidden)
    if not fused.HAS_TRITON:
        return
    got, new_residual = fused.add_rmsnorm_triton(x, residual, weight, 1e-6)
    assert got.shape == x.shape and got.dtype == expected.dtype
    torch.testing.assert_close(new_residual, hidden, **ONE_ROUNDING[dtype])  # as PyTorch's add
    torch.testing.assert_close(got, expected, **TOL[dtype])


def _rope_case(gen, dtype, batch, q_heads, kv_heads, head_dim, capacity):
    """qkv [B, (H + 2 Hkv) hd], cos/sin [B, hd] from Qwen2's rotary embedding, NaN-filled caches."""
    cfg = Qwen2Config(
        hidden_size=q_heads * head_dim,
        num_attention_heads=q_heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
    )
    qkv = _randn(gen, batch, (q_heads + 2 * kv_heads) * head_dim, dtype=dtype, scale=2.0)
    positions = torch.tensor([[7], [1000], [3]][:batch], device=DEVICE)
    cos, sin = Qwen2RotaryEmbedding(cfg).to(DEVICE)(qkv, positions)  # [B, 1, hd] in qkv's dtype
    caches = torch.full((2, batch, kv_heads, capacity, head_dim), float("nan"), device=DEVICE, dtype=dtype)
    return qkv, cos[:, 0], sin[:, 0], caches


def _rope_reference(qkv, cos, sin, caches, index, q_heads, kv_heads, head_dim):
    """transformers' apply_rotary_pos_emb on the split heads; caches written by plain indexing."""
    batch = qkv.shape[0]
    heads = qkv.view(batch, 1, -1, head_dim).transpose(1, 2)  # [B, heads, 1, hd]
    q, k, v = heads.split([q_heads, kv_heads, kv_heads], dim=1)
    q, k = apply_rotary_pos_emb(q, k, cos[:, None], sin[:, None])
    expected = caches.clone()
    for b, n in enumerate(index.expand(batch).tolist()):
        expected[0, b, :, n] = k[b, :, 0]
        expected[1, b, :, n] = v[b, :, 0]
    return q[:, :, 0], expected


@pytest.mark.parametrize(
    ("dtype", "head_dim", "index"),
    [
        (torch.float32, 32, [5, 0, 8]),
        (torch.float32, 24, 3),  # half of 24 is no power of two: masked halves; one index for all rows
        (torch.bfloat16, 32, [8, 2, 2]),
    ],
)
def test_rope_and_cache_matches_apply_rotary_pos_emb(dtype, head_dim, index):
    gen = torch.Generator().manual_seed(1)
    q_heads, kv_heads = 4, 2
    qkv, cos, sin, caches = _rope_case(gen, dtype, 3, q_heads, kv_heads, head_dim, capacity=9)
    index = torch.tensor(index, device=DEVICE)
    q_ref, expected = _rope_reference(qkv, cos, sin, caches, index, q_heads, kv_heads, head_dim)

    twin_caches = caches.clone()
    twin = fused.rope_and_cache_torch(qkv, cos, sin, twin_caches[0], twin_caches[1], index)
    torch.testing.assert_close(twin, q_ref, **EXACT)
    torch.testing.assert_close(twin_caches, expected, equal_nan=True, **EXACT)
    if not fused.HAS_TRITON:
        return
    got = fused.rope_and_cache_triton(
        qkv, cos[:, None, None], sin[:, None, None], caches[0], caches[1], index
    )
    assert got.shape == (3, q_heads, head_dim)
    torch.testing.assert_close(got, q_ref, **TOL[dtype])
    torch.testing.assert_close(caches, expected, equal_nan=True, **TOL[dtype])  # NaN: never written


@needs_triton
def test_rope_and_cache_reads_the_index_from_the_device_each_call():
    gen = torch.Generator().manual_seed(2)
    qkv, cos, sin, caches = _rope_case(gen, torch.float32, 2, 2, 2, 16, capacity=6)
    index = torch.tensor(1, device=DEVICE)
    fused.rope_and_cache_triton(qkv, cos, sin, caches[0], caches[1], index)
    first = caches[:, :, :, 1].clone()
    index.fill_(4)  # as a replayed CUDA graph sees it: same tensors, new value
    fused.rope_and_cache_triton(qkv * 2, cos, sin, caches[0], caches[1], index)
    torch.testing.assert_close(caches[:, :, :, 4], first * 2, **TOL[torch.float32])
    torch.testing.assert_close(caches[:, :, :, 1], first, **EXACT)
    index.fill_(6)  # past the capacity: the kernel writes nothing
    fused.rope_and_cache_triton(qkv, cos, sin, caches[0], caches[1], index)
    assert int(caches.isnan().sum()) == 2 * 2 * 2 * 4 * 16  # positions 0, 2, 3, 5 untouched
    if DEVICE == "cpu":  # the twin refuses (on CUDA the same indexing is a device-side assert)
        with pytest.raises(IndexError):
            fused.rope_and_cache_torch(qkv, cos, sin, caches[0], caches[1], index)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_matches_transformers_activation(dtype):
    gen = torch.Generator().manual_seed(3)
    gate_up = _randn(gen, 3, 1, 2 * 1500, dtype=dtype, scale=4.0)  # I > one block: a masked tail block
    gate, up = gate_up.chunk(2, dim=-1)
    expected = ACT2FN["silu"](gate) * up
    torch.testing.assert_close(fused.silu_mul_torch(gate_up), expected, **EXACT)
    if fused.HAS_TRITON:
        got = fused.silu_mul_triton(gate_up)
        assert got.shape == (3, 1, 1500)
        torch.testing.assert_close(got, expected, **TOL[dtype])


def test_dispatch_picks_triton_on_cuda_and_the_twin_elsewhere():
    gen = torch.Generator().manual_seed(4)
    x, res, w = (_randn(gen, 2, 64) for _ in range(3))
    gate_up = _randn(gen, 2, 64)
    qkv, cos, sin, caches = _rope_case(gen, torch.float32, 2, 2, 1, 16, capacity=4)
    index = torch.tensor(2, device=DEVICE)
    impl = "triton" if DEVICE == "cuda" else "torch"
    expected_caches = caches.clone()
    pairs = [
        (fused.add_rmsnorm(x, res, w, 1e-5), getattr(fused, f"add_rmsnorm_{impl}")(x, res, w, 1e-5)),
        (fused.silu_mul(gate_up), getattr(fused, f"silu_mul_{impl}")(gate_up)),
        (
            fused.rope_and_cache(qkv, cos, sin, caches[0], caches[1], index),
            getattr(fused, f"rope_and_cache_{impl}")(qkv, cos, sin, *expected_caches, index),
        ),
    ]
    for got, expected in pairs:
        torch.testing.assert_close(got, expected, **EXACT)
    torch.testing.assert_close(caches, expected_caches, equal_nan=True, **EXACT)


@needs_triton
def test_bad_inputs_raise():
    gen = torch.Generator().manual_seed(5)
    x = _randn(gen, 2, 8)
    with pytest.raises(ValueError, match="weight"):
        fused.add_rmsnorm_triton(x, None, _randn(gen, 7), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        fused.add_rmsnorm_triton(x, x.bfloat16(), _randn(gen, 8), 1e-6)
    with pytest.raises(ValueError, match="odd"):
        fused.silu_mul_triton(_randn(gen, 2, 7))
    qkv, cos, sin, caches = _rope_case(gen, torch.float32, 2, 2, 1, 16, capacity=4)
    with pytest.raises(ValueError, match="qkv"):
        fused.rope_and_cache_triton(
            qkv[:, :-8], cos, sin, caches[0], caches[1], torch.tensor(0, device=DEVICE)
        )
    with pytest.raises(ValueError, match="index"):
        fused.rope_and_cache_triton(qkv, cos, sin, caches[0], caches[1], torch.tensor(0.0, device=DEVICE))
    with pytest.raises(ValueError, match="cos"):
        fused.rope_and_cache_triton(qkv, cos, sin[:1], caches[0], caches[1], torch.tensor(0, device=DEVICE))
    with pytest.raises(ValueError, match="cos"):
        fused.rope_and_cache_triton(
            qkv, cos.double(), sin, caches[0], caches[1], torch.tensor(0, device=DEVICE)
        )


@pytest.mark.slow
@needs_triton
def test_decode_step_benchmark_smoke_engine_agrees_with_the_unfused_step(tmp_path):
    """The engine's step (fused kernels, interpreted on CPU) against the unfused step it replaced."""
    out = tmp_path / "smoke.json"
    subprocess.run(
        [sys.executable, "benchmarks/decode_step.py", "--cpu-smoke", "--out", str(out)],
        cwd=REPO,
        check=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    rows = json.loads(out.read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 2]
    for row in rows:
        assert row["same_tokens"], row
        assert row["logits_max_abs_err"] < 1e-4, row
        assert row["engine_ms"] > 0 and row["unfused_ms"] > 0
