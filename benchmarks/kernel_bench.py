"""Micro-benchmark of the Triton kernels against the PyTorch paths they replace.

    python benchmarks/kernel_bench.py --out kernels.json                                # CUDA, 7B shapes
    TRITON_INTERPRET=1 python benchmarks/kernel_bench.py --cpu-smoke --out smoke.json   # tiny, interpreted

Attention mass (one merge layer's prefill, B=1): the Triton kernel (two passes, or one given the lse of
attention_with_lse, also timed), the blockwise PyTorch mass,
and one fused SDPA forward of the same shape (the "one attention pass" yardstick).
Decode attention (one token per row): the split-K Triton kernel and SDPA over the filled prefix (what
the eager engine does), both replayed from CUDA graphs so launch overhead does not hide kernel time,
plus SDPA over the whole capacity with a mask (the static-shape PyTorch alternative for graphs).
Every cache has the capacity of the longest one, so a shorter cache shows whether cost follows length.
GPU times come from torch.cuda.Event after warm-up; CPU smoke times from perf_counter.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import torch

from benchmarks.common import environment, graphed, median_ms, require_device, script_parser, text_table
from pipeline.kernels.attention_mass import attention_mass_torch, attention_mass_triton, attention_with_lse
from pipeline.kernels.decode_attention import decode_attention_torch, decode_attention_triton, decode_splits


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    parser.add_argument("--heads", type=int, default=32, help="query heads (7B: 32)")
    parser.add_argument("--kv-heads", type=int, default=32, help="KV heads (Qwen2-Audio-7B: 32)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--length", type=int, default=6040, help="prompt length for the mass")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="decode batch sizes")
    parser.add_argument("--cached", type=int, nargs="+", default=[6040, 3020], help="decode cache lengths")
    parser.add_argument(
        "--new-tokens", type=int, default=256, help="decode capacity beyond the longest cache"
    )
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        args.heads, args.kv_heads, args.head_dim, args.length = 4, 2, 32, 96
        args.batches, args.cached, args.new_tokens = [1, 2], [70, 33], 8
    return args


def bench_mass(args: argparse.Namespace, device: str, time_ms: Callable) -> dict[str, Any]:
    dtype = torch.bfloat16
    n, dim = args.length, args.head_dim
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, args.heads, n, dim, generator=gen, device=device, dtype=dtype)
    k = torch.randn(1, args.kv_heads, n, dim, generator=gen, device=device, dtype=dtype)
    v = torch.randn_like(k)
    span = (24, n - 16)  # text before and after the audio
    scale = dim**-0.5
    kw = {"scale": scale, "causal": True, "span": span}
    _, lse = attention_with_lse(q, k, v, scale=scale, causal=True)
    triton_mass = attention_mass_triton(q, k, **kw)
    reference = attention_mass_torch(q, k, **kw)
    row: dict[str, Any] = {
        "length": n,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "head_dim": dim,
        "span": list(span),
        "dtype": str(dtype),
        "max_rel_err_vs_pytorch": float((triton_mass - reference).abs().max() / reference.abs().max()),
        "triton_ms": time_ms(lambda: attention_mass_triton(q, k, **kw)),
        "pytorch_blockwise_ms": time_ms(lambda: attention_mass_torch(q, k, **kw)),
        "sdpa_forward_ms": time_ms(
            lambda: torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=scale, enable_gqa=args.heads != args.kv_heads
            )
        ),
        "triton_tail_ms": time_ms(
            lambda: attention_mass_triton(q[:, :, span[1] :], k, query_start=span[1], **kw)
        ),
        # Merge layers run attention_with_lse in place of SDPA and hand its lse to the mass: one pass.
        "attention_with_lse_ms": time_ms(lambda: attention_with_lse(q, k, v, scale=scale, causal=True)),
        "triton_given_lse_ms": time_ms(lambda: attention_mass_triton(q, k, lse=lse, **kw)),
        "pytorch_given_lse_ms": time_ms(lambda: attention_mass_torch(q, k, lse=lse, **kw)),
    }
    row["triton_vs_sdpa"] = row["triton_ms"] / row["sdpa_forward_ms"]
    row["triton_given_lse_vs_sdpa"] = row["triton_given_lse_ms"] / row["sdpa_forward_ms"]
    row["speedup_vs_pytorch"] = row["pytorch_blockwise_ms"] / row["triton_ms"]
    return row


def bench_decode(args: argparse.Namespace, device: str, time_ms: Callable) -> list[dict[str, Any]]:
    cuda = device == "cuda"
    dtype = torch.bfloat16
    capacity = max(args.cached) + args.new_tokens
    scale = args.head_dim**-0.5
    gqa = args.heads != args.kv_heads
    rows = []
    for batch in args.batches:
        gen = torch.Generator(device=device).manual_seed(batch)
        shape = (batch, args.kv_heads, capacity, args.head_dim)
        k = torch.randn(shape, generator=gen, device=device, dtype=dtype)
        v = torch.randn(shape, generator=gen, device=device, dtype=dtype)
        q = torch.randn(batch, args.heads, args.head_dim, generator=gen, device=device, dtype=dtype)
        for cached in args.cached:
            lengths = torch.full((batch,), cached, device=device, dtype=torch.int32)
            valid = (torch.arange(capacity, device=device) < cached)[None, None, None]

            def run_triton(lengths=lengths, k=k, v=v, q=q):
                return decode_attention_triton(q, k, v, lengths, scale)

            def run_prefix(cached=cached, k=k, v=v, q=q):
                return torch.nn.functional.scaled_dot_product_attention(
                    q[:, :, None], k[:, :, :cached], v[:, :, :cached], scale=scale, enable_gqa=gqa
                )

            def run_capacity(valid=valid, k=k, v=v, q=q):
                return torch.nn.functional.scaled_dot_product_attention(
                    q[:, :, None], k, v, attn_mask=valid, scale=scale, enable_gqa=gqa
                )

            expected = run_prefix()[:, :, 0].float()
            got = run_triton().float()
            row: dict[str, Any] = {
                "batch": batch,
                "cached": cached,
                "capacity": capacity,
                "splits": decode_splits(batch, args.kv_heads, capacity),
                "kv_mb_read": 2 * batch * args.kv_heads * cached * args.head_dim * 2 / 1e6,
                "max_abs_err_vs_sdpa": float((got - expected).abs().max()),
            }
            if cuda:  # graphs of 20 calls: per-call kernel time without Python launch overhead
                reps = 20
                for name, fn in (
                    ("triton", run_triton),
                    ("sdpa_prefix", run_prefix),
                    ("sdpa_capacity", run_capacity),
                ):
                    row[f"{name}_ms"] = time_ms(graphed(fn, reps)) / reps
                row["triton_eager_ms"] = time_ms(run_triton)
                row["triton_gb_per_s"] = row["kv_mb_read"] / row["triton_ms"]
            else:
                row["triton_ms"] = time_ms(run_triton)
                row["pytorch_masked_ms"] = time_ms(
                    lambda lengths=lengths, k=k, v=v, q=q: decode_attention_torch(q, k, v, lengths, scale)
                )
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    cuda = require_device(args.cpu_smoke)
    device = "cuda" if cuda else "cpu"
    time_ms = functools.partial(median_ms, cuda=cuda, iters=20 if cuda else 1, warmup=5 if cuda else 0)
    with torch.inference_mode():
        mass = bench_mass(args, device, time_ms)
        decode = bench_decode(args, device, time_ms)
    result = {
        **environment(cuda),
        "mass": mass,
        "decode": decode,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"{result['device']}  torch {result['torch']}  triton {result['triton']}")
    print("attention mass:\n" + text_table([mass]))
    print("decode attention:\n" + text_table(decode))
    return result


if __name__ == "__main__":
    main()
