"""Continuous batching in the decoder-only engine against static batches, at a real archive's length mix.

    python benchmarks/engine_batching.py --threads 2 --out benchmarks/engine-batching-tiny-cpu
    python benchmarks/engine_batching.py --shape qwen2-audio-7b --device cuda --slots 32 \
        --mix benchmarks/engine-batching-tiny-cpu/length_mix.json --out benchmarks/engine-batching-<card>

The windows of benchmarks/continuous_batching.py's mixed archive: every utterance of
../shared/data/librispeech-dev (a file of its own, one window) and the long-form dev recordings cut
into 30 s windows. A window's prompt: a few text tokens around 25 audio tokens per second of it
(Qwen2-Audio's rate), random embeddings; its output length: the token count of its reference text
(Whisper's tokenizer, plus the end token), written to --out as length_mix.json for machines without
the data (``--mix``). Random weights decide nothing, so each row stops at that
count (``Request.max_new_tokens``). The model: the tiny random Qwen2-Audio's language model
(pipeline/models/tiny_random.py), or with ``--shape`` a random-weight language model of that shape
(benchmarks/common.py).

- static: ``run`` calls of ``--slots`` windows in arrival order (a batch's rows leave as they finish;
  its slots wait for its last row, as they did before the runner streamed);
- continuous: one stream; every slot refilled at the step it frees.
Reported per mode: decoder steps, occupancy (rows decoding / slots, per step; also only while windows
waited), generated tokens per second of wall time (prefill included) and the wall time; interleaved
repeats, medians. Writes results.json to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import torch

from benchmarks.common import SHAPES, build_model
from pipeline.decoding.scheduler import Request, Scheduler
from pipeline.device import sync
from pipeline.engine.plan import plan_layers
from pipeline.engine.runner import EngineRunner, capacity, engine_policy
from pipeline.engine.stack import DecoderStack
from pipeline.merging.config import NO_REDUCTION, ReductionConfig
from pipeline.models.registry import load_model
from pipeline.models.tiny_random import build_tiny_random

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
AUDIO_TOKENS_PER_S = 25
TEXT_BEFORE, TEXT_AFTER = 12, 8  # prompt tokens around the audio (a chat template's order of size)


def length_mix(manifest: Path, longform: Path) -> list[tuple[int, int]]:
    """(audio tokens, output tokens) of every window of the mixed archive, in archive order."""
    tokenizer = load_model("whisper-tiny.en", device="cpu").tokenizer
    windows = []  # (seconds, reference text)
    for line in manifest.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            windows.append((row["duration_s"], row["text"]))
    for ref in sorted(longform.glob("*.json")):
        record = json.loads(ref.read_text())
        for start in range(0, int(record["duration_s"]) + 1, 30):
            words = [s["text"] for s in record["segments"] if start <= s["start_s"] < start + 30]
            windows.append((min(30.0, record["duration_s"] - start), " ".join(words)))
    return [
        (
            max(1, round(AUDIO_TOKENS_PER_S * seconds)),
            len(tokenizer.encode(text.lower(), add_special_tokens=False)) + 1,
        )
        for seconds, text in windows
        if seconds > 0
    ]


def requests(mix: list[tuple[int, int]], hidden: int, dtype: torch.dtype, device: str) -> list[Request]:
    """One request per window: its prompt's embeddings (random), its output length as its budget."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for i, (audio, new) in enumerate(mix):
        length = TEXT_BEFORE + audio + TEXT_AFTER
        embeds = (0.02 * torch.randn(length, hidden, generator=gen)).to(device=device, dtype=dtype)
        spans = ((TEXT_BEFORE, TEXT_BEFORE + audio),)
        out.append(
            Request(
                key=i,
                work=None,
                max_new_tokens=new,
                state={"embeds": embeds, "spans": spans, "group": (length,)},
            )
        )
    return out


def fresh(template: list[Request]) -> list[Request]:
    return [
        Request(key=r.key, work=None, max_new_tokens=r.max_new_tokens, state=dict(r.state)) for r in template
    ]


