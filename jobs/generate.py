r"""One audio file + prompt through a decoder-only SpeechLM with a chosen token reduction; prints text,
audio tokens per layer, KV bytes and timings.

    python jobs/generate.py examples/intro.wav --model tiny-random-qwen2-audio --method fastadasp --target 0.3
    python jobs/generate.py talk.mp3 --model /models/Qwen2-Audio-7B-Instruct --device cuda --task st \
        --target-language de --method fastadasp --schedule decay --first-layer 9 --target 0.3
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from jobs.common import JobParser, input_path, run_job
from pipeline import tasks
from pipeline.audio.decode import decode_audio
from pipeline.cli import add_reduction_args, reduction_from_args
from pipeline.models.base import ModelError, check_request
from pipeline.models.registry import describe_model, load_model
from pipeline.tasks import TaskRequest


def _run(argv: list[str] | None) -> None:
    parser = JobParser(__doc__)
    parser.add_argument(
        "audio",
        type=input_path,
        help="an audio file of at most the model's window (30 s for Qwen2-Audio; longer: the archive job)",
    )
    parser.add_argument(
        "--model",
        required=True,
        help="a decoder-only SpeechLM: a local checkpoint folder (Qwen2-Audio, GLM-ASR), a hub id (fetched, "
        "or from the cache with HF_HUB_OFFLINE=1), or tiny-random-qwen2-audio (random weights, offline: "
        "plumbing only). Whisper models run in jobs/transcribe_archive.py",
    )
    parser.add_argument(
        "--task",
        choices=tasks.TASKS,
        default="asr",
        help="the task whose prompt the model gets (st needs --target-language, sqa --question)",
    )
    parser.add_argument("--target-language", help="st: language to translate into")
    parser.add_argument("--question", help="sqa: the question about the audio")
    parser.add_argument(
        "--prompt", help="raw prompt text with the model's audio placeholder once (overrides --task)"
    )
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="most tokens generated")
    add_reduction_args(parser)
    args = parser.parse_args(argv)

    reduction = reduction_from_args(args)
    info = describe_model(args.model)  # config files only: what is refused, is before any weights load
    if info.family == "whisper":
        raise ModelError(
            f"{args.model} is a Whisper model, not a decoder-only SpeechLM; use jobs/transcribe_archive.py"
        )
    request = TaskRequest(args.task, target_language=args.target_language, question=args.question)
    if args.prompt is None:
        check_request(info, request)
    # One window through the engine: a longer file is refused (the archive job cuts and stitches those).
    audio = decode_audio(args.audio, sample_rate=info.sample_rate, max_duration_s=info.max_window_s)
    model = load_model(args.model, args.device)
    model.max_new_tokens = args.max_new_tokens
    prompt = args.prompt or model.prompt_text(request)
    gen, encode_s = model.generate_batch(prompt, [[audio.samples]], reduction)
    n = int(gen.num_tokens[0])
    text = model.tokenizer.decode(gen.tokens[0, :n].tolist(), skip_special_tokens=True)
    plan = gen.plans[0]
    print(text.strip())
    print(f"\nreduction: {reduction.to_dict()}")
    print(f"audio: {audio.duration_s:.2f} s -> {plan.audio_lengths[0]} tokens")
    print("audio tokens per layer: " + " ".join(str(n) for n in plan.audio_lengths))
    print(
        f"KV cache: {gen.kv_bytes_full / 2**20:.2f} MiB without merging, {gen.kv_bytes_kept / 2**20:.2f} MiB kept "
        f"({1 - gen.kv_bytes_kept / gen.kv_bytes_full:.1%} saved)"
    )
    print(
        f"encode {encode_s * 1e3:.1f} ms, prefill {gen.prefill_s * 1e3:.1f} ms, "
        f"decode {gen.decode_s * 1e3:.1f} ms for {n} tokens"
    )


def main(argv: list[str] | None = None) -> int:
    return run_job(_run, argv, interrupted="stopped; nothing is written, run the command again")


if __name__ == "__main__":
    sys.exit(main())
