"""The archive run, end to end: plan, cut windows and run the model (one Ray Data dataset, or both
stages in this process: workers/in_process.py), stitch on the driver as recordings complete, commit
in parts.

jobs/transcribe_archive.py parses arguments into a JobConfig and calls ``run_archive``; everything
with logic lives here and in pipeline/ so that it is tested without the command line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import secrets
import time
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.inputs import (
    AUDIO_EXTENSIONS,
    PIPELINE_VERSION,
    SeenSources,
    check_input,
    fingerprint,
    list_input,
    pending,
)
from pipeline.merging.config import ReductionConfig
from pipeline.models.base import ModelDescription, check_request
from pipeline.models.registry import describe_model
from pipeline.presets import PRESETS_VERSION, resolve_reduction
from pipeline.publish import (
    InFlight,
    OutputLock,
    RunWriter,
    committed_manifests,
    crashed,
    new_run_id,
    remove_abandoned,
    upgrade_layout,
)
from pipeline.tasks import TaskRequest
from schemas.job_config import OLDER_SPELLINGS, JobConfig, JobConfigError
from schemas.manifest import RunManifest
from workers import in_process
from workers.model_stage import connected_ray
from workers.progress import ProgressLog, Tally
from workers.stitch_stage import RecordingAssembler, crash_records

log = logging.getLogger(__name__)


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run, after its part in flight was removed; the message says what stays committed
    and how to resume (jobs/common.py ``run_job`` prints it)."""

    def __init__(self, run_id: str, parts: int, recordings: int, output: Path) -> None:
        super().__init__(
            f"run {run_id} stopped with {parts} part(s), {recordings} recording(s), committed to "
            f"{output.resolve()}; rerun the same command to resume after them"
        )


def skipped_files(by_extension: dict[str, int]) -> str:
    """``3 files not audio (.txt 2, .pdf 1)``: what a folder input held that is not audio by its name."""
    counts = ", ".join(
        f"{ext} {n}" for ext, n in sorted(by_extension.items(), key=lambda kv: (-kv[1], kv[0]))
    )
    return f"{sum(by_extension.values())} files not audio ({counts})"


@dataclass(frozen=True)
class RunSummary:
    run_id: str | None  # None: nothing to do, nothing committed
    planned: int
    skipped: int
    ok: int
    empty: int
    failed: int
    audio_seconds: float
    model_seconds: float
    wall_seconds: float
    output: str = ""  # the output folder's absolute path
    not_audio: dict[str, int] = field(default_factory=dict)  # files of the input skipped, by extension

    def line(self) -> str:
        """The final progress line: counts, audio hours, real-time factors (model and wall clock), files
        skipped as not audio, and where the output is."""
        audio = self.audio_seconds
        rtf = f"{self.model_seconds / audio:.3f}" if audio else "n/a"
        wall_rtf = f"{self.wall_seconds / audio:.3f}" if audio else "n/a"
        not_audio = f"; skipped {skipped_files(self.not_audio)}" if self.not_audio else ""
        return (
            f"run {self.run_id or '-'}: recordings ok {self.ok}, empty {self.empty}, failed {self.failed}, "
            f"skipped (done before) {self.skipped}{not_audio}; audio {audio / 3600:.3f} h; "
            f"RTF model {rtf}, wall {wall_rtf}; {self.wall_seconds:.1f} s; output {self.output}"
        )


def _request(config: JobConfig) -> dict:
    request = {"task": config.task, "target_language": config.target_language, "question": config.question}
    request |= {"timestamps": config.timestamps} if config.timestamps not in (None, "none") else {}
    return request | ({"language": config.language} if config.language else {})


def _fingerprinted(request: dict) -> dict:
    """The request as the run's fingerprint sees it: a language only when given (older runs never set
    one); never the timestamps, which change no text (tests/test_models_whisper_timing.py), so that a
    folder resumes whatever the mode (recordings committed without word times keep none)."""
    return {k: v for k, v in request.items() if k != "timestamps"}


def _versions(use_ray: bool) -> dict:
    """Package versions from their metadata: the driver need not import transformers to name it."""
    return {
        "python": platform.python_version(),
        **({"ray": metadata.version("ray")} if use_ray else {}),
        "pyarrow": pa.__version__,
        "torch": metadata.version("torch"),
        "transformers": metadata.version("transformers"),
    }


def _window_kwargs(config: JobConfig, info: ModelDescription) -> dict:
    """The CPU stage's settings (``workers.cpu_stage.recording_windows``)."""
    return {
        "sample_rate": info.sample_rate,
        "max_window_s": info.max_window_s,
        "overlap_s": config.overlap_s,
        "max_duration_s": config.max_duration_s,
    }


