"""One decode step of the engine (fused kernels) against the step it replaced (PyTorch elementwise ops).

    python benchmarks/decode_step.py --out decode_step.json             # CUDA, Qwen2-Audio-7B-shaped LM
    python benchmarks/decode_step.py --layers 4 --out quick.json        # 4 layers of that shape
    TRITON_INTERPRET=1 python benchmarks/decode_step.py --cpu-smoke --out smoke.json   # tiny, interpreted

Both variants decode from one random-weight Qwen2 stack and one set of caches (``--cached`` random
tokens per row) with a step's device bookkeeping (argmax, next token, position and step update):
(a) engine: ``EngineRunner``'s step (pipeline/engine/runner.py) as the engine runs it, per layer [add + RMSNorm] -> qkv GEMM (+ bias) ->
[rope + cache write] -> decode attention -> o GEMM -> [add + RMSNorm] -> gate_up GEMM -> [silu * up]
-> down GEMM (``pipeline.kernels.fused.FUSED``); (b) unfused: the same step with the bracketed ops as
their PyTorch twins (``TWINS`` below: RMSNorm, rope and cache write, chunk + silu + mul as PyTorch
ops), the same decode attention.
Per batch: logits of both on one state (max abs and relative error, same argmax), device kernels of
one eager step (torch.profiler: count, device time, the 8 costliest kernels), ms per step from
replays of a one-step CUDA graph (CUDA events, rounds alternating, median), the engine's ms per
steady step of a ``generate`` call as it reports it (how jobs/bench.py measures), and the bandwidth floor: (weights + KV
read) / copy bandwidth. A batch whose caches do not fit the free memory is reported as skipped. The
JSON is rewritten after every batch, so a run cut short keeps what it measured. ``--cpu-smoke`` runs
every kernel in Triton's interpreter (``forced_path("triton")``); its times mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import torch

from benchmarks.common import (
    SHAPES,
    build_model,
    copy_bandwidth,
    elapsed_ms,
    environment,
    floor_ms,
    graphed,
    require_device,
    script_parser,
    text_table,
    weight_bytes,
)
from pipeline.engine.generate import generate
from pipeline.engine.prefill import PromptGroup
from pipeline.engine.runner import EngineRunner
from pipeline.engine.stack import DecoderStack
from pipeline.kernels.fused import (
    StepOps,
    add_rmsnorm_torch,
    rope_and_cache_torch,
    silu_mul_torch,
)
from pipeline.kernels.paths import forced_path
from pipeline.merging.config import NO_REDUCTION

# The step before fusion: the PyTorch twins of every fused op, what the engine's kernels are measured against.
TWINS = StepOps(add_rmsnorm_torch, rope_and_cache_torch, silu_mul_torch)

_MARGIN = 4 << 30  # free bytes kept beyond the caches: graph pools, logits, attention partials, cuBLAS


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2-audio-7b")
    parser.add_argument("--layers", type=int, help="decoder layers (default: the shape's)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--cached", type=int, default=6040, help="cached tokens per row (240 s of audio)")
    parser.add_argument("--new-tokens", type=int, default=64, help="cache capacity beyond --cached")
    parser.add_argument("--iters", type=int, default=20, help="graph replays per timing round")
    parser.add_argument("--rounds", type=int, default=7, help="timing rounds (median)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        args.shape, args.batches, args.cached, args.new_tokens = "tiny", [1, 2], 40, 5
        args.iters, args.rounds, args.dtype = 2, 1, "float32"
    if args.iters + 3 > args.new_tokens:  # two warm-up steps, then `iters` steps per round
        parser.error("--new-tokens must be at least --iters + 3")
    return args


def cache_bytes(stack: DecoderStack, batch: int, tokens: int) -> int:
    return stack.num_layers * batch * tokens * stack.kv_bytes_per_token()


def make_runners(
    stack: DecoderStack, batch: int, cached: int, new_tokens: int
) -> tuple[EngineRunner, EngineRunner]:
    """The engine's runner and the unfused one (the same step on the fused ops' PyTorch twins), sharing
    caches of ``cached`` filled positions per layer and row (standard normal keys and values) and one
    state: the same first tokens at step 0."""
    engine = EngineRunner(stack, batch, [cached + new_tokens] * stack.num_layers)
    unfused = EngineRunner(stack, batch, [1] * stack.num_layers, ops=TWINS)
    unfused.caches = engine.caches
    for k, v in zip(engine.caches.k, engine.caches.v, strict=True):
        k.normal_()
        v.normal_()
    engine.caches.lengths.fill_(cached)
    gen = torch.Generator().manual_seed(batch)
    first = torch.randint(0, stack.embed_tokens.num_embeddings, (batch,), generator=gen)
    for runner in (engine, unfused):
        runner.tokens.copy_(first)
        _rewind(runner, cached)
    return engine, unfused


def _advance(runner: EngineRunner) -> None:
    """One step of every row with its bookkeeping on the device (what a graph replays)."""
    token = runner._forward(runner.slots).argmax(-1)
    runner.steps += 1
    runner.positions += 1
    runner.tokens.copy_(token)


def compare_logits(engine: EngineRunner, unfused: EngineRunner) -> dict[str, Any]:
    """Logits of one step from the same state (each writes its own k, v at the same position first)."""
    expected, got = unfused._forward(unfused.slots), engine._forward(engine.slots)
    err = (got - expected).abs().max().item()
    return {
        "logits_max_abs_err": err,
        "logits_rel_err": err / max(expected.abs().max().item(), 1e-30),
        "same_tokens": bool(torch.equal(got.argmax(-1), expected.argmax(-1))),
    }


def _rewind(runner: EngineRunner, cached: int) -> None:
    """Back to step 0 in place (a captured graph reads these tensors), so replays never pass the capacity."""
    runner.steps.zero_()
    runner.positions.fill_(cached)


def step_profile(runner: EngineRunner, cached: int) -> dict[str, Any]:
    """One eager step as CUDA's profiler sees it: kernel (and copy) count, their summed device time and
    the kernels that take most of it (name, us, share): where the distance to the floor goes."""
    from collections import Counter

    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    _rewind(runner, cached)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        _advance(runner)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    by_name: Counter[str] = Counter()
    for event in kernels:
        by_name[event.name[:80]] += event.time_range.elapsed_us()  # a kernel's own interval
    total = sum(by_name.values())
    top = [{"kernel": name, "us": us, "share": us / total} for name, us in by_name.most_common(8)]
    return {"kernels": len(kernels), "device_us": total, "top": top}


def _one_step(runner: EngineRunner, cached: int, cuda: bool) -> Callable[[], None]:
    """After two warm-up steps: one step as a CUDA graph replay (CUDA) or an eager call (CPU)."""
    _rewind(runner, cached)
    _advance(runner)  # compile kernels, warm cuBLAS and the allocator
    if cuda:
        return graphed(lambda: _advance(runner))  # its eager call is the second warm-up step
    _advance(runner)
    return lambda: _advance(runner)


def step_ms(runners: dict[str, EngineRunner], args: argparse.Namespace, cuda: bool) -> dict[str, float]:
    """Median ms per step of each runner, timing rounds alternating between them."""
    steps = {name: _one_step(r, args.cached, cuda) for name, r in runners.items()}
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, step in steps.items():
            _rewind(runners[name], args.cached)
            samples[name].append(elapsed_ms(step, cuda, calls=args.iters) / args.iters)
    return {name: statistics.median(s) for name, s in samples.items()}


def run_ms(stack: DecoderStack, batch: int, cached: int, new_tokens: int) -> float:
    """ms per steady step of a ``generate`` call (after warm-up and graph capture) on ``batch`` prompts of
    ``cached`` tokens, no reduction, ``new_tokens`` each."""
    embeds = torch.randn(batch, cached, stack.hidden_size, dtype=stack.dtype, device=stack.device)
    group = PromptGroup(embeds, [(1, cached - 1)])
    gen = generate(stack, [group], NO_REDUCTION, max_new_tokens=new_tokens, eos_token_ids=[], pad_token_id=0)
    return 1e3 * gen.steady_step_s


def _attempt(row: dict[str, Any], key: str, measure: Callable[[], Any]) -> bool:
    """row[key] = measure(), or row[key + "_error"] with the traceback printed: one run reports all."""
    try:
        row[key] = measure()
    except Exception as exc:
        traceback.print_exc()
        row[f"{key}_error"] = repr(exc)
        return False
    return True


def bench_batch(
    stack: DecoderStack, batch: int, args: argparse.Namespace, floor: Callable[[int], float]
) -> dict[str, Any]:
    """One table row; a step that fails leaves the other's numbers and says why."""
    cuda = stack.device.type == "cuda"
    row: dict[str, Any] = {"batch": batch}
    need = cache_bytes(stack, batch, args.cached + args.new_tokens)
    if cuda:
        torch.cuda.empty_cache()  # blocks cached by earlier batches count as used in mem_get_info
        free = torch.cuda.mem_get_info()[0]
        if need + _MARGIN > free:
            return {**row, "skipped": f"caches need {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"}
    print(f"batch {batch}: {need / 2**30:.2f} GiB of caches", flush=True)
    engine, unfused = make_runners(stack, batch, args.cached, args.new_tokens)
    runners: dict[str, EngineRunner] = {"engine": engine, "unfused": unfused}
    if _attempt(row, "agreement", lambda e=engine, u=unfused: compare_logits(e, u)):
        row.update(row.pop("agreement"))
    else:
        del runners["engine"]
    row["floor_ms"] = floor(batch)
    for name, ms in step_ms(runners, args, cuda).items():
        row[f"{name}_ms"], row[f"{name}_vs_floor"] = ms, ms / row["floor_ms"]
    if "engine_ms" in row:
        row["speedup"] = row["unfused_ms"] / row["engine_ms"]
    for name, runner in runners.items():
        if cuda and _attempt(row, f"{name}_profile", lambda r=runner: step_profile(r, args.cached)):
            row[f"{name}_kernels"] = row[f"{name}_profile"]["kernels"]
    del engine, unfused, runners  # the caches, before generate allocates its own
    _attempt(row, "engine_run_ms", lambda: run_ms(stack, batch, args.cached, args.new_tokens))
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    cuda = require_device(args.cpu_smoke)
    config = {**SHAPES[args.shape], **({"num_hidden_layers": args.layers} if args.layers else {})}
    device = torch.device("cuda" if cuda else "cpu")
    result: dict[str, Any] = {
        **environment(cuda),
        "shape": config,
        "dtype": args.dtype,
        "cached": args.cached,
        "rows": [],
    }
    with torch.inference_mode():
        model = build_model(config, device, getattr(torch, args.dtype))
        stack = DecoderStack(model.model, model.lm_head)
        weights = weight_bytes(model)
        bandwidth = copy_bandwidth(device, 1 << 24 if args.cpu_smoke else 1 << 31)
        result.update(weight_bytes=weights, copy_gb_per_s=bandwidth / 1e9)
        print(f"{result['device']}  torch {torch.__version__}  {config}  {args.dtype}", flush=True)

        def floor(batch: int) -> float:
            return floor_ms(weights, cache_bytes(stack, batch, args.cached), bandwidth)

        for batch in args.batches:
            try:
                with forced_path("triton") if args.cpu_smoke else contextlib.nullcontext():
                    row = bench_batch(stack, batch, args, floor)
            except Exception as exc:  # report and go on: one failed batch must not hide the others
                traceback.print_exc()
                row = {"batch": batch, "error": repr(exc)}
            result["rows"].append(row)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2))
            print(json.dumps(row), flush=True)
    print(text_table(result["rows"]))
    return result


if __name__ == "__main__":
    main()
