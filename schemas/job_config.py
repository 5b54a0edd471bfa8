"""The job configuration: everything a run of jobs/transcribe_archive.py depends on, validated once."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from pipeline.errors import Refusal
from pipeline.models.base import KINDS
from pipeline.models.registry import DEFAULT_MODEL
from pipeline.tasks import TASKS, TIMESTAMPS

# --prompt-format: the checkpoint kind to prompt a model as (pipeline.models.base.KINDS), or auto (what
# the checkpoint ships says). chat and plain are older spellings of instruct and base, still accepted.
PROMPT_FORMATS = ("auto", *KINDS)
OLDER_SPELLINGS = {"chat": "instruct", "plain": "base"}
EXECUTORS = ("auto", "ray", "in-process")


class JobConfigError(Refusal, ValueError):
    """An invalid job setting; the message names the option."""


@dataclass(frozen=True)
class JobConfig:
    """One run. Paths are strings so the config round-trips through JSON into the manifest.

    input: a folder of audio files, a JSONL manifest, a WebDataset ``.tar`` shard or a folder of shards.
    output: the output folder (one folder per table: results/, stats/, errors/; see pipeline/publish.py).
    reduction: ``default`` (the model/task preset), a named preset, or ``none``.
    model_actors: model actors to run; with ``gpus_per_actor > 0`` each holds that many GPUs.
    cpus_per_actor: CPUs (and torch threads) of each CPU model actor; None: the cluster's CPUs less the
    CPU stage's share, split among the actors (``workers.archive_job.actor_cpus``).
    num_cpus / num_gpus: resources of the local cluster started when no cluster is running (an
    in-process run: ``num_cpus`` caps the model's threads). executor: ``ray`` (a Ray Data dataset on a
    cluster, a local one started when none runs), ``in-process`` (both stages in the driver's process:
    one machine, one model, nothing to start; workers/in_process.py) or ``auto`` (in-process unless a
    cluster is there to join or more than one model actor is asked for).
    batch_size: rows the model decodes at once, and windows per block handed to it (None: the model's
    default, ``windows_per_block``'s blocks). max_duration_s: longer
    recordings become error rows (a policy, not a memory guard: the CPU stage streams; redone by a later
    run); None: no limit. retry_errors: redo every
    recording whose committed result is an error, not only those that failed in a way a later run may
    not (``pipeline.inputs.RETRIED_STAGES``). commit_every_s / commit_every_n: a run commits what it has
    finished as one part every that many seconds or recordings, whichever comes first (a crash loses at
    most the part in flight). progress_every_s: seconds between progress lines.
    """

    input: str
    output: str
    task: str = "asr"
    model: str = DEFAULT_MODEL
    reduction: str = "default"
    target_language: str | None = None
    question: str | None = None
    language: str | None = None  # spoken language (asr, st); None: detected per window where the model can
    prompt_format: str = "auto"  # auto: instruct if the checkpoint ships a chat template, else base
    model_actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float | None = None
    num_cpus: int | None = None
    num_gpus: int | None = None
    batch_size: int | None = None
    overlap_s: float = 3.0
    max_duration_s: float | None = None
    retry_errors: bool = False
    commit_every_s: float = 300.0
    commit_every_n: int = 1000
    progress_every_s: float = 30.0
    device: str = "auto"  # auto: cuda when the actor holds a GPU that torch can see, else cpu
    int8: bool = False  # CPU actors: the model's int8 variant (dynamic quantization), where it has one
    executor: str = "auto"
    timestamps: str | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise JobConfigError(f"--task {self.task!r} is not one of {', '.join(TASKS)}")
        for need in TASKS[self.task].needs:
            if not getattr(self, need):
                raise JobConfigError(f"--task {self.task} needs --{need.replace('_', '-')}")
        if self.model_actors < 1 or (self.batch_size is not None and self.batch_size < 1):
            raise JobConfigError("--model-actors and --batch-size must be >= 1")
        if self.gpus_per_actor < 0 or (self.cpus_per_actor is not None and self.cpus_per_actor <= 0):
            raise JobConfigError("--gpus-per-actor must be >= 0 and --cpus-per-actor > 0")
        if self.overlap_s < 0 or (self.max_duration_s is not None and self.max_duration_s <= 0):
            raise JobConfigError("--overlap-s must be >= 0 and --max-duration-s > 0")
        if self.commit_every_s <= 0 or self.commit_every_n < 1 or self.progress_every_s <= 0:
            raise JobConfigError("--commit-every-s, --progress-every-s must be > 0, --commit-every-n >= 1")
        object.__setattr__(self, "prompt_format", OLDER_SPELLINGS.get(self.prompt_format, self.prompt_format))
        if self.prompt_format not in PROMPT_FORMATS:
            raise JobConfigError(
                f"--prompt-format {self.prompt_format!r} is not one of {', '.join(PROMPT_FORMATS)}"
            )
        if self.int8 and (self.gpus_per_actor > 0 or self.device == "cuda"):
            raise JobConfigError("--int8 is for CPU model actors (no --gpus-per-actor, no --device cuda)")
        if self.device not in ("auto", "cpu", "cuda"):
            raise JobConfigError(f"--device {self.device!r} is not one of auto, cpu, cuda")
        if self.executor not in EXECUTORS:
            raise JobConfigError(f"--executor {self.executor!r} is not one of {', '.join(EXECUTORS)}")
        if self.timestamps is not None and self.timestamps not in TIMESTAMPS:
            raise JobConfigError(f"--timestamps {self.timestamps!r} is not one of {', '.join(TIMESTAMPS)}")
        if self.executor == "in-process" and self.model_actors > 1:
            raise JobConfigError("--executor in-process runs one model; --model-actors > 1 needs Ray")

    @property
    def model_kind(self) -> str | None:
        """The checkpoint kind ``prompt_format`` asks for (None: what the checkpoint ships says)."""
        return None if self.prompt_format == "auto" else self.prompt_format

    @property
    def windows_per_block(self) -> int:
        """Windows handed to the model stage together (a Ray batch; a block an in-process run submits):
        ``batch_size``, or by default 64 on GPU actors and 16 on CPU actors. The model streams, so a
        few blocks in flight keep its rows full whatever their size."""
        if self.batch_size is not None:
            return self.batch_size
        return 64 if self.gpus_per_actor > 0 else 16

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> JobConfig:
        return cls(**json.loads(text))
