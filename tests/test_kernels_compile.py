"""Every Triton kernel compiles for Hopper (sm_90) down to a cubin (ptxas), without a GPU: a GPU
session must not be the first to discover what the interpreter forgives (shapes of tl.dot, layouts,
register pressure)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

_COMPILE = """
import torch
torch.cuda.is_available = lambda: True  # fused.py defines its kernels only where they can run
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from pipeline.kernels import attention_mass, decode_attention, fused, merge

SCALARS = {"eps": "fp32", "floor": "fp32", "qk_scale": "fp32"}
BF16 = {"OPERAND": tl.bfloat16, "PRECISION": "tf32"}
KERNELS = [
    (merge._similarity_kernel, {"K": "*bf16", "OUT": "*fp32"}, {"BLOCK_T": 8, "BLOCK_D": 128}, 4),
    (merge._similarity_kernel, {"K": "*fp32", "OUT": "*fp32"}, {"BLOCK_T": 8, "BLOCK_D": 128}, 4),
    (merge._mark_top_kernel, {"S": "*fp32", "OUT": "*i8"}, {"LARGEST": False, "BLOCK": 8192}, 8),
    (merge._group_kernel, {"MARKED": "*i8", "MASS": "*fp32", "GROUPS": "*i64", "WEIGHTS": "*fp32"},
     {"WEIGHTED": True, "EVICT": True, "BLOCK": 1024}, 4),
    (merge._index_kernel, {"GROUPS": "*i64", "WEIGHTS": "*fp32", "LEAD": "*i64", "BOUNDS": "*i64"},
     {"BLOCK": 1024}, 4),
    (merge._merge_kernel, {"X": "*bf16", "WEIGHTS": "*fp32", "LEAD": "*i64", "BOUNDS": "*i64", "OUT": "*bf16"},
     {"BLOCK_D": 4096}, 8),
    (fused._add_rmsnorm_kernel, {n: "*bf16" for n in ("X", "RES", "W", "OUT", "RES_OUT")},
     {"HAS_RESIDUAL": True, "BLOCK_D": 4096}, 8),
    (fused._add_rmsnorm_kernel, {n: "*fp32" for n in ("X", "RES", "W", "OUT", "RES_OUT")},
     {"HAS_RESIDUAL": False, "BLOCK_D": 64}, 1),
    (fused._rope_cache_kernel, {**{n: "*bf16" for n in ("QKV", "COS", "SIN", "Q_OUT", "K_CACHE", "V_CACHE")},
     "INDEX": "*i64"}, {"BLOCK_HALF": 64}, 1),
    (fused._rope_cache_kernel, {**{n: "*fp32" for n in ("QKV", "COS", "SIN", "Q_OUT", "K_CACHE", "V_CACHE")},
     "INDEX": "*i64"}, {"BLOCK_HALF": 8}, 1),
    (fused._silu_mul_kernel, {"GATE_UP": "*bf16", "OUT": "*bf16"}, {"BLOCK": 1024}, 4),
    (fused._silu_mul_kernel, {"GATE_UP": "*fp32", "OUT": "*fp32"}, {"BLOCK": 64}, 4),
    (attention_mass._row_lse_kernel, {"Q": "*bf16", "K": "*bf16", "LSE": "*fp32"},
     {"CAUSAL": True, **BF16, "BLOCK_M": 128, "BLOCK_N": 64, "HEAD_DIM": 128}, 8),
    (attention_mass._column_mass_kernel, {"Q": "*bf16", "K": "*bf16", "LSE": "*fp32", "OUT": "*fp32"},
     {"CAUSAL": True, **BF16, "BLOCK_M": 64, "BLOCK_N": 128, "HEAD_DIM": 128}, 8),
    (decode_attention._split_kernel, {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "LENGTHS": "*i64",
     "PART_M": "*fp32", "PART_L": "*fp32", "PART_ACC": "*fp32"},
     {**BF16, "BLOCK_G": 16, "BLOCK_N": 64, "HEAD_DIM": 128}, 4),
    (decode_attention._split_kernel, {"Q": "*fp32", "K": "*fp32", "V": "*fp32", "LENGTHS": "*i64",
     "PART_M": "*fp32", "PART_L": "*fp32", "PART_ACC": "*fp32"},
     {"OPERAND": tl.float32, "PRECISION": "ieee", "BLOCK_G": 16, "BLOCK_N": 64, "HEAD_DIM": 16}, 4),
    (decode_attention._combine_kernel, {"PART_M": "*fp32", "PART_L": "*fp32", "PART_ACC": "*fp32",
     "OUT": "*bf16"}, {"BLOCK_S": 16, "HEAD_DIM": 128}, 1),
]
for kernel, pointers, constants, warps in KERNELS:
    signature = {
        name: "constexpr" if name in constants else pointers.get(name) or SCALARS.get(name, "i32")
        for name in kernel.arg_names
    }
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants)
    triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    print("compiled", kernel.fn.__name__, flush=True)
"""


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the other tests compile the kernels on this GPU")
def test_every_kernel_compiles_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    subprocess.run([sys.executable, "-c", textwrap.dedent(_COMPILE)], check=True, env=env, timeout=600)
