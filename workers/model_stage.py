"""Model stage: loads the model once (in a Ray actor, or in the driver of an in-process run) and turns
window PCM into window text + stats.

Rows that are not ``ok`` (errors and empty recordings from the CPU stage) pass through untouched.
The model streams: one thread runs ``model.stream`` for the predictor's life, and the ``ok`` windows of
every submitted batch join it as they arrive, whatever their lengths (Whisper admits each into the
decoding batch as a row finishes, pipeline/models/whisper_runner.py; decoder-only families decode what
has arrived in one call). A batch's table is ready when its last window is, while the next batches'
windows keep the model busy: in a Ray actor, ``__call__`` is a coroutine, so Ray Data keeps several
batches in flight per actor; an in-process run submits the next batch before it waits for the last.
When the stream fails, the windows it held are retried one by one so only a window that fails becomes
an error row.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import platform
import queue
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from pipeline.merging.config import ReductionConfig
from pipeline.models.base import INT8, WindowOutput
from pipeline.models.registry import load_model
from pipeline.stats import WindowStats, peak_rss_bytes
from pipeline.tasks import TaskRequest
from schemas.stages import WINDOW_TEXT_SCHEMA
from workers.progress import windows_done

log = logging.getLogger(__name__)


def connected_ray() -> object | None:
    """The Ray module when this process is connected to Ray (a worker, or a connected driver), else
    None; never imports Ray (an in-process run may have none installed)."""
    ray = sys.modules.get("ray")
    return ray if ray is not None and ray.is_initialized() else None


def pick_device(requested: str) -> str:
    """``auto``: cuda when torch can see a GPU this process holds (connected to Ray: one Ray gave it;
    outside Ray: any), else cpu."""
    if requested != "auto":
        return requested
    ray = connected_ray()
    held = ray is None or bool(ray.get_gpu_ids())
    return "cuda" if held and torch.cuda.is_available() else "cpu"


def _nvml_handle() -> object | None:
    """NVML handle of this actor's GPU (the first visible one), None without a GPU or pynvml."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetHandleByIndex(int(torch.cuda.current_device()))
    except Exception:  # no driver, no library: NVML readings are optional
        return None


def _recording_words(result: object, start_s: float) -> list[dict] | None:
    """A window's words in recording seconds (None: the model gave no word times)."""
    if not isinstance(result, WindowOutput) or result.words is None:
        return None
    return [w.shifted(start_s).to_dict() for w in result.words]


@dataclass
class _Batch:
    """A submitted batch: its rows (PCM dropped), where its ``ok`` windows are, their outputs so far."""

    rows: list[dict]
    waiting: set[int]
    outputs: dict[int, WindowOutput | Exception] = field(default_factory=dict)
    future: Future = field(default_factory=Future)


_CLOSE = object()


class _Stopped(Exception):
    """Raised into the model's stream when the predictor is closed before its windows are done."""


