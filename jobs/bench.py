r"""Decode throughput side by side: transformers' generate, our engine without merging, our engine with
each reduction method, on a random-weight language model of a chosen shape (paper Tables 3-4).

    python jobs/bench.py --quick --output benchmarks/cpu-quick         # CPU, small shape, about a minute
    python jobs/bench.py --shape qwen2-audio-7b --device cuda --audio-seconds 240 --batch-size 1 8 32 \
        --methods none fastadasp --levels 0.5 --fit --output benchmarks/h200

Every cell runs the same prompt (text, then audio-like embeddings at 25 tokens per second, then text)
for a fixed number of new tokens (no EOS). Reported: prefill s, decode ms per step (ours: the steady
step after warm-up and CUDA-graph capture, which end-to-end time includes), decode tokens/s,
end-to-end s, peak device memory, KV bytes, the bandwidth floor of a decode step (weights + mean KV
bytes at the measured copy bandwidth) and ratios against both baselines. ``--fit`` also runs every
method at the largest batch that fits the free memory (or ``--memory-gb``); ``--ragged`` also decodes
prompts of different lengths (70-100% of the audio length, as VAD-cut windows are) in one batch and
one by one (``speedup_vs_one_by_one``). The tables (bench.md, bench.json in --output) are rewritten after
every cell, so a stopped bench keeps the cells it finished.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import torch

from benchmarks.common import SHAPES
from benchmarks.throughput import bench
from jobs.common import JobParser, output_folder, run_job
from pipeline.cli import add_reduction_args


def _run(argv: list[str] | None) -> None:
    parser = JobParser(__doc__)
    parser.add_argument(
        "--shape", choices=sorted(SHAPES), default="small", help="the random-weight language model's shape"
    )
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device"
    )
    parser.add_argument(
        "--dtype", default=None, help="torch dtype (default: bfloat16 on CUDA, float32 on CPU)"
    )
    parser.add_argument(
        "--audio-seconds", type=float, nargs="+", default=[30, 120, 240], help="audio lengths of the prompts"
    )
    parser.add_argument(
        "--batch-size",
        "--batch",
        dest="batch",
        metavar="BATCH_SIZE",
        type=int,
        nargs="+",
        default=[1, 8],
        help="batch sizes, each a cell (--batch: old name)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens decoded per prompt (no EOS)")
    add_reduction_args(parser, sweep=True)
    parser.add_argument(
        "--fit", action="store_true", help="also run each method at its largest fitting batch"
    )
    parser.add_argument(
        "--memory-gb", type=float, help="memory budget for --fit (default: free device memory)"
    )
    parser.add_argument(
        "--skip-transformers", action="store_true", help="leave out the transformers generate baseline"
    )
    parser.add_argument(
        "--ragged", action="store_true", help="also windows of different lengths: one batch vs one by one"
    )
    parser.add_argument("--quick", action="store_true", help="CPU smoke: small shape, 30 s, batch 1 and 4")
    parser.add_argument(
        "--output",
        "--out",
        dest="out",
        metavar="OUTPUT",
        type=output_folder,
        required=True,
        help="folder of bench.md and bench.json (--out: old name)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.shape, args.audio_seconds, args.batch, args.max_new_tokens = "small", [30], [1, 4], 8
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")

    bench(args)
    print((args.out / "bench.md").read_text())


def main(argv: list[str] | None = None) -> int:
    return run_job(_run, argv, interrupted="stopped; the cells finished so far are in the --output tables")


if __name__ == "__main__":
    sys.exit(main())
