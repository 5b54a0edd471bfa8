"""What batching windows of mixed lengths into one model.run buys (the model stage does it since
2026-11-28; before, it grouped windows by exact sample count, which ran VAD-cut windows one by one).

    python benchmarks/window_batching.py ../shared/data/longform-dev/ls-1088-134315.opus --windows 12

Cuts a real recording into the pipeline's windows (VAD, pauses), then times model.run over all of
them against one model.run per window, alternating, best of ``--rounds``; checks the texts agree.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from pipeline.audio.decode import decode_audio
from pipeline.audio.vad import find_speech
from pipeline.audio.windows import cut, plan_windows
from pipeline.merging.config import ReductionConfig
from pipeline.models.registry import DEFAULT_MODEL, load_model
from pipeline.tasks import TaskRequest


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("audio", type=Path)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--windows", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    audio = decode_audio(args.audio)
    windows = plan_windows(find_speech(audio.samples, audio.sample_rate), audio.duration_s)[: args.windows]
    waves = [cut(audio, w) for w in windows]
    model = load_model(args.model, args.device)
    request, cfg = TaskRequest("asr"), ReductionConfig()
    model.run(waves[:1], request, cfg)  # warm-up
    together, one_by_one = [], []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        batched = model.run(waves, request, cfg)
        together.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        single = [model.run([w], request, cfg)[0] for w in waves]
        one_by_one.append(time.perf_counter() - t0)
    result = {
        "window_seconds": [round(len(w) / audio.sample_rate, 1) for w in waves],
        "together_s": min(together),
        "one_by_one_s": min(one_by_one),
        "speedup": min(one_by_one) / min(together),
        "same_text": all(a.text == b.text for a, b in zip(batched, single, strict=True)),
    }
    print(result)
    return result


if __name__ == "__main__":
    main()
