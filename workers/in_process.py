"""The run's two stages in the driver's own process, for a single machine with one model: no Ray
cluster to start, no actor to wait for, no streaming executor sharing the cores with the model.

A thread cuts windows (read, decode, VAD, cut: workers/cpu_stage.py, which streams) while the model,
loaded once, streams in a thread of its own (workers/model_stage.py); batches are submitted as they
fill, at most ``_IN_FLIGHT`` waiting for their last windows, so memory holds those windows and the few
the cutter buffers, whatever the archive's size and the recordings' lengths. Window texts
come out in the same batches, rows and schema as from the Ray dataset (workers/ray_run.py), and the
same stitching and commits follow (workers/archive_job.py).
"""

from __future__ import annotations

import math
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future

import pyarrow as pa

from pipeline.inputs import PlannedRecording
from schemas.job_config import JobConfig
from schemas.stages import WINDOW_SCHEMA
from workers.cpu_stage import recording_windows
from workers.model_stage import WindowPredictor
from workers.progress import Tally, windows_done

_END = object()
# Batches submitted to the model and not yet returned: while the oldest one's last windows decode, the
# next ones' fill the rows it frees.
_IN_FLIGHT = 2


class _Cutter(threading.Thread):
    """Puts the window rows of each planned recording on ``rows``, then ``_END`` (or the exception
    that stopped it); gives up as soon as ``stop`` is set, so a failed run never leaves it blocked."""

    def __init__(
        self,
        todo: list[PlannedRecording],
        window_kwargs: dict,
        rows: queue.Queue,
        started: Callable[[str], None],
    ) -> None:
        super().__init__(name="cut-windows", daemon=True)
        self.todo, self.window_kwargs, self.rows, self.started = todo, window_kwargs, rows, started
        self.stop = threading.Event()

    def _put(self, item: object) -> None:
        while not self.stop.is_set():
            try:
                self.rows.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def run(self) -> None:
        try:
            for planned in self.todo:
                self.started(planned.recording_id)
                for row in recording_windows(planned.to_row(), **self.window_kwargs):
                    self._put(row)
                    if self.stop.is_set():
                        return
            self._put(_END)
        except BaseException as err:  # recording_windows reports a bad input as a row; this is a bug
            self._put(err)


def _batches(
    todo: list[PlannedRecording],
    window_kwargs: dict,
    predictor_kwargs: dict,
    batch_size: int,
    tally: Tally,
    started: Callable[[str], None],
) -> Iterator[pa.Table]:
    rows: queue.Queue = queue.Queue(maxsize=2 * batch_size)
    cutter = _Cutter(todo, window_kwargs, rows, started)
    cutter.start()  # decoding the first recordings overlaps the model's load
    predictor, finished = None, False
    try:
        predictor = WindowPredictor(**predictor_kwargs)
        in_flight: deque[Future] = deque()  # the model streams: the next batch joins before one is done
        batch: list[dict] = []
        while True:
            item = rows.get()
            if isinstance(item, BaseException):
                raise item
            if item is not _END:
                batch.append(item)
            if batch and (item is _END or len(batch) == batch_size):
                in_flight.append(predictor.submit(pa.Table.from_pylist(batch, schema=WINDOW_SCHEMA)))
                batch = []
            while in_flight and (len(in_flight) > _IN_FLIGHT or in_flight[0].done() or item is _END):
                texts = in_flight.popleft().result()
                tally.add(windows_done(texts))
                yield texts
            if item is _END:
                finished = True
                break
    finally:
        cutter.stop.set()
        cutter.join()
        if predictor is not None:  # stopped (Ctrl-C, a failure) even while draining: windows left undone
            predictor.close(finish=finished)


def window_texts(
    todo: list[PlannedRecording],
    config: JobConfig,
    window_kwargs: dict,
    predictor_kwargs: dict,
    started: Callable[[str], None],
) -> tuple[Iterator[pa.Table], Callable[[], tuple[int, int, float]]]:
    """The run's window-text batches (WINDOW_TEXT_SCHEMA, ``config.windows_per_block`` window rows
    each, in plan order) and a reader of its progress tally. window_kwargs: ``recording_windows``'s
    settings; predictor_kwargs: ``WindowPredictor``'s; ``started(recording_id)`` is called as the
    cutter begins each recording (the run's in-flight record, ``pipeline.publish.InFlight``)."""
    tally = Tally()
    predictor_kwargs = predictor_kwargs | {
        # As in a Ray run, only a model given GPUs looks for one; threads: its CPUs, where capped.
        "device": "cpu" if config.device == "auto" and not config.gpus_per_actor else config.device,
        "threads": math.ceil(config.cpus_per_actor) if config.cpus_per_actor else config.num_cpus,
    }
    batches = _batches(todo, window_kwargs, predictor_kwargs, config.windows_per_block, tally, started)
    return batches, tally.counts
