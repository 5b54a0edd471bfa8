"""The decode-throughput matrix behind jobs/bench.py (its docstring says what every row measures):
transformers' generate, our engine and our engine with each reduction, cell by cell, each row written
out as soon as it is measured."""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Callable

import torch

from benchmarks.common import (
    PREFIX,
    SHAPES,
    SUFFIX,
    build_model,
    copy_bandwidth,
    floor_ms,
    prompt_embeds,
    sync,
    weight_bytes,
)
from pipeline.cli import sweep_from_args
from pipeline.engine.generate import generate
from pipeline.engine.memory import footprint, free_device_bytes, max_batch
from pipeline.engine.prefill import PromptGroup
from pipeline.engine.stack import DecoderStack
from pipeline.kernels.paths import attention_kernels_usable
from pipeline.merging.config import ReductionConfig

TOKENS_PER_SECOND = 25


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


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
        row["floor_ms_per_step"] = floor_ms(weights, kv_mean, bandwidth)
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
    model = build_model(SHAPES[args.shape], device, dtype)
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
            for method, level, cfg in sweep_from_args(args):
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
            cell = {"audio_s": seconds, "batch": batch, "shape": args.shape, "device": device_name(device)}
            for method, level, cfg in sweep_from_args(args):
                res = attempt(run_ragged, stack, groups, cfg, args.max_new_tokens, device)
                record({**cell, "system": "engine-ragged", "method": method, "level": level}, res)


def fit_rows(args, model, stack, device, record) -> None:
    """Each method at the largest batch that fits: where merging turns saved memory into throughput."""
    free = int(args.memory_gb * 2**30) if args.memory_gb else free_device_bytes(device)
    for seconds in args.audio_seconds:
        audio = int(seconds * TOKENS_PER_SECOND)
        length = PREFIX + audio + SUFFIX
        spans = [(PREFIX, PREFIX + audio)]
        cell = {"audio_s": seconds, "shape": args.shape, "device": device_name(device)}
        for method, level, cfg in sweep_from_args(args):
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
