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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import torch

from benchmarks.common import SHAPES
from benchmarks.throughput import bench
from pipeline.cli import add_reduction_args


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
    add_reduction_args(parser, sweep=True)
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
