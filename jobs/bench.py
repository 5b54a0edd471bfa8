"""Decode throughput side by side: transformers' generate, our engine without merging, our engine with
each reduction method, on a random-weight language model of a chosen shape (paper Tables 3-4).

    python jobs/bench.py --quick --out benchmarks/cpu-quick            # CPU, small shape, about a minute
    python jobs/bench.py --shape qwen2-audio-7b --device cuda --audio-seconds 240 --batch 1 8 32 \
        --methods none fastadasp --levels 0.5 --fit --out benchmarks/h200

Every cell runs the same prompt (text, then audio-like embeddings at 25 tokens per second, then text)
for a fixed number of new tokens (no EOS). Reported: prefill s, decode ms per step (ours: the steady
step after warm-up and CUDA-graph capture, which end-to-end time includes), decode tokens/s,
end-to-end s, peak device memory, KV bytes, the bandwidth floor of a decode step (weights + mean KV
bytes at the measured copy bandwidth) and ratios against both baselines. ``--fit`` also runs every
method at the largest batch that fits the free memory (or ``--memory-gb``); ``--ragged`` also decodes
prompts of different lengths (70-100% of the audio length, as VAD-cut windows are) in one batch and
one by one (``speedup_vs_one_by_one``).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from pipeline.engine.decoder import DecoderStack
from pipeline.engine.generate import PromptGroup, generate
from pipeline.engine.memory import footprint, free_device_bytes, max_batch
from pipeline.kernels import attention_kernels_usable
from pipeline.merging.config import METHODS, ReductionConfig

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
TOKENS_PER_SECOND = 25
PREFIX, SUFFIX = 24, 16


def build_model(shape: str, device: torch.device, dtype: torch.dtype) -> Qwen2ForCausalLM:
    cfg = Qwen2Config(**SHAPES[shape], max_position_embeddings=32768, tie_word_embeddings=False)
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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


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


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step reads: every parameter except the input embedding table (one row is read)."""
    skip = model.get_input_embeddings().weight
    return sum(p.numel() * p.element_size() for p in model.parameters() if p is not skip)


@torch.inference_mode()
def run_transformers(model, embeds, new_tokens: int, device: torch.device) -> dict:
    """transformers' own generate (the path users run today): prefill is a 1-token generate, decode the
    rest of an N-token generate (warmed up first, as our engine is)."""

    def timed(n: int) -> tuple[float, int]:
        sync(device)
        t0 = time.perf_counter()
        out = model.generate(inputs_embeds=embeds, max_new_tokens=n, do_sample=False, pad_token_id=0)
        sync(device)
        return time.perf_counter() - t0, out.shape[1]

    timed(1)
    reset_peak(device)
    prefill, _ = timed(1)
    total, steps = timed(new_tokens)
    return {
        "prefill_s": prefill,
        "decode_s": max(total - prefill, 1e-9),
        "steps": steps,
        "e2e_s": total,
        "peak_bytes": peak_bytes(device),
    }


@torch.inference_mode()
def run_engine(stack, embeds, spans, cfg: ReductionConfig, new_tokens: int, device: torch.device) -> dict:
    reset_peak(device)
    t0 = time.perf_counter()
    gen = generate(
        stack, [PromptGroup(embeds, spans)], cfg, max_new_tokens=new_tokens, eos_token_ids=[], pad_token_id=0
    )
    return measured(gen, time.perf_counter() - t0, device)


def measured(gen, e2e_s: float, device: torch.device) -> dict:
    """A row's measurements of one generate call (peak memory since the last reset)."""
    return {
        "prefill_s": gen.prefill_s,
        "decode_s": gen.decode_s,
        "steps": gen.tokens.shape[1],
        "e2e_s": e2e_s,
        "peak_bytes": peak_bytes(device),
        "kv_bytes": gen.kv_bytes_kept,
        "kv_bytes_full": gen.kv_bytes_full,
        "steady_ms_per_step": 1e3 * gen.steady_step_s,
        "tokens": gen.tokens,
    }


