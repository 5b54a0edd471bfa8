"""Triton merge-step kernels against the PyTorch paths of pipeline.merging.ops.

Runs on CUDA when there is one, else in the Triton interpreter on CPU tensors (hence tiny shapes).
The interpreter rounds fp32 -> bf16 by truncation where CUDA rounds to nearest, so bf16 merged rows
may differ by one bf16 ulp there; copied rows are compared bit for bit everywhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from pipeline.kernels import merge
from pipeline.kernels.paths import PATHS, forced_path
from pipeline.merging import ops
from pipeline.merging.config import EVICT_METHODS, MERGE_METHODS
from tests.test_merging_ops import first_index

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REPO = Path(__file__).resolve().parents[1]
# Merged rows: fp32 sums in another order (and FMA on GPU); bf16 additionally one ulp of rounding.
TOL = {torch.float32: (1e-5, 1e-6), torch.float16: (1e-3, 1e-5), torch.bfloat16: (8e-3, 1e-5)}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _both_paths(fn):
    """fn() under the PyTorch path, then under the Triton path."""
    with forced_path("pytorch"):
        expected = fn()
    with forced_path("triton"):
        got = fn()
    return expected, got


def _weighted_members(red: ops.Reduction) -> torch.Tensor:
    """[B, n_out] how many members of each group carry weight."""
    counts = torch.zeros(red.groups.shape[0], red.n_out, dtype=torch.int64, device=red.groups.device)
    return counts.scatter_add_(1, red.groups, (red.weights > 0).long())


def _assert_same_merge(
    red: ops.Reduction, x: torch.Tensor, expected: torch.Tensor, got: torch.Tensor
) -> None:
    """Groups of one weighted member: bit-identical copies of x's lead row; merged groups: within
    fp32-sum tolerance of the PyTorch path's output ``expected``."""
    assert got.shape == expected.shape and got.dtype == expected.dtype
    single = _weighted_members(red) == 1
    lead = first_index(red).reshape(*first_index(red).shape, *[1] * (x.dim() - 2))
    assert torch.equal(got[single], x.gather(1, lead.expand(-1, -1, *x.shape[2:]))[single])
    rtol, atol = TOL[got.dtype]
    torch.testing.assert_close(got[~single], expected[~single], rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [40, 300])
def test_similarity_matches_pytorch(dtype, width):
    # Non-contiguous keys (feature-major storage) and a length that is no multiple of the tile.
    keys = torch.randn(2, width, 37, generator=_gen(width)).to(DEVICE, dtype).transpose(1, 2)
    expected, got = _both_paths(lambda: ops.adjacent_similarity(keys))
    assert got.shape == (2, 36) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert merge.adjacent_similarity_triton(keys[:, None, :1]).shape == (2, 0)


@pytest.mark.parametrize("path", PATHS)
def test_similarity_reads_the_attention_layout_in_place(path):
    """Keys as attention holds them, [B, H, L, hd] transposed out of [B, L, H, hd]: the same similarity
    as the heads concatenated, from the strided tensor itself (no copy)."""
    per_head = torch.randn(2, 37, 3, 16, generator=_gen(3)).to(DEVICE).transpose(1, 2)
    concatenated = per_head.transpose(1, 2).reshape(2, 37, 48)
    with forced_path(path):
        got, expected = ops.adjacent_similarity(per_head), ops.adjacent_similarity(concatenated)
        span = ops.adjacent_similarity(per_head[:, :, 5:30])
    assert got.shape == (2, 36)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(span, expected[:, 5:29], rtol=1e-5, atol=1e-6)
    mass = torch.rand(2, 37, generator=_gen(4)).to(DEVICE)
    plans = [
        ops.plan_reduction("fastadasp", 37, [(5, 30)], [9], keys=keys, mass=mass)
        for keys in (per_head, concatenated)
    ]
    assert torch.equal(plans[0].groups, plans[1].groups)


@pytest.mark.parametrize(
    ("size", "k", "largest", "step"),
    [
        (50, 7, True, 1),
        (50, 7, False, 1),
        (61, 1, True, 2),
        (61, 30, False, 2),
        (40, 0, True, 1),
        (40, 40, True, 1),
    ],
)
def test_mark_top_k_matches_topk(size, k, largest, step):
    scores = torch.randn(3, size * step, generator=_gen(size + k)).to(DEVICE)[:, ::step]
    out = torch.zeros(3, size * step + 1, dtype=torch.bool, device=DEVICE)[:, 1::step]
    merge.mark_top_k_triton(scores, k, out, largest=largest)
    expected = torch.zeros(3, size, dtype=torch.bool, device=DEVICE)
    expected.scatter_(1, scores.topk(k, dim=1, largest=largest).indices, True)
    assert torch.equal(out, expected)
    assert not out._base[:, 0].any()  # nothing written outside the view