def _predictor_kwargs(config: JobConfig, reduction: ReductionConfig) -> dict:
    """The model stage's settings (``WindowPredictor``) common to both executors."""
    return {
        "model_name": config.model,
        "request": _request(config),
        "reduction": reduction.to_dict(),
        "device": config.device,
        "kind": config.model_kind,
        "int8": config.int8,
        "batch_size": config.batch_size,
    }


def uses_ray(config: JobConfig) -> bool:
    """``--executor auto``: Ray when there is a cluster to join (a submitted job, a program already
    connected) or more than one model actor to run; else in-process, where nothing has to start."""
    if config.executor != "auto":
        return config.executor == "ray"
    connected = connected_ray() is not None
    return bool(os.environ.get("RAY_ADDRESS")) or connected or config.model_actors > 1


def check_model(config: JobConfig) -> ModelDescription:
    """Describe the model from its config files (no weights) and refuse a request or window overlap it
    cannot do (``pipeline.models.base.check_request``), before any input is read."""
    info = describe_model(config.model, config.model_kind)
    check_request(info, TaskRequest(**_request(config)), "int8" if config.int8 else None)
    if config.overlap_s >= info.max_window_s / 2:  # half a window: each window still adds new audio
        raise JobConfigError(
            f"--overlap-s {config.overlap_s} must be below half of {config.model!r}'s "
            f"{info.max_window_s} s window"
        )
    return info


def _check_writable(output: Path) -> None:
    """Write and remove a small file in the output folder and in the folders a run writes into."""
    for folder in (output, output / "_staging", output / "_tables", output / "_parts"):
        if folder != output and not folder.is_dir():
            continue
        probe = folder / f".probe-{secrets.token_hex(4)}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"\0" * 4096)
        except OSError as e:
            raise JobConfigError(f"--output {folder}: cannot write there ({e.strerror or e})") from e
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()


def check_paths(config: JobConfig) -> None:
    """Refuse an input that does not exist, an output that is a file or that cannot be written, before
    anything starts."""
    check_input(config.input)
    if Path(config.output).exists() and not Path(config.output).is_dir():
        raise JobConfigError(f"--output {config.output} is a file; give a folder")
    _check_writable(Path(config.output))


def _seconds(records: pa.Table) -> tuple[float, float]:
    """Audio seconds and model seconds of the recordings that did not fail."""
    ok = records.filter(pc.not_equal(records["status"], "error"))
    model_s = sum((pc.sum(ok[c]).as_py() or 0.0) for c in ("encode_s", "prefill_s", "decode_s"))
    return pc.sum(ok["audio_seconds"]).as_py() or 0.0, model_s


def _stage_peaks(peaks: dict[str, int], batch: pa.Table) -> dict[str, int]:
    """The stages' peak resident memory so far, with that of the processes behind ``batch``."""
    seen = {
        "cpu_stage": pc.max(batch["cut_rss_bytes"]).as_py(),
        "model_stage": pc.max(batch["model_rss_bytes"]).as_py(),
    }
    return {k: max(v or 0, peaks.get(k, 0)) for k, v in seen.items()}