def reduction_for(method: str, level: float, schedule: str, first_layer: int) -> ReductionConfig:
    if method == "none":
        return ReductionConfig()
    return ReductionConfig(method=method, schedule=schedule, first_layer=first_layer, target=level)


def finish(row: dict, batch: int, bandwidth: float, new_tokens: int) -> dict:
    """Derived columns: per-step decode time, tokens/s and the bandwidth floor of one step."""
    row.pop("tokens", None)
    if "error" in row:
        return row
    weights = row["weights"]
    steps = row.pop("steps")
    # Engine: the steady step after warm-up and graph capture (a one-off per call, inside e2e_s).
    row["decode_ms_per_step"] = row.pop("steady_ms_per_step", None) or 1e3 * row["decode_s"] / max(
        steps - 1, 1
    )
    row["decode_tokens_per_s"] = 1e3 * batch / row["decode_ms_per_step"]
    if "kv_bytes" in row:
        kv_mean = row["kv_bytes"] + batch * (new_tokens / 2) * row["kv_per_token_all_layers"]
        row["floor_ms_per_step"] = 1e3 * (weights + kv_mean) / bandwidth
        row["vs_floor"] = row["decode_ms_per_step"] / row["floor_ms_per_step"]
    return row


class Report:
    """The rows so far, rewritten to bench.json and bench.md after every row: a run cut short (a device
    time limit) keeps what it measured."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.rows = args, []
        args.out.mkdir(parents=True, exist_ok=True)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        rows = copy.deepcopy(self.rows)
        add_ratios(rows, row["weights"])
        meta = {"args": vars(self.args) | {"out": str(self.args.out)}, "rows": rows}
        (self.args.out / "bench.json").write_text(json.dumps(meta, indent=1))
        (self.args.out / "bench.md").write_text(markdown(rows))


def attempt(run: Callable[..., dict], *args: object) -> dict:
    """run(*args)'s measurements, or {"error": ...}: one cell that fails (most often out of memory, as
    transformers' growing cache at a large batch) must not lose the others."""
    try:
        return run(*args)
    except Exception as error:
        if isinstance(error, torch.OutOfMemoryError):
            torch.cuda.empty_cache()
        print(f"cell failed: {error!r}"[:300], file=sys.stderr, flush=True)
        return {"error": f"{type(error).__name__}: {error}"[:300]}


def run_engine_warm(
    stack, embeds, spans, cfg: ReductionConfig, new_tokens: int, device: torch.device
) -> dict:
    """run_engine after a 2-token warm-up (kernel compilation, allocator)."""
    run_engine(stack, embeds, spans, cfg, 2, device)
    return run_engine(stack, embeds, spans, cfg, new_tokens, device)


def fit_batch(stack, length: int, spans, cfg: ReductionConfig, new_tokens: int, free: int, device) -> dict:
    """The largest batch whose footprint fits ``free`` bytes."""
    need = footprint(
        stack, length, spans, cfg, new_tokens, fused_mass=attention_kernels_usable(device, stack.head_dim)
    )
    return {"batch": max_batch(free, need)}


def run_fit(
    model, stack, batch: int, audio: int, cfg: ReductionConfig, new_tokens: int, device: torch.device
) -> dict:
    """run_engine on a prompt batch of its own: the largest that fits, so nothing else is held."""
    embeds, spans = prompt_embeds(model, batch, audio)
    return run_engine(stack, embeds, spans, cfg, new_tokens, device)


