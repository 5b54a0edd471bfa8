"""Run progress from where the work happens: every window the model stage finishes is counted in a
tally (an actor in a Ray run, the driver's own object in an in-process run), and the driver logs the
tally's counts while the run goes on.

Progress is advisory: the model stage reports fire-and-forget, and the driver's polls are bounded in
time and never raise, so a tally actor that fails, hangs or is killed (by hand, or by Ray's memory
monitor) costs progress lines, never the run.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

import pyarrow as pa

log = logging.getLogger(__name__)


class Counts(NamedTuple):
    """A tally's reading. ``in_flight``: the recordings begun but not done, each counted by the share of
    its windows done (what makes an ETA over a few long recordings move between them)."""

    done: int
    failed: int
    audio_s: float
    in_flight: float = 0.0


class Tally:
    """Recordings whose every window left the model stage: done, failed (any window in error) and
    their audio seconds. ``add`` takes one (recording id, window count, status, duration s) per window;
    error and empty recordings travel as one row with window count 0."""

    def __init__(self) -> None:
        self.pending: dict[str, tuple[int, bool, int]] = {}  # windows seen, any failed, windows in all
        self.done = self.failed = 0
        self.audio_s = 0.0
        self._lock = threading.Lock()  # in-process runs add on one thread and read on the progress one

    def add(self, windows: list[tuple[str, int, str, float]]) -> None:
        with self._lock:
            for recording_id, count, status, duration_s in windows:
                seen, failed, _ = self.pending.pop(recording_id, (0, False, count))
                seen, failed = seen + 1, failed or status == "error"
                if seen < count:
                    self.pending[recording_id] = (seen, failed, count)
                    continue
                self.done += 1
                self.failed += failed
                self.audio_s += duration_s

    def counts(self) -> Counts:
        with self._lock:
            in_flight = sum(seen / count for seen, _, count in self.pending.values())
            return Counts(self.done, self.failed, self.audio_s, in_flight)


def windows_done(windows: pa.Table) -> list[tuple[str, int, str, float]]:
    """``Tally.add``'s argument for the model stage's output rows (WINDOW_TEXT_SCHEMA)."""
    columns = ("recording_id", "window_count", "status", "duration_s")
    return list(zip(*(windows.column(c).to_pylist() for c in columns), strict=True))


class ProgressLog:
    """Logs ``progress: done/planned recordings (failed), audio hours, elapsed, ETA`` every ``every_s``
    seconds on a driver thread, and once more when stopped; ``counts`` reads a tally (``Tally.counts``
    in-process, ``workers.ray_run.actor_counts`` of a tally actor)."""

    def __init__(self, counts: Callable[[], Counts], planned: int, every_s: float = 30.0) -> None:
        self.counts, self.planned, self.every_s = counts, planned, every_s
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._readable = True  # False once a poll failed: no more lines
        self._thread = threading.Thread(target=self._loop, name="progress", daemon=True)

    def __enter__(self) -> ProgressLog:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if exc_type is None and self._readable:  # a failed run reports its own error, not a last count
            self.log()

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s) and self._readable:
            self.log()

    def log(self) -> None:
        """Log one line; when the tally cannot be read, warn once and log no more."""
        try:
            counts = self.counts()
        except Exception as err:  # progress is a report: it never fails the run
            self._readable = False
            log.warning("progress lines stopped: %s: %s", type(err).__name__, err)
            return
        done = min(counts.done, self.planned)  # a batch Ray retried after a lost actor counts twice
        elapsed = time.monotonic() - self.started
        log.info(
            "progress: %d/%d recordings (%d failed), %.3f h of audio, %.0f s elapsed, ETA %s",
            done,
            self.planned,
            counts.failed,
            counts.audio_s / 3600,
            elapsed,
            eta(elapsed, min(done + counts.in_flight, self.planned), self.planned),
        )


def eta(elapsed_s: float, done: float, total: float) -> str:
    """Time left at the rate so far (``done`` of ``total`` units in ``elapsed_s``); ``unknown`` until a
    first unit is done."""
    if done <= 0:
        return "unknown"
    return f"{elapsed_s / done * (total - done):.0f} s"