def run_archive(config: JobConfig) -> RunSummary:
    """Plan, process and publish one run into ``config.output``; see pipeline/publish.py for the layout."""
    started = time.monotonic()
    info = check_model(config)  # what the model cannot do is refused before any preset check
    if config.timestamps is None:  # the default: word times where the model gives them
        config = replace(config, timestamps="words" if info.word_times else "segments")
    reduction = resolve_reduction(info, config.task, config.reduction)
    check_paths(config)
    output, run_id = Path(config.output), new_run_id()
    with OutputLock(output, run_id):
        windowing = {"overlap_s": config.overlap_s, "max_window_s": info.max_window_s}
        # A forced kind changes every output; "auto" keeps older runs' fingerprints, and a forced one is
        # fingerprinted in its older spelling (chat, plain) so that runs from before the rename resume.
        older = {kind: spelling for spelling, kind in OLDER_SPELLINGS.items()}
        prompts = {"prompt_format": older[config.model_kind]} if config.model_kind else {}
        prompts |= {"int8": True} if config.int8 else {}  # changes outputs; absent keeps old fingerprints
        run_fp = fingerprint(
            config.model,
            config.task,
            _fingerprinted(_request(config)) | prompts,
            windowing,
            reduction.to_dict(),
            PIPELINE_VERSION,
        )
        if upgrade_layout(output):
            log.info("upgraded %s to table folders (results/, stats/, errors/)", output)
        for path in remove_abandoned(output):
            log.info("removed %s, left by an interrupted run", path)
        manifests = committed_manifests(output)
        seen = SeenSources(e for m in manifests for e in m.recordings)
        listing = list_input(config.input, seen)
        todo, skipped = pending(listing.recordings, manifests, run_fp, config.retry_errors)
        not_audio = f", skipped {skipped_files(listing.not_audio)}" if listing.not_audio else ""
        log.info("plan: %d recordings to process, %d done before%s", len(todo), len(skipped), not_audio)
        if not listing.recordings:  # an empty nightly folder is normal: a notice, not a failure
            log.warning(
                "notice: no recordings in %s (audio files end in %s)",
                config.input,
                " ".join(sorted(AUDIO_EXTENSIONS)),
            )
        where = {"output": str(output.resolve()), "not_audio": listing.not_audio}
        if not todo:  # a rerun with nothing new starts nothing: no Ray, no model load
            return RunSummary(None, 0, len(skipped), 0, 0, 0, 0.0, 0.0, time.monotonic() - started, **where)
        # Recordings in flight when two runs died are set aside as error rows; the rest goes on.
        crashes = {
            rid: f"in flight when runs {', '.join(runs)} died (killed, out of memory or a native crash); "
            "set aside so that the rest of the archive gets done"
            for rid, runs in crashed(output, manifests).items()
        }
        work = [r for r in todo if r.recording_id not in crashes]
        inflight = InFlight(output, run_id)
        use_ray = uses_ray(config)
        window_kwargs, predictor_kwargs = _window_kwargs(config, info), _predictor_kwargs(config, reduction)
        if not work:
            windows, progress = iter(()), Tally().counts
        elif use_ray:
            from workers import ray_run  # imported for Ray runs only: in-process runs need no Ray

            windows, progress = ray_run.window_texts(work, config, window_kwargs, predictor_kwargs)
        else:
            windows, progress = in_process.window_texts(
                work, config, window_kwargs, predictor_kwargs, started=inflight.start
            )
        log.info(
            "start-up: plan and %s ready after %.1f s",
            "Ray" if use_ray else "the in-process run",
            time.monotonic() - started,
        )
        run_fields = {
            "task": config.task,
            "model": config.model,
            "reduction": json.dumps(reduction.to_dict(), sort_keys=True),
            "pipeline_version": PIPELINE_VERSION,
            "run_id": run_id,
        }
        template = RunManifest(  # each part's manifest: this plus its part number, files and recordings
            run_id=run_id,
            fingerprint=run_fp,
            pipeline_version=PIPELINE_VERSION,
            presets_version=PRESETS_VERSION,
            created_at="",
            config=json.loads(config.to_json()),
            reduction=reduction.to_dict(),
            versions=_versions(use_ray),
            files={},
            counts={},
            recordings=[],
        )
        assembler = RecordingAssembler(config.task, run_fields, config.timestamps)
        audio_s = model_s = 0.0
        writer = RunWriter(output, template, todo, config.commit_every_n, config.commit_every_s)
        try:
            with (
                writer,
                inflight,
                ProgressLog(progress, len(work), config.progress_every_s),
                contextlib.closing(windows),
            ):
                writer.add(crash_records([r for r in todo if r.recording_id in crashes], crashes, run_fields))
                for batch in windows:
                    if use_ray:  # the stages run in processes of their own there
                        writer.stage_peaks = _stage_peaks(writer.stage_peaks, batch)
                    records = assembler.add(batch)
                    inflight.finish(records["recording_id"].to_pylist())
                    writer.add(records)
                    audio, model = _seconds(records)
                    audio_s, model_s = audio_s + audio, model_s + model
                writer.add(assembler.flush())
                if work and use_ray and (lost := writer.missing()):  # killed its worker every try
                    tries = 2 * (ray_run.CPU_STAGE_RETRIES + 1)
                    why = f"its CPU-stage worker died on each of {tries} tries (a native crash or out of memory)"
                    writer.add(
                        crash_records(lost, dict.fromkeys((r.recording_id for r in lost), why), run_fields)
                    )
                counts = writer.finish()
        except KeyboardInterrupt as err:  # the part in flight is gone; the committed parts are the answer
            # read from the folder: Ctrl-C may land between a part's switch and the writer's record of it
            mine = [m for m in committed_manifests(output) if m.run_id == run_id]
            kept = sum(len(m.recordings) for m in mine)
            raise RunInterrupted(run_id, len(mine), kept, output) from err
        log.info("committed %d parts of run %s", len(writer.committed), run_id)
    return RunSummary(
        run_id,
        counts.planned,
        len(skipped),
        counts.ok,
        counts.empty,
        counts.error,
        audio_s,
        model_s,
        time.monotonic() - started,
        **where,
    )
