r"""Long-form accuracy of the archive pipeline: stitched WER against the same model on the reference's
utterance boundaries, with and without token reduction, plus the real-time factor.

    python jobs/evaluate_longform.py --input ../shared/data/longform-dev --output out/longform \
        --reductions none default --report benchmarks/longform-dev-whisper-tiny-en

Each audio file under --input with a ``<name>.json`` reference beside it (full ``text`` plus
``segments`` with ``start_s``/``end_s``) is scored twice per reduction: (1) the pipeline's stitched
transcript (jobs/transcribe_archive.py's code path: VAD windows, model actors, stitching), and (2) the
same model run on the reference's utterances, each cut exactly at its boundaries and the outputs
concatenated. Seams that duplicate or drop words show up as the gap between the two. Both parts log
their progress; a rerun resumes the pipeline part from its committed output folders.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout or a job working_dir

from jobs.common import JobParser, input_path, output_folder, run_job
from pipeline import metrics
from pipeline.audio.decode import decode_audio
from pipeline.inputs import PlanError
from pipeline.models.registry import DEFAULT_MODEL, load_model
from pipeline.presets import resolve_reduction
from pipeline.publish import read_committed
from pipeline.tasks import TaskRequest
from schemas.job_config import JobConfig
from workers.archive_job import run_archive


def references(root: Path) -> dict[str, tuple[Path, dict]]:
    """Audio stem -> (audio path, reference JSON) for every audio file with a JSON beside it."""
    found = {}
    for ref in sorted(root.rglob("*.json")):
        audio = [p for p in ref.parent.glob(ref.stem + ".*") if p.suffix != ".json"]
        if len(audio) == 1:
            found[ref.stem] = (audio[0], json.loads(ref.read_text()))
    if not found:
        raise PlanError(f"no audio file with a <name>.json reference under {root}")
    return found


def utterance_transcript(model, audio_path: Path, segments: list[dict], reduction, batch: int) -> str:
    """The model on every reference utterance cut at its boundaries, outputs joined in order."""
    audio = decode_audio(audio_path, sample_rate=model.description.sample_rate)
    rate = audio.sample_rate
    clips = [audio.samples[round(s["start_s"] * rate) : round(s["end_s"] * rate)] for s in segments]
    texts = []
    with tqdm(total=len(clips), desc=f"{audio_path.name} at utterance cuts", unit="utt") as bar:
        for i in range(0, len(clips), batch):
            texts += [out.text for out in model.run(clips[i : i + batch], TaskRequest("asr"), reduction)]
            bar.update(len(clips[i : i + batch]))
    return " ".join(texts)


def evaluate(args: argparse.Namespace) -> list[dict]:
    refs = references(args.input)
    model = load_model(args.model, batch_size=args.batch_size)
    rows = []
    for name in args.reductions:
        out = args.output / name
        t0 = time.perf_counter()
        summary = run_archive(
            JobConfig(input=str(args.input), output=str(out), model=args.model, reduction=name)
        )
        wall = time.perf_counter() - t0
        print(summary.line(), flush=True)
        results = {Path(r["source_path"]).stem: r for r in read_committed(out, "results").to_pylist()}
        stats = {r["recording_id"]: r for r in read_committed(out, "stats").to_pylist()}
        reduction = resolve_reduction(model.description, "asr", name)
        for stem, (audio_path, ref) in refs.items():
            stitched = results[stem]
            cut = utterance_transcript(model, audio_path, ref["segments"], reduction, args.batch_size)
            stat = stats[stitched["recording_id"]]
            rows.append(
                {
                    "recording": stem,
                    "reduction": name,
                    "audio_s": stat["audio_seconds"],
                    "windows": stat["windows"],
                    "wer_stitched": 100 * metrics.wer([ref["text"]], [stitched["text"]]),
                    "wer_utterances": 100 * metrics.wer([ref["text"]], [cut]),
                    "rtf": stat["real_time_factor"],
                    "run_wall_s": wall,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows: list[dict], command: str) -> str:
    lines = [
        "| recording | reduction | audio s | windows | WER stitched % | WER at utterance cuts % | gap | RTF |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gap = r["wer_stitched"] - r["wer_utterances"]
        lines.append(
            f"| {r['recording']} | {r['reduction']} | {r['audio_s']:.0f} | {r['windows']} | "
            f"{r['wer_stitched']:.2f} | {r['wer_utterances']:.2f} | {gap:+.2f} | {r['rtf']:.3f} |"
        )
    return "\n".join(lines) + f"\n\nCommand: `{command}`\n"


def _run(argv: list[str] | None) -> None:
    parser = JobParser(__doc__)
    parser.add_argument(
        "--input",
        type=input_path,
        required=True,
        help="folder of long recordings, each with a <name>.json reference (text, segments) beside it",
    )
    parser.add_argument(
        "--output",
        type=output_folder,
        required=True,
        help="pipeline output folders, one per reduction (a rerun resumes them)",
    )
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help="a packaged model, checkpoint folder or hub id"
    )
    parser.add_argument(
        "--reductions",
        nargs="+",
        default=["none", "default"],
        help="the pipeline's --reduction values compared: default, a preset name, none",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="rows the model decodes at once, and utterance cuts per model call",
    )
    parser.add_argument(
        "--report", type=output_folder, help="folder for results.json and results.md (default: printed only)"
    )
    args = parser.parse_args(argv)
    rows = evaluate(args)
    table = markdown(rows, "python jobs/evaluate_longform.py " + " ".join(argv or sys.argv[1:]))
    print(table)
    if args.report:
        args.report.mkdir(parents=True, exist_ok=True)
        (args.report / "results.json").write_text(json.dumps(rows, indent=1))
        (args.report / "results.md").write_text(table)


def main(argv: list[str] | None = None) -> int:
    return run_job(
        _run,
        argv,
        interrupted="stopped; the pipeline parts committed under --output stay and a rerun of the same "
        "command resumes them (the utterance-cut transcripts are made again)",
    )


if __name__ == "__main__":
    sys.exit(main())
