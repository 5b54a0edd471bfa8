"""Model stage: loads the model once (in a Ray actor, or in the driver of an in-process run) and turns
window PCM into window text + stats.

Rows that are not ``ok`` (errors and empty recordings from the CPU stage) pass through untouched.
All ``ok`` windows of a Ray batch go to one ``model.run`` call, whatever their lengths: the adapter
batches them as its model allows (Whisper pads every window to 30 s; Qwen2-Audio groups equal audio
token counts). When the call fails, its windows are retried one by one so only the window that fails
becomes an error row.
"""

from __future__ import annotations

import logging
import math
import platform
import sys
import time

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


class WindowPredictor:
    """WINDOW_SCHEMA rows -> WINDOW_TEXT_SCHEMA rows: a Ray ``map_batches`` callable class, or called by
    an in-process run (workers/in_process.py).

    threads: torch threads on CPU; None: in a Ray actor the CPUs Ray gave it (a share rounds up),
    elsewhere torch's default. tally: a ``workers.ray_run.TallyActor`` told of every window (Ray runs).
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
        self.model = load_model(model_name, device=self.device, dtype=INT8 if int8 else None, kind=kind)
        self.request = TaskRequest(**request)
        self.reduction = ReductionConfig(**reduction)
        self.node = context.get_node_id() if context is not None else platform.node()
        cuda = self.device.startswith("cuda")
        self.device_name = (
            torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)"
        )
        self.nvml = _nvml_handle() if cuda else None
        log.info("%s loaded on %s in %.1f s", model_name, self.device_name, time.monotonic() - started)

    def _run(self, waveforms: list[np.ndarray]) -> list[WindowOutput | Exception]:
        try:
            return self.model.run(waveforms, self.request, self.reduction)
        except Exception as err:
            if len(waveforms) == 1:
                return [err]
            log.warning("batch of %d windows failed (%s); retrying one by one", len(waveforms), err)
            return [out for w in waveforms for out in self._run([w])]

    def _memory(self) -> tuple[int | None, int | None]:
        if not self.device.startswith("cuda"):
            return None, None
        peak = int(torch.cuda.max_memory_allocated())
        if self.nvml is None:
            return peak, None
        import pynvml

        return peak, int(pynvml.nvmlDeviceGetMemoryInfo(self.nvml).used)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        indices = [i for i, row in enumerate(rows) if row["status"] == "ok"]
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        waveforms = [np.frombuffer(rows[i]["pcm"], dtype="<f4") for i in indices]
        outputs = dict(zip(indices, self._run(waveforms) if waveforms else [], strict=True))
        peak, nvml_used = self._memory()
        rss = peak_rss_bytes()
        out_rows = []
        for i, row in enumerate(rows):
            row.pop("pcm")
            result = outputs.get(i)
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
        table = pa.Table.from_pylist(out_rows, schema=WINDOW_TEXT_SCHEMA)
        if self.tally is not None:  # fire and forget: progress never waits on, or fails, the work
            self.tally.add.remote(windows_done(table))
        return table
