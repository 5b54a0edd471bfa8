"""Transcribe / translate / label an archive of recordings into Parquet. See docs/pipeline.md.

    python jobs/transcribe_archive.py --input PATH --output DIR [--task asr|st|er|sqa] [--model NAME]
        [--reduction default|PRESET|none] [--target-language de] [--model-actors N] [--gpus-per-actor 1]

Run plainly with one model actor it runs in-process (no Ray cluster to start); with more actors it
starts a local Ray cluster; under ``ray job submit`` it joins that cluster.
Exit status: 0 done (failed recordings are rows of the errors table), 2 refused (bad options, model
cannot do the task, output folder locked or not writable), 1 failed (writing the output failed: the
parts committed before it stay).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout or a job working_dir

from pipeline.inputs import PlanError
from pipeline.merging.config import ReductionConfigError
from pipeline.models.base import ModelError
from pipeline.models.registry import DEFAULT_MODEL
from pipeline.presets import PresetError
from pipeline.publish import OutputLockedError, PublishError
from pipeline.tasks import TASKS, TIMESTAMPS, TaskError
from schemas.job_config import EXECUTORS, JobConfig, JobConfigError
from schemas.manifest import ManifestError
from workers.archive_job import ModelTaskError, run_archive

REFUSALS = (
    JobConfigError,
    ModelError,
    ModelTaskError,
    TaskError,
    PresetError,
    ReductionConfigError,
    PlanError,
    OutputLockedError,
    ManifestError,  # an output folder of the single-commit layout
)


def parse_args(argv: list[str] | None = None) -> JobConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--input", required=True, help="audio folder, JSONL manifest, .tar shard or folder of shards"
    )
    p.add_argument("--output", required=True, help="output folder (results/, stats/, errors/ tables)")
    p.add_argument("--task", default="asr", choices=TASKS)
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
        choices=("auto", "chat", "plain"),
        help="auto: the checkpoint's chat template where it ships one, else its plain prompts",
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
        "--batch-size", type=int, help="windows per model call (default: 64 on GPU actors, 16 on CPU actors)"
    )
    p.add_argument("--overlap-s", type=float, default=3.0)
    p.add_argument(
        "--max-duration-s", type=float, default=4 * 3600.0, help="longer recordings become errors rows"
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
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
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
    return JobConfig(**{k: v for k, v in vars(args).items()})


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        summary = run_archive(parse_args(argv))
    except REFUSALS as err:
        print(f"refused: {err}", file=sys.stderr)
        return 2
    except PublishError as err:  # a full disk, say: the message names the folder and the cause
        print(f"failed: {err}", file=sys.stderr)
        return 1
    print(summary.line(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