def test_mark_top_k_long_rows_and_ties():
    # 9,000 scores: one register tile of 16,384; 16,400: PyTorch's top-k.
    for size in (9000, merge._MAX_SELECT_BLOCK + 16):
        scores = torch.randn(1, size, generator=_gen(size)).to(DEVICE)
        out = torch.zeros_like(scores, dtype=torch.bool)
        merge.mark_top_k_triton(scores, 4321, out)
        assert torch.equal(out[0].nonzero()[:, 0], scores[0].topk(4321).indices.sort().values)
    # Ties at the k-th value go to the lowest indices, signed zeros included.
    ties = torch.tensor([[3.0, 1.0, 3.0, 0.0, 3.0, 3.0, -0.0, -2.0]], device=DEVICE)
    out = torch.zeros_like(ties, dtype=torch.bool)
    merge.mark_top_k_triton(ties, 3, out)
    assert out[0].nonzero()[:, 0].tolist() == [0, 2, 4]
    merge.mark_top_k_triton(ties, 2, out, largest=False)
    assert out[0].nonzero()[:, 0].tolist() == [3, 7]
    merge.mark_top_k_triton(ties[:, [6, 3]], 1, out[:, :2])
    assert out[0, :2].tolist() == [True, False]
    with pytest.raises(ValueError, match="k=9"):
        merge.mark_top_k_triton(ties, 9, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", [*MERGE_METHODS, *EVICT_METHODS])
def test_plans_and_outputs_match_pytorch(method, dtype):
    gen = _gen(len(method))
    batch, length, spans, ks = 2, 46, [(0, 17), (19, 40), (41, 45)], [7, 6, 2]
    keys = torch.randn(batch, length, 24, generator=gen).to(DEVICE, dtype)
    mass = (torch.rand(batch, length, generator=gen) * 5 + 0.01).to(DEVICE)
    x = torch.randn(batch, length, 20, generator=gen).to(DEVICE, dtype)

    def run():
        red = ops.plan_reduction(method, length, spans, ks, keys=keys, mass=mass, generator=_gen(7))
        return red, red.apply(x)

    (red_pt, out_pt), (red_tr, out_tr) = _both_paths(run)
    assert torch.equal(red_tr.groups, red_pt.groups)
    assert torch.equal(red_tr.weights, red_pt.weights)
    assert torch.equal(first_index(red_tr), first_index(red_pt))
    assert (red_tr.n_out, red_tr.spans) == (red_pt.n_out, red_pt.spans)
    _assert_same_merge(red_pt, x, out_pt, out_tr)
    if method in EVICT_METHODS:
        lead = first_index(red_tr)[..., None].expand(-1, -1, x.shape[-1])
        assert torch.equal(out_tr, x.gather(1, lead))


def _arbitrary_reduction(seed: int, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Contiguous groups of 1-4 tokens with weight-0 members anywhere (each group keeps one > 0)."""
    gen = _gen(seed)
    groups = torch.repeat_interleave(torch.arange(length), torch.randint(1, 5, (length,), generator=gen))
    groups = groups[:length]
    n_out = int(groups[-1]) + 1
    sizes = torch.bincount(groups)
    kept = torch.randint(0, 4, (batch, n_out), generator=gen) % sizes  # the member sure to weigh
    offset = torch.arange(length) - torch.searchsorted(groups, groups)
    weights = torch.rand(batch, length, generator=gen) * (torch.rand(batch, length, generator=gen) < 0.6)
    weights = torch.where(offset == kept[:, groups], weights + 0.5, weights)
    return groups.expand(batch, -1).contiguous(), weights, n_out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_index_and_merge_of_arbitrary_groups(seed):
    groups, weights, n_out = _arbitrary_reduction(seed, 3, 53)
    x = torch.randn(3, 53, 2, 9, generator=_gen(seed)).to(DEVICE)

    def run():
        red = ops.Reduction(groups.to(DEVICE), weights.to(DEVICE), n_out, [])
        return red, red.apply(x)

    (red_pt, out_pt), (red_tr, out_tr) = _both_paths(run)
    assert (offsets := first_index(red_tr) - red_tr._bounds[:, :-1]).max() > 0  # some leads are not first
    assert torch.equal(first_index(red_tr), first_index(red_pt))
    starts = torch.searchsorted(red_tr.groups, torch.arange(n_out, device=DEVICE).expand(3, -1).contiguous())
    assert torch.equal(red_tr._bounds, torch.cat([starts, torch.full((3, 1), 53, device=DEVICE)], 1))
    assert offsets.min() == 0
    _assert_same_merge(red_pt, x, out_pt, out_tr)


def test_bf16_sums_in_fp32_and_other_dtypes_fall_back():
    with forced_path("triton"):
        # In bf16, 256 + 1 + 1 rounds to 256; the fp32 mean is exactly 86.
        x = torch.tensor([[[256.0], [1.0], [1.0]]], dtype=torch.bfloat16, device=DEVICE)
        red = ops.plan_reduction("average", 3, [(0, 3)], [2], keys=torch.ones(1, 3, 2, device=DEVICE))
        assert red.apply(x).item() == 86.0
        # float64 takes the PyTorch gather on a Triton-planned reduction.
        groups, weights, n_out = _arbitrary_reduction(5, 2, 30)
        red = ops.Reduction(groups.to(DEVICE), weights.to(DEVICE), n_out, [])
        values = torch.randn(2, 30, 3, generator=_gen(0), dtype=torch.float64).to(DEVICE)
        got = red.apply(values)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got.float(), red.apply(values.float()))


@pytest.mark.slow
def test_benchmark_cpu_smoke(tmp_path):
    out = tmp_path / "smoke.json"
    subprocess.run(
        [sys.executable, "benchmarks/merge_step.py", "--cpu-smoke", "--out", str(out)],
        cwd=REPO,
        check=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    result = json.loads(out.read_text())
    assert result["interpreted"] and result["layer_ms"] > 0
    assert {(r["method"], r["path"]) for r in result["steps"]} == {
        (method, path) for method in ("fastadasp", "a-tome", "fastv") for path in ("triton", "pytorch")
    }
    assert all(r["step_ms"] > 0 and "error" not in r for r in result["steps"])
    for check in result["checks"]:
        assert check["same_groups"] and check["same_lead"] and check["copies_exact"], check
        assert check["max_abs_diff"] < 1e-5, check
