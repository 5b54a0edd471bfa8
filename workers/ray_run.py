"""The Ray executor of a run: one Ray Data dataset, plan rows -> windows (CPU tasks spread over the
cluster) -> window texts (a pool of model actors, one per GPU or a CPU share each), streamed back to
the driver; progress from a tally actor the model actors report to.

A recording that kills the worker cutting it (a native crash in a decoder, the kernel's memory killer)
does not fail the run: its task is retried ``CPU_STAGE_RETRIES`` times, then its block is dropped; the
recordings of dropped blocks are tried once more, each in a task of its own (so a block's other
recordings get through), and a recording that kills that task too never arrives: the driver commits it
as an error row of stage ``crash`` (workers/archive_job.py).

Only this module (and the workers it starts) imports Ray, so an in-process run needs no Ray installed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator

import pyarrow as pa
import ray

from pipeline.inputs import PlannedRecording
from schemas.job_config import JobConfig
from schemas.stages import PLAN_SCHEMA
from workers.cpu_stage import cut_windows
from workers.model_stage import WindowPredictor
from workers.progress import Tally

log = logging.getLogger(__name__)

_MAX_PLAN_BLOCKS = 256
_WINDOW_BLOCK_BYTES = 8 << 20  # four 30 s windows of float32 at 16 kHz
# CPUs of one CPU-stage task (decoding, resampling, VAD, cutting: one thread, a small part of a window's
# inference on CPU). Half a CPU leaves the rest of a node to the model actors, and differs from their
# share, which keeps Ray Data from fusing the two stages into one actor where decoding waits on inference.
CPU_STAGE_CPUS = 0.5
CPU_STAGE_RETRIES = 2  # after a worker died; Ray Data's own default retries forever
TallyActor = ray.remote(num_cpus=0)(Tally)
_POLL_TIMEOUT_S = 10.0


def connect(config: JobConfig) -> None:
    """Join the cluster of a submitted job (RAY_ADDRESS) or start a local one; no-op if connected."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(address="local", num_cpus=config.num_cpus, num_gpus=config.num_gpus)


def actor_counts(tally: ray.actor.ActorHandle) -> Callable[[], tuple[int, int, float]]:
    """``ProgressLog``'s reader of a tally actor: a bounded wait, so a hung actor costs a line only."""
    return lambda: ray.get(tally.counts.remote(), timeout=_POLL_TIMEOUT_S)


def _plan_dataset(todo: list[PlannedRecording], blocks: int = _MAX_PLAN_BLOCKS) -> ray.data.Dataset:
    """Plan rows split into at most ``blocks`` blocks so the CPU stage can spread over the cluster."""
    rows = [r.to_row() for r in todo]
    size = max(1, -(-len(rows) // blocks))
    blocks = [pa.Table.from_pylist(rows[i : i + size], schema=PLAN_SCHEMA) for i in range(0, len(rows), size)]
    return ray.data.from_arrow(blocks)


def actor_cpus(model_actors: int, node_cpus: list[float]) -> float:
    """The default CPU share of each CPU model actor: every node's CPUs less one CPU-stage task's,
    split among the actors, and no more than the largest node can give one actor."""
    nodes = [cpus for cpus in node_cpus if cpus > CPU_STAGE_CPUS] or [1.0]
    usable = sum(nodes) - CPU_STAGE_CPUS * len(nodes)
    return max(CPU_STAGE_CPUS, min(max(nodes) - CPU_STAGE_CPUS, usable / model_actors))


def _actor_resources(config: JobConfig) -> dict:
    if config.gpus_per_actor:
        return {"num_gpus": config.gpus_per_actor}
    if config.cpus_per_actor is not None:
        return {"num_cpus": config.cpus_per_actor}
    nodes = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"]]
    return {"num_cpus": actor_cpus(config.model_actors, nodes)}


def windows_dataset(
    todo: list[PlannedRecording], window_kwargs: dict, blocks: int = _MAX_PLAN_BLOCKS
) -> ray.data.Dataset:
    """The CPU stage: plan rows -> window rows (WINDOW_SCHEMA). window_kwargs: ``cut_windows``'s settings."""
    plan = _plan_dataset(todo, blocks)
    # A long recording's windows leave the CPU stage in blocks of a few windows as they are cut, not
    # in blocks of Ray's default 128 MiB (70 windows of 30 s) held in the CPU task until full.
    plan.context.target_max_block_size = _WINDOW_BLOCK_BYTES
    plan.context.max_errored_blocks = -1  # a task out of retries drops its block; the run goes on
    return plan.map_batches(
        cut_windows,
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=CPU_STAGE_CPUS,
        max_retries=CPU_STAGE_RETRIES,
        fn_kwargs=window_kwargs,
    )


def build_dataset(
    todo: list[PlannedRecording],
    config: JobConfig,
    window_kwargs: dict,
    predictor_kwargs: dict,
    tally: ray.actor.ActorHandle,
    blocks: int = _MAX_PLAN_BLOCKS,
) -> ray.data.Dataset:
    """The run's single dataset: plan rows -> windows -> window texts (WINDOW_TEXT_SCHEMA), streamed to
    the driver, which stitches each recording as its last window arrives (workers/stitch_stage.py).
    window_kwargs: ``cut_windows``'s settings; predictor_kwargs: ``WindowPredictor``'s."""
    windows = windows_dataset(todo, window_kwargs, blocks)
    return windows.map_batches(
        WindowPredictor,
        batch_size=config.windows_per_block,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=config.model_actors, max_tasks_in_flight_per_actor=2),
        fn_constructor_kwargs=predictor_kwargs | {"tally": tally},
        **_actor_resources(config),
    )


def _batches(todo: list[PlannedRecording], *build: object) -> Iterator[pa.Table]:
    """The run's window texts; then those of the recordings whose blocks were dropped, each tried again
    in a block of its own. ``build``: ``build_dataset``'s other arguments."""
    seen: set[str] = set()
    for batch in build_dataset(todo, *build).iter_batches(batch_size=None, batch_format="pyarrow"):
        seen.update(batch["recording_id"].to_pylist())
        yield batch
    lost = [r for r in todo if r.recording_id not in seen]
    if lost:
        log.warning("%d recordings lost their CPU-stage tasks; each is tried again on its own", len(lost))
        yield from build_dataset(lost, *build, len(lost)).iter_batches(
            batch_size=None, batch_format="pyarrow"
        )


def window_texts(
    todo: list[PlannedRecording], config: JobConfig, window_kwargs: dict, predictor_kwargs: dict
) -> tuple[Iterator[pa.Table], Callable[[], tuple[int, int, float]]]:
    """Connect (or start a local cluster), then the run's window-text batches as they finish and a
    reader of its progress tally."""
    connect(config)
    tally = TallyActor.remote()
    return _batches(todo, config, window_kwargs, predictor_kwargs, tally), actor_counts(tally)
