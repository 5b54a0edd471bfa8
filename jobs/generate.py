"""One audio file + prompt through a decoder-only SpeechLM with a chosen token reduction; prints text,
audio tokens per layer, KV bytes and timings.

    python jobs/generate.py examples/intro.wav --model tiny-random-qwen2-audio --method fastadasp --target 0.3
    python jobs/generate.py talk.mp3 --model /models/Qwen2-Audio-7B-Instruct --device cuda --task st \
        --target-language de --method fastadasp --schedule decay --first-layer 9 --target 0.3
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline import tasks
from pipeline.audio.decode import decode_audio
from pipeline.cli import add_reduction_args, reduction_from_args
from pipeline.models.registry import load_model
from pipeline.models.speechlm import AudioLanguageModel
from pipeline.tasks import TaskRequest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("audio", type=Path)
    parser.add_argument(
        "--model",
        default="Qwen/Qwen2-Audio-7B-Instruct",
        help="local checkpoint folder, hub id, or tiny-random-qwen2-audio (random weights, offline)",
    )
    parser.add_argument("--task", choices=tasks.TASKS, default="asr")
    parser.add_argument("--target-language", help="st: language to translate into")
    parser.add_argument("--question", help="sqa: the question about the audio")
    parser.add_argument(
        "--prompt", help="raw prompt text with the model's audio placeholder once (overrides --task)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    add_reduction_args(parser)
    args = parser.parse_args(argv)

    reduction = reduction_from_args(args)
    model = load_model(args.model, args.device)
    if not isinstance(model, AudioLanguageModel):
        parser.error(f"{args.model} is not a decoder-only SpeechLM; use jobs/transcribe_archive.py")
    model.max_new_tokens = args.max_new_tokens
    info = model.description
    audio = decode_audio(args.audio, sample_rate=info.sample_rate, max_duration_s=info.max_window_s)
    request = TaskRequest(args.task, target_language=args.target_language, question=args.question)
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


if __name__ == "__main__":
    main()
