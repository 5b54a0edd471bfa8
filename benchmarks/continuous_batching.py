"""Continuous batching against static batches on a mixed CPU archive: short clips and long recordings.

    pip install -c constraints.txt -e ".[bench]"
    python benchmarks/continuous_batching.py --model whisper-tiny.en --threads 2 \
        --baseline-tree <worktree of the commit before> --out benchmarks/continuous-batching-tiny-en

The archive: every utterance of ../shared/data/librispeech-dev as a file of its own and the long-form
dev recordings (``--manifest``, ``--longform``).

- Decoder: the same windows (each utterance; each long recording cut into 30 s windows) through the
  same adapter, in today's static batches (``run`` calls of ``--batch-size`` windows, as many as its rows: a
  batch's rows leave as they finish, its slots wait for its last row) and continuously (one ``stream``,
  every slot refilled at the step it frees). Reports decoder steps, occupancy (rows decoding / slots,
  per step; also only the steps while windows waited), the model's wall time and how many windows'
  transcripts differ. Interleaved repeats.
- End to end: the archive job (in-process, the default executor on one machine) on the whole archive,
  this tree against ``--baseline-tree`` (static batches), fresh processes, interleaved repeats: wall
  time, WER, files whose transcript differs.
Writes results.json and README.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import torch

from benchmarks.cpu_peer import OURS, manifest_references, references, run_ours
from pipeline import metrics
from pipeline.audio.decode import decode_audio
from pipeline.models.registry import load_model
from pipeline.presets import resolve_reduction
from pipeline.tasks import TaskRequest

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
WINDOW = 30 * 16000


def windows(files: list[Path]) -> list:
    """Each file's audio in 30 s windows (a short clip is one)."""
    out = []
    for f in files:
        samples = decode_audio(f).samples
        out += [samples[i : i + WINDOW] for i in range(0, len(samples), WINDOW)]
    return out


def decoder_run(model, waves: list, continuous: bool, batch: int) -> dict:
    """The windows through the model in static calls or one stream -> time, counters, texts."""
    request = TaskRequest("asr")
    reduction = resolve_reduction(model.description, "asr")
    before = model.counters
    start = time.perf_counter()
    if continuous:
        outputs: dict = {}
        items = list(enumerate(waves))
        model.stream(lambda _b: [items.pop(0) for _ in range(min(batch, len(items)))] or None, request,
                     reduction, outputs.__setitem__)  # fmt: skip
        texts = [outputs[i].text for i in range(len(waves))]
    else:
        texts = [
            o.text
            for i in range(0, len(waves), batch)
            for o in model.run(waves[i : i + batch], request, reduction)
        ]
    wall = time.perf_counter() - start
    c = model.counters
    steps, rows = c.steps - before.steps, c.rows - before.rows
    queued = c.queued_steps - before.queued_steps, c.queued_rows - before.queued_rows
    return {
        "wall_s": wall,
        "steps": steps,
        "occupancy": rows / (steps * model.batch_size),
        "occupancy_while_queued": queued[1] / (queued[0] * model.batch_size) if queued[0] else None,
        "texts": texts,
    }


def end_to_end(args: argparse.Namespace, refs: dict, files: list[Path]) -> dict:
    """The archive job from this tree and from the baseline tree, interleaved, fresh processes."""
    systems = {"this tree": ROOT, "baseline": args.baseline_tree}
    label = f"archive job, {args.model}"
    OURS.setdefault(label, ["--model", args.model, "--reduction", "default"])
    end: dict[str, list] = {name: [] for name in systems}
    for _ in range(args.repeats):
        for name, tree in systems.items():
            wall, _, texts = run_ours(label, files, args.threads, tree)
            end[name].append((wall, texts))
            print(name, f"{wall:.1f} s", flush=True)
    result: dict = {}
    for name, runs in end.items():
        texts = runs[0][1]
        result[name] = {
            "wall_s": statistics.median(w for w, _ in runs),
            "walls": [w for w, _ in runs],
            "wer": 100 * metrics.wer([refs[f] for f in files], [texts[f] for f in files]),
        }
    ours, base = end["this tree"][0][1], end["baseline"][0][1]
    result["differing_files"] = [f.name for f in files if ours[f] != base[f]]
    commit = ["git", "rev-parse", "--short", "HEAD"]
    result["baseline_commit"] = subprocess.run(
        commit, cwd=args.baseline_tree, capture_output=True, text=True
    ).stdout.strip()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="whisper-tiny.en")
    parser.add_argument("--manifest", type=Path, default=DATA / "librispeech-dev" / "manifest.jsonl")
    parser.add_argument("--longform", type=Path, default=DATA / "longform-dev")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--baseline-tree", type=Path, help="a checkout with static batches (end to end; none: skipped)"
    )
    parser.add_argument("--skip-decoder", action="store_true")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    refs = manifest_references(args.manifest) | references(args.longform)
    files = list(refs)
    result: dict = {
        "model": args.model,
        "files": len(files),
        "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
    }

    if not args.skip_decoder:
        model = load_model(args.model, device="cpu")
        waves = windows(files)
        model.run(waves[:2], TaskRequest("asr"), resolve_reduction(model.description, "asr"))  # warm-up
        runs: dict[str, list[dict]] = {"static": [], "continuous": []}
        for _ in range(args.repeats):
            for mode in runs:
                runs[mode].append(decoder_run(model, waves, mode == "continuous", args.batch_size))
                print(mode, {k: v for k, v in runs[mode][-1].items() if k != "texts"}, flush=True)
        static, cont = runs["static"][0]["texts"], runs["continuous"][0]["texts"]
        result["decoder"] = {
            "windows": len(waves),
            **{
                mode: {
                    k: statistics.median(r[k] for r in rs) if k == "wall_s" else rs[0][k]
                    for k in rs[0]
                    if k != "texts"
                }
                for mode, rs in runs.items()
            },
            "differing_windows": [i for i, (a, b) in enumerate(zip(static, cont, strict=True)) if a != b],
        }

    if args.baseline_tree:
        result["end_to_end"] = end_to_end(args, refs, files)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
