"""Transcribe / translate / label an archive of recordings into Parquet. See docs/pipeline.md.

    python jobs/transcribe_archive.py --input PATH --output DIR [--task asr|st|er|sqa] [--model NAME]
        [--reduction default|PRESET|none] [--target-language de] [--model-actors N] [--gpus-per-actor 1]

Run plainly with one model actor it runs in-process (no Ray cluster to start); with more actors it
starts a local Ray cluster; under ``ray job submit`` it joins that cluster (give --output as an absolute
path there: a relative one would land in Ray's temporary copy of the working directory).
Exit status: 0 done (failed recordings are rows of the errors table; an input without recordings is a
notice), 2 refused (bad options, model cannot do the task, output folder locked or not writable), 1
failed (writing the output failed: the parts committed before it stay), 130 stopped by Ctrl-C (the
parts committed before stay; rerunning the same command resumes after them).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout or a job working_dir

from jobs.common import JobParser, input_path, output_folder, run_job
from pipeline.models.registry import DEFAULT_MODEL
from pipeline.tasks import TASKS, TIMESTAMPS
from schemas.job_config import EXECUTORS, OLDER_SPELLINGS, PROMPT_FORMATS, JobConfig
from workers.archive_job import run_archive


def parse_args(argv: list[str] | None = None) -> JobConfig:
    p = JobParser(__doc__)
    p.add_argument(
        "--input",
        required=True,
        type=input_path,
        help="audio folder (searched recursively), JSONL manifest, .tar shard or folder of shards",
    )
    p.add_argument(
        "--output",
        required=True,
        type=output_folder,
        help="output folder (one folder per table: results/, stats/, errors/); a rerun into it resumes",
    )
    p.add_argument(
        "--task",
        default="asr",
        choices=TASKS,
        help="asr transcribe, st translate (--target-language), er emotion label, sqa answer (--question), "
        "lid spoken language",
    )
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="a packaged model (whisper-tiny.en, whisper-base), a local checkpoint folder or a hub id",
    )
    p.add_argument(
        "--reduction", default="default", help="default, a preset name of pipeline/presets.py, or none"
    )
    p.add_argument("--target-language", help="st: language to translate into")
    p.add_argument("--question", help="sqa: the question asked of every recording")
    p.add_argument("--language", help="asr, st: the spoken language (default: detected per window)")
    p.add_argument(
        "--prompt-format",
        default="auto",
        choices=(*PROMPT_FORMATS, *OLDER_SPELLINGS),
        help="the checkpoint kind to prompt the model as: instruct (its chat template), base (its family's "
        "plain prompts) or auto (instruct where it ships a chat template); chat and plain: older spellings",
    )
    p.add_argument("--model-actors", type=int, default=1, help="model actors (one per GPU on a GPU cluster)")
    p.add_argument("--gpus-per-actor", type=float, default=0.0, help="0: model actors run on CPU")
    p.add_argument(
        "--cpus-per-actor",
        type=float,
        help="CPU model actors: CPUs (= torch threads) each (default: the cluster's CPUs less 0.5 per node "
        "for decoding audio, split among the actors)",
    )
    p.add_argument(
        "--executor",
        default="auto",
        choices=EXECUTORS,
        help="ray: a Ray Data dataset on a cluster (a local one if none runs); in-process: one machine, "
        "one model, nothing to start; auto: in-process unless RAY_ADDRESS names a cluster or "
        "--model-actors > 1",
    )
    p.add_argument(
        "--num-cpus", type=int, help="local cluster: CPUs to give Ray; in-process: the model's threads"
    )
    p.add_argument("--num-gpus", type=int, help="local cluster only: GPUs to give Ray")
    p.add_argument(
        "--batch-size",
        type=int,
        help="rows the model decodes at once, and windows handed to it per block (default: the model's; "
        "Whisper 16 on CPU, what GPU memory holds on a GPU)",
    )
    p.add_argument(
        "--overlap-s", type=float, default=3.0, help="seconds two neighbouring windows share, stitched away"
    )
    p.add_argument(
        "--max-duration-s",
        type=float,
        help="recordings longer than this become error rows, stage limit (default: no limit; memory does "
        "not grow with a recording's length)",
    )
    p.add_argument(
        "--retry-errors",
        action="store_true",
        help="redo every recording whose committed result is an error (by default only I/O, model, "
        "duration-limit and listing errors are redone)",
    )
    p.add_argument(
        "--commit-every-s", type=float, default=300.0, help="commit finished recordings at least this often"
    )
    p.add_argument(
        "--commit-every-n", type=int, default=1000, help="... and at least every this many recordings"
    )
    p.add_argument("--progress-every-s", type=float, default=30.0, help="seconds between progress lines")
    p.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="where the model runs; auto: cuda when the model actor holds a GPU torch can see, else cpu",
    )
    p.add_argument(
        "--int8",
        action="store_true",
        help="CPU actors, Whisper: int8 decoder (dynamic quantization; see docs/pipeline.md for its accuracy)",
    )
    p.add_argument(
        "--timestamps",
        choices=TIMESTAMPS,
        default=None,
        help="asr/st: words (word and sentence times), segments (sentence times; window spans for models "
        "without word times) or none (window spans); default: words where the model gives them, else segments",
    )
    args = p.parse_args(argv)
    return JobConfig(**(vars(args) | {"input": str(args.input), "output": str(args.output)}))


def _run(argv: list[str] | None) -> int:
    print(run_archive(parse_args(argv)).line(), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job(
        _run,
        argv,
        interrupted="stopped before this run committed anything; the parts committed before stay, and "
        "rerunning the same command resumes after them",
    )


if __name__ == "__main__":
    sys.exit(main())
