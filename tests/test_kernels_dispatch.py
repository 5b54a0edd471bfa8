"""pipeline.kernels picks PyTorch where Triton cannot run, and imports without triton installed."""

from __future__ import annotations

import subprocess
import sys

import torch

from pipeline.kernels.attention_mass import attention_mass, attention_mass_torch
from pipeline.kernels.decode_attention import decode_attention
from pipeline.kernels.paths import attention_kernels_usable, forced_path, triton_usable


def test_cpu_tensors_take_the_pytorch_paths():
    assert not triton_usable(torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 30, 8, generator=gen), torch.randn(1, 2, 50, 8, generator=gen)
    got = attention_mass(q, k, scale=0.3, causal=True, span=(10, 40), query_start=20, per_head=True)
    expected = attention_mass_torch(
        q, k, scale=0.3, causal=True, span=(10, 40), query_start=20, per_head=True
    )
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    v = torch.randn(1, 2, 50, 8, generator=gen)
    out = decode_attention(q[:, :, 0], k, v, torch.tensor(9), 0.3)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, :1], k[:, :, :9], v[:, :, :9], scale=0.3, enable_gqa=True
    )[:, :, 0]
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_imports_and_runs_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` fail as if absent
        "import torch\n"
        "import pipeline, pipeline.kernels.attention_mass as kn\n"
        "q, k = torch.ones(1, 2, 4, 8), torch.ones(1, 2, 6, 8)\n"
        "mass = kn.attention_mass(q, k, scale=1.0, causal=False, span=(0, 6))\n"
        "assert torch.allclose(mass, torch.full((1, 6), 2 * 4 / 6)), mass\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_head_sizes_the_kernels_do_not_take_keep_the_pytorch_attention():
    # Decoding is captured in a CUDA graph only where this holds (the PyTorch path syncs the host).
    cpu = torch.device("cpu")
    with forced_path("triton"):
        assert attention_kernels_usable(cpu, 128)
        assert attention_kernels_usable(cpu, 16)
        assert not attention_kernels_usable(cpu, 80)  # Phi-style heads: no power of two
        assert not attention_kernels_usable(cpu, 8)
    assert not attention_kernels_usable(cpu, 128)