def decode(
    runner: EngineRunner, template: list[Request], reduction: ReductionConfig, continuous: bool, slots: int
) -> dict:
    policy = engine_policy([], max(r.max_new_tokens for r in template), 0)
    todo = fresh(template)
    batches = [todo] if continuous else [todo[i : i + slots] for i in range(0, len(todo), slots)]
    steps = rows = queued_steps = queued_rows = 0
    sync(runner.stack.device)
    start = time.perf_counter()
    for batch in batches:
        scheduler = Scheduler(slots)
        scheduler.add(batch)
        runner.run(scheduler, policy, reduction)
        c = scheduler.counters
        steps, rows = steps + c.steps, rows + c.rows
        queued_steps, queued_rows = queued_steps + c.queued_steps, queued_rows + c.queued_rows
    sync(runner.stack.device)
    wall = time.perf_counter() - start
    tokens = sum(len(r.generated) for r in todo)
    assert all(len(r.generated) == r.max_new_tokens for r in todo)
    return {
        "wall_s": wall,
        "steps": steps,
        "occupancy": rows / (steps * slots),
        "occupancy_while_queued": queued_rows / (queued_steps * slots) if queued_steps else None,
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
    }


def summary(runs: list[dict]) -> dict:
    """The repeats of one mode: median times, the counts of the first (every repeat decodes alike)."""
    timed = ("wall_s", "tokens_per_s")
    return {k: statistics.median(r[k] for r in runs) if k in timed else runs[0][k] for k in runs[0]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        help="a random LM of this shape (default: the tiny random Qwen2-Audio's)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--limit", type=int, help="the first N windows only (a quick look)")
    parser.add_argument(
        "--mix", type=Path, help="a length_mix.json an earlier run wrote (machines without the data)"
    )
    parser.add_argument("--manifest", type=Path, default=DATA / "librispeech-dev" / "manifest.jsonl")
    parser.add_argument("--longform", type=Path, default=DATA / "longform-dev")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    with torch.inference_mode():
        if args.shape:
            model = build_model(SHAPES[args.shape], args.device, dtype)
            stack, name = DecoderStack(model.model, model.lm_head), args.shape
        else:
            stack, name = build_tiny_random().to(args.device, dtype).stack, "tiny random Qwen2-Audio"
        if args.mix:
            mix = [tuple(pair) for pair in json.loads(args.mix.read_text())]
        else:
            mix = length_mix(args.manifest, args.longform)
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "length_mix.json").write_text(json.dumps(mix))
        mix = mix[: args.limit]
        template = requests(mix, stack.hidden_size, dtype, args.device)
        policy = engine_policy([], max(n for _, n in mix), 0)
        longest = max(r.state["embeds"].shape[0] for r in template)
        plan = plan_layers(longest, [(TEXT_BEFORE, longest - TEXT_AFTER)], NO_REDUCTION, stack.num_layers)
        runner = EngineRunner(stack, args.slots, capacity(plan, policy))
        decode(runner, template[: args.slots], NO_REDUCTION, True, args.slots)  # warm-up (and graphs)
        runs: dict[str, list[dict]] = {"static": [], "continuous": []}
        for _ in range(args.repeats):
            for mode in runs:
                runs[mode].append(decode(runner, template, NO_REDUCTION, mode == "continuous", args.slots))
                print(mode, runs[mode][-1], flush=True)
    result = {
        "model": name,
        "device": torch.cuda.get_device_name()
        if cuda
        else f"cpu ({args.threads} threads, {platform.machine()})",
        "dtype": str(dtype),
        "slots": args.slots,
        "windows": len(mix),
        "output_tokens": {"mean": statistics.mean(n for _, n in mix), "max": max(n for _, n in mix)},
        **{mode: summary(rs) for mode, rs in runs.items()},
    }
    result["speedup_tokens_per_s"] = result["continuous"]["tokens_per_s"] / result["static"]["tokens_per_s"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
