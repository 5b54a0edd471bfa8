"""Shared by the benchmark scripts and jobs/bench.py: the device check, device sync and timers, the
random-weight Qwen2 models and prompts they measure, the bandwidth floor and plain-text tables."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import Qwen2Config, Qwen2ForCausalLM

from pipeline.device import sync

SHAPES = {
    # Qwen2-Audio-7B's language model (Qwen-7B shape).
    "qwen2-audio-7b": {
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "intermediate_size": 11008,
        "vocab_size": 156032,
    },
    "tiny": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": 512,
    },
    "small": {
        "hidden_size": 512,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "intermediate_size": 1408,
        "vocab_size": 32000,
    },
}
PREFIX, SUFFIX = 24, 16  # text tokens before and after the audio span of prompt_embeds


def script_parser(doc: str) -> argparse.ArgumentParser:
    """A benchmark script's parser (``doc`` its help) with the flags every script takes."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the results")
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="tiny shapes in Triton's interpreter (TRITON_INTERPRET=1)"
    )
    return parser


def require_device(cpu_smoke: bool) -> bool:
    """True for a CUDA run; False for ``--cpu-smoke``, whose kernels run in Triton's interpreter. Triton
    picks compiled or interpreted at its first import (transformers imports it), so the smoke run needs
    TRITON_INTERPRET=1 from the environment: set here, it would come too late."""
    if cpu_smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--cpu-smoke needs TRITON_INTERPRET=1 in the environment")
        return False
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --cpu-smoke")
    return True


def environment(cuda: bool) -> dict[str, Any]:
    """What a result was measured on: the device, library versions, whether kernels were interpreted."""
    import triton  # the gpu extra: only the kernel benchmarks need it, not jobs/bench.py

    return {
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "triton": triton.__version__,
        "interpreted": not cuda,
    }


def elapsed_ms(fn: Callable[[], object], cuda: bool, calls: int = 1) -> float:
    """Milliseconds of ``calls`` back-to-back fn() calls: device time between CUDA events on CUDA
    (host launch costs hidden while the device is busy), perf_counter on CPU."""
    if not cuda:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t0) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def median_ms(
    fn: Callable[[], object],
    cuda: bool,
    iters: int,
    warmup: int = 0,
    before: Callable[[], object] | None = None,
) -> float:
    """Median elapsed_ms of one fn() call over ``iters`` samples after ``warmup`` calls. On CUDA each
    sample starts from an idle device; ``before()`` then runs untimed ahead of it."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        if cuda:
            torch.cuda.synchronize()
        if before is not None:
            before()
        samples.append(elapsed_ms(fn, cuda))
    return statistics.median(samples)


def graphed(fn: Callable[[], object], reps: int = 1) -> Callable[[], None]:
    """fn captured ``reps`` times in one CUDA graph, after one eager call (compilation and allocation
    cannot happen inside a capture); calling the result replays it."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    return graph.replay


def build_model(config: dict[str, int], device: torch.device | str, dtype: torch.dtype) -> Qwen2ForCausalLM:
    """A Qwen2ForCausalLM of ``config`` (a SHAPES entry, or any Qwen2Config fields) with random weights
    (seed 0), initialised on ``device`` in ``dtype``."""
    cfg = Qwen2Config(**{"max_position_embeddings": 32768, **config}, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def prompt_embeds(
    model: Qwen2ForCausalLM, batch: int, audio_tokens: int
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Text embeddings around an audio span whose neighbours are similar, as speech frames are."""
    gen = torch.Generator().manual_seed(1)
    emb = model.get_input_embeddings()
    scale = emb.weight.float().std().item()
    ids = torch.randint(0, emb.num_embeddings, (batch, PREFIX + SUFFIX), generator=gen)
    walk = torch.randn(batch, audio_tokens, emb.embedding_dim, generator=gen).cumsum(1)
    walk = walk / walk.std(-1, keepdim=True) * scale
    text = emb(ids.to(emb.weight.device))
    audio = walk.to(text.device, text.dtype)
    embeds = torch.cat([text[:, :PREFIX], audio, text[:, PREFIX:]], dim=1)
    return embeds, [(PREFIX, PREFIX + audio_tokens)]


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step reads: every parameter except the input embedding table (one row is read)."""
    skip = model.get_input_embeddings().weight
    return sum(p.numel() * p.element_size() for p in model.parameters() if p is not skip)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes per second of a device-to-device copy (read + write counted), best of 5."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def floor_ms(weights: int, kv_bytes: float, bandwidth: float) -> float:
    """The bandwidth floor of one decode step: the weights and the KV it attends to, each read once at
    the measured copy bandwidth."""
    return 1e3 * (weights + kv_bytes) / bandwidth


def cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def text_table(rows: list[dict[str, Any]], keys: list[str] | None = None) -> str:
    """Right-aligned columns; ``keys`` default to every key seen, in first-seen order."""
    keys = keys or list(dict.fromkeys(key for row in rows for key in row))
    cells = [[cell(row.get(key, "")) for key in keys] for row in rows]
    widths = [max(len(key), *(len(c[i]) for c in cells)) for i, key in enumerate(keys)]
    lines = ["  ".join(key.rjust(w) for key, w in zip(keys, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)