class WindowPredictor:
    """WINDOW_SCHEMA rows -> WINDOW_TEXT_SCHEMA rows: a Ray ``map_batches`` callable class (an async one),
    or used by an in-process run (workers/in_process.py) through ``submit``.

    threads: torch threads on CPU; None: in a Ray actor the CPUs Ray gave it (a share rounds up),
    elsewhere torch's default. batch_size: rows the model decodes at once (None: its default). tally: a ``workers.ray_run.TallyActor`` told of every window (Ray runs).
    """

    def __init__(
        self,
        model_name: str,
        request: dict,
        reduction: dict,
        device: str = "auto",
        tally: object | None = None,  # a Ray actor handle
        kind: str | None = None,
        int8: bool = False,
        threads: int | None = None,
        batch_size: int | None = None,
    ) -> None:
        started = time.monotonic()
        if not logging.getLogger().handlers:  # a fresh Ray worker: let INFO lines reach the driver's log
            logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        self.tally = tally
        self.device = pick_device(device)
        ray = connected_ray()
        context = ray.get_runtime_context() if ray is not None else None
        if threads is None and context is not None and context.get_actor_id():
            threads = math.ceil(context.get_assigned_resources().get("CPU", 1.0))
        if self.device == "cpu" and threads is not None:
            torch.set_num_threads(max(1, threads))
        dtype = INT8 if int8 else None
        self.model = load_model(model_name, self.device, dtype, kind, batch_size)
        self.request = TaskRequest(**request)
        self.reduction = ReductionConfig(**reduction)
        self.node = context.get_node_id() if context is not None else platform.node()
        cuda = self.device.startswith("cuda")
        self.device_name = (
            torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)"
        )
        self.nvml = _nvml_handle() if cuda else None
        self._inbox: queue.Queue = queue.Queue()
        self._batches: dict[int, _Batch] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        # The windows the stream took and has not finished (the model thread's alone: no lock).
        self._held: dict[tuple[int, int], np.ndarray] = {}
        self._stopped = threading.Event()
        self._closed = False  # _CLOSE taken from the inbox (the model thread's alone)
        self._server = threading.Thread(target=self._serve, name="model-stream", daemon=True)
        self._server.start()
        log.info("%s loaded on %s in %.1f s", model_name, self.device_name, time.monotonic() - started)

    def submit(self, batch: pa.Table) -> Future:
        """The batch's windows join the model's stream; the future gives its WINDOW_TEXT_SCHEMA table."""
        rows = batch.to_pylist()
        ok = [i for i, row in enumerate(rows) if row["status"] == "ok"]
        waves = {i: np.frombuffer(rows[i].pop("pcm"), dtype="<f4") for i in ok}
        for row in rows:
            row.pop("pcm", None)
        entry = _Batch(rows, set(ok))
        if not ok:
            entry.future.set_result(self._table(entry))
            return entry.future
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        with self._lock:
            batch_id = next(self._ids)
            self._batches[batch_id] = entry
        for i in ok:
            self._inbox.put(((batch_id, i), waves[i]))
        return entry.future

    async def __call__(self, batch: pa.Table) -> pa.Table:
        return await asyncio.wrap_future(self.submit(batch))

    def close(self, finish: bool = True) -> None:
        """End the stream: after the windows submitted (finish), or at the next window to finish,
        leaving the rest undone (a stopped run). Returns once the model thread has ended: a process must
        not exit while that thread is inside torch (the C++ runtime aborts)."""
        if not finish:
            self._stopped.set()
        self._inbox.put(_CLOSE)
        self._server.join()

    def _pull(self, block: bool) -> list | None:
        if self._stopped.is_set() or self._closed:
            return None
        items = []
        try:
            item = self._inbox.get(block=block)
            while True:
                if item is _CLOSE:  # it may come with the last windows: the pull after them ends
                    self._closed = True
                    return items or None
                items.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass
        self._held.update(items)
        return items

    def _emit(self, key: tuple[int, int], out: WindowOutput | Exception) -> None:
        if self._stopped.is_set():
            raise _Stopped
        batch_id, i = key
        self._held.pop(key, None)
        with self._lock:
            entry = self._batches[batch_id]
            entry.outputs[i] = out
            entry.waiting.discard(i)
            if entry.waiting:
                return
            del self._batches[batch_id]
        table = self._table(entry)
        if self.tally is not None:  # fire and forget: progress never waits on, or fails, the work
            self.tally.add.remote(windows_done(table))
        entry.future.set_result(table)

    def _serve(self) -> None:
        while True:
            try:
                self.model.stream(self._pull, self.request, self.reduction, self._emit)
                return
            except _Stopped:
                return
            except Exception as err:
                # it failed before taking any window: the next ones, one by one, say why
                if not self._held and self._pull(True) is None:
                    return
                held = sorted(self._held.items())
                log.warning(
                    "the model's stream failed (%s); %d windows are retried one by one", err, len(held)
                )
                for key, wave in held:
                    if self._stopped.is_set():
                        return
                    self._emit(key, self._run_one(wave))

    def _run_one(self, wave: np.ndarray) -> WindowOutput | Exception:
        try:
            return self.model.run([wave], self.request, self.reduction)[0]
        except Exception as err:
            return err

    def _memory(self) -> tuple[int | None, int | None]:
        if not self.device.startswith("cuda"):
            return None, None
        peak = int(torch.cuda.max_memory_allocated())
        if self.nvml is None:
            return peak, None
        import pynvml

        return peak, int(pynvml.nvmlDeviceGetMemoryInfo(self.nvml).used)

    def _table(self, entry: _Batch) -> pa.Table:
        peak, nvml_used = self._memory()
        rss = peak_rss_bytes()
        out_rows = []
        for i, row in enumerate(entry.rows):
            result = entry.outputs.get(i)
            if isinstance(result, Exception):
                row |= {"status": "error", "stage": "model", "error": f"{type(result).__name__}: {result}"}
            stats = result.stats if isinstance(result, WindowOutput) else WindowStats()
            row |= {
                "text": result.text if isinstance(result, WindowOutput) else None,
                "language": result.language if isinstance(result, WindowOutput) else None,
                "words": _recording_words(result, row["start_s"]),
                "window_stats": stats.to_dict(),
                "peak_memory_bytes": peak,
                "nvml_memory_bytes": nvml_used,
                "model_rss_bytes": rss,
                "device_name": self.device_name,
                "node": self.node,
            }
            out_rows.append(row)
        return pa.Table.from_pylist(out_rows, schema=WINDOW_TEXT_SCHEMA)