def bench(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    model = build_model(args.shape, device, dtype)
    stack = DecoderStack(model.model, model.lm_head)
    weights = weight_bytes(model)
    bandwidth = copy_bandwidth(device, 1 << 28 if device.type == "cpu" else 1 << 31)
    kv_token = stack.kv_bytes_per_token() * stack.num_layers
    report = Report(args)

    def record(cell: dict, res: dict) -> None:
        row = {**cell, **res, "weights": weights, "kv_per_token_all_layers": kv_token}
        report.add(finish(row, cell["batch"], bandwidth, args.max_new_tokens))

    for seconds in args.audio_seconds:
        audio = int(seconds * TOKENS_PER_SECOND)
        for batch in args.batch:
            embeds, spans = prompt_embeds(model, batch, audio)
            cell = {"audio_s": seconds, "batch": batch, "shape": args.shape, "device": device_name(device)}
            if not args.skip_transformers:
                hf = attempt(run_transformers, model, embeds, args.max_new_tokens, device)
                record({**cell, "system": "transformers"}, hf)
            baseline = None
            for method in args.methods:
                for level in [0.0] if method == "none" else args.levels:
                    cfg = reduction_for(method, level, args.schedule, args.first_layer)
                    res = attempt(run_engine_warm, stack, embeds, spans, cfg, args.max_new_tokens, device)
                    if "tokens" in res:
                        if method == "none":
                            baseline = res["tokens"]
                        elif baseline is not None:
                            res["same_first_token"] = bool((res["tokens"][:, 0] == baseline[:, 0]).all())
                    record({**cell, "system": "engine", "method": method, "level": level}, res)
    if args.ragged:
        ragged_rows(args, model, stack, device, record)
    if args.fit:
        fit_rows(args, model, stack, device, record)
    return report.rows


def run_ragged(stack, groups: list[PromptGroup], cfg: ReductionConfig, new_tokens: int, device) -> dict:
    """Prompts of different lengths: all in one generate (they decode together), then each alone (what
    a batch of equal lengths only would do with them); tokens/s of both. Both run once untimed first:
    every length compiles and allocates on its first run, which would otherwise be timed."""

    def together():
        return generate(stack, groups, cfg, max_new_tokens=new_tokens, eos_token_ids=[], pad_token_id=0)

    def alone():
        for g in groups:
            generate(stack, [g], cfg, max_new_tokens=new_tokens, eos_token_ids=[], pad_token_id=0)

    together(), alone()
    reset_peak(device)
    sync(device)
    t0 = time.perf_counter()
    gen = together()
    together_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    alone()
    sync(device)
    alone_s = time.perf_counter() - t0
    row = measured(gen, together_s, device)
    return row | {"one_by_one_e2e_s": alone_s, "speedup_vs_one_by_one": alone_s / together_s}


def ragged_rows(args, model, stack, device, record) -> None:
    """Windows of different lengths (audio from 70% to 100% of --audio-seconds, as VAD cuts give)
    decoded in one batch against one by one."""
    for seconds in args.audio_seconds:
        for batch in args.batch:
            audio = [
                int(seconds * TOKENS_PER_SECOND * (0.7 + 0.3 * i / max(batch - 1, 1))) for i in range(batch)
            ]
            groups = [PromptGroup(*prompt_embeds(model, 1, n)) for n in audio]
            for method in args.methods:
                for level in [0.0] if method == "none" else args.levels:
                    cfg = reduction_for(method, level, args.schedule, args.first_layer)
                    res = attempt(run_ragged, stack, groups, cfg, args.max_new_tokens, device)
                    cell = {
                        "audio_s": seconds,
                        "batch": batch,
                        "shape": args.shape,
                        "device": device_name(device),
                    }
                    record({**cell, "system": "engine-ragged", "method": method, "level": level}, res)


def fit_rows(args, model, stack, device, record) -> None:
    """Each method at the largest batch that fits: where merging turns saved memory into throughput."""
    free = int(args.memory_gb * 2**30) if args.memory_gb else free_device_bytes(device)
    for seconds in args.audio_seconds:
        audio = int(seconds * TOKENS_PER_SECOND)
        length = PREFIX + audio + SUFFIX
        spans = [(PREFIX, PREFIX + audio)]
        for method in args.methods:
            for level in [0.0] if method == "none" else args.levels:
                cfg = reduction_for(method, level, args.schedule, args.first_layer)
                cell = {"audio_s": seconds, "shape": args.shape, "device": device_name(device)}
                row = {**cell, "system": "engine-fit", "method": method, "level": level}
                sized = attempt(fit_batch, stack, length, spans, cfg, args.max_new_tokens, free, device)
                if "error" in sized:
                    record({**row, "batch": 0}, sized)
                    continue
                if sized["batch"] == 0:
                    continue
                res = attempt(run_fit, model, stack, sized["batch"], audio, cfg, args.max_new_tokens, device)
                record({**row, "batch": sized["batch"]}, res)


def add_ratios(rows: list[dict], weights: int) -> None:
    """Speed-ups against transformers and against our no-merge engine in the same cell, and what the
    bytes predict: (weights + full KV) / (weights + merged KV)."""

    def key(r: dict) -> tuple:
        if r["system"] == "engine-fit":
            return (r["audio_s"], "fit")
        return (r["audio_s"], r["batch"], r["system"] == "engine-ragged")

    rows = [r for r in rows if "error" not in r]
    hf = {key(r): r for r in rows if r["system"] == "transformers"}
    plain = {key(r): r for r in rows if r["system"] != "transformers" and r["method"] == "none"}
    for r in rows:
        if r["system"] == "transformers":
            continue
        if key(r) in hf:
            r["speedup_vs_transformers"] = r["decode_tokens_per_s"] / hf[key(r)]["decode_tokens_per_s"]
        base = plain.get(key(r))
        if base is not None and r is not base:
            r["speedup_vs_engine"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
            if r["system"] == "engine":
                r["predicted_speedup"] = (weights + base["kv_bytes"]) / (weights + r["kv_bytes"])
                r["share_of_predicted"] = r["speedup_vs_engine"] / r["predicted_speedup"]


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


COLUMNS = (
    ("system", "{}"),
    ("method", "{}"),
    ("level", "{:.0%}"),
    ("audio_s", "{:g}"),
    ("batch", "{}"),
    ("prefill_s", "{:.3f}"),
    ("decode_ms_per_step", "{:.2f}"),
    ("decode_tokens_per_s", "{:.1f}"),
    ("peak_bytes", "{:.2e}"),
    ("kv_bytes", "{:.2e}"),
    ("floor_ms_per_step", "{:.2f}"),
    ("vs_floor", "{:.2f}x"),
    ("speedup_vs_transformers", "{:.2f}x"),
    ("speedup_vs_engine", "{:.2f}x"),
    ("predicted_speedup", "{:.2f}x"),
    ("share_of_predicted", "{:.0%}"),
    ("speedup_vs_one_by_one", "{:.2f}x"),
    ("error", "{}"),
)


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(name for name, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [fmt.format(r[name]) if name in r else "" for name, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--audio-seconds", type=float, nargs="+", default=[30, 120, 240])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=["none", "fastadasp"])
    parser.add_argument("--levels", type=float, nargs="+", default=[0.5], help="target audio-KV reductions")
    parser.add_argument("--schedule", default="constant")
    parser.add_argument("--first-layer", type=int, default=0)
    parser.add_argument(
        "--fit", action="store_true", help="also run each method at its largest fitting batch"
    )
    parser.add_argument(
        "--memory-gb", type=float, help="memory budget for --fit (default: free device memory)"
    )
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument(
        "--ragged", action="store_true", help="also windows of different lengths: one batch vs one by one"
    )
    parser.add_argument("--quick", action="store_true", help="CPU smoke: small shape, 30 s, batch 1 and 4")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.quick:
        args.shape, args.audio_seconds, args.batch, args.max_new_tokens = "small", [30], [1, 4], 8
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")

    bench(args)
    print((args.out / "bench.md").read_text())


if __name__ == "__main__":
    main()
