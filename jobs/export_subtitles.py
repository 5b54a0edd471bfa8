r"""Subtitles (SRT, WebVTT or JSON cues) for every recording of a run's committed view.

    python jobs/export_subtitles.py --output out/meetings --format srt
    python jobs/export_subtitles.py --output out/meetings --format vtt \
        --to /srv/captions

``--output`` is the archive job's output folder; one file per recording with text is written under
``--to`` (default ``<output>/subtitles``) at ``<recording id>.<format>``, the id's folders kept. Cues
follow ``pipeline.subtitles``: from the words where the run kept them (``--timestamps words``), else
from the segments (sentences with word-aligned times, or windows' spans: coarse).
"""

from __future__ import annotations

import sys
from pathlib import Path, PurePosixPath

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout or a job working_dir

from jobs.common import JobParser, input_path, output_folder, run_job
from pipeline.publish import read_committed
from pipeline.subtitles import FORMATS, cues, render, segment_words
from pipeline.timing import Word


def subtitle_path(folder: Path, recording_id: str, fmt: str) -> Path:
    """Where a recording's file goes: its id's folders under ``folder``, never outside it."""
    parts = [p for p in PurePosixPath(recording_id.replace("\\", "/")).parts if p not in ("", ".", "..", "/")]
    return folder.joinpath(*parts).with_name(f"{parts[-1]}.{fmt}")


def export(output: Path, fmt: str, folder: Path) -> list[Path]:
    """Write one file per committed result with text; returns their paths."""
    written = []
    for row in read_committed(output, "results").to_pylist():
        if row["status"] != "ok" or not row["text"]:
            continue
        words = (
            [Word(**w) for w in row["words"]] if row.get("words") else segment_words(row["segments"] or [])
        )
        path = subtitle_path(folder, row["recording_id"], fmt)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render(cues(words), fmt, row["recording_id"]), encoding="utf-8")
        written.append(path)
    return written


def _run(argv: list[str] | None) -> None:
    parser = JobParser(__doc__)
    parser.add_argument("--output", required=True, type=input_path, help="the archive job's output folder")
    parser.add_argument("--format", choices=FORMATS, default="srt", help="srt, WebVTT (vtt) or JSON cues")
    parser.add_argument("--to", type=output_folder, help="where the files go (default: OUTPUT/subtitles)")
    args = parser.parse_args(argv)
    if not (args.output / "results").exists() and not (args.output / "runs").exists():
        parser.error(f"{args.output} holds no run's output (no results/ folder)")
    folder = args.to or args.output / "subtitles"
    print(f"{len(export(args.output, args.format, folder))} {args.format} files in {folder}")


def main(argv: list[str] | None = None) -> int:
    return run_job(_run, argv, interrupted="stopped; the files written so far stay, run the command again")


if __name__ == "__main__":
    sys.exit(main())
