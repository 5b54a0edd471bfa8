"""Continuous batching: requests wait in a queue, run in the slots of a live batch, and leave it at the
step they finish, their slot taken by the next waiting request while the others keep decoding.

The scheduler owns no tensors. A runner (Whisper's: pipeline/models/whisper_runner.py) keeps its
per-row state in the first ``len(running)`` rows of buffers sized for ``slots`` rows, so a step computes
on the live rows alone: ``admit`` appends requests at the end, ``retire`` moves the last running request
into the freed slot and says so, and the runner copies that one row of its buffers.

Occupancy: the rows decoding in a step over the batch's slots. A static batch keeps its slots idle (or
computing finished rows) from its first row's end to its last one's; here a slot is refilled at the
step it frees, so occupancy stays full until the queue drains (``Counters`` says how far that holds).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class Request:
    """One window being decoded. key: the caller's handle; work: what the runner needs to start it.

    slot: its row in the runner's buffers while running (-1 otherwise). fed: tokens fed so far (the
    next one sits at this position); max_new_tokens: its own cap on generated tokens, within the
    policy's (None: the policy's); prompt: what it feeds before generating; generated: its tokens
    (logprobs: their log-probabilities, where the runner keeps them); finish: why it stopped
    (``DecodePolicy.stop``'s reasons); state: the runner's and the caller's data about it.
    """

    key: Any
    work: Any
    slot: int = -1
    fed: int = 0
    max_new_tokens: int | None = None
    prompt: list[int] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: str | None = None
    state: dict = field(default_factory=dict)


@dataclass
class Counters:
    """What the scheduler did. steps: decoder steps; rows: rows computed, summed over steps (every one
    decoding: a row leaves at the step it finishes); queued_steps /
    queued_rows: the same while requests were waiting; admitted / retired: requests; refills: admissions
    into a batch that was still decoding; peak: most rows in one step."""

    steps: int = 0
    rows: int = 0
    queued_steps: int = 0
    queued_rows: int = 0
    admitted: int = 0
    retired: int = 0
    refills: int = 0
    peak: int = 0

    def occupancy(self, slots: int, queued: bool = False) -> float:
        """Rows decoding over slots, per step (queued: only the steps while requests were waiting)."""
        steps, rows = (self.queued_steps, self.queued_rows) if queued else (self.steps, self.rows)
        return rows / (steps * slots) if steps else 1.0

    def __add__(self, other: Counters) -> Counters:
        summed = {k: v + getattr(other, k) for k, v in vars(self).items()}
        return Counters(**summed | {"peak": max(self.peak, other.peak)})


# feed(scheduler, block): adds arriving requests to the scheduler (``add``), blocking for them only when
# ``block``; False once no more will come.
Feed = Callable[["Scheduler", bool], bool]


class Scheduler:
    """Waiting and running queues over ``slots`` rows (sized by the runner from memory, or a row cap),
    fed by ``feed`` as requests arrive (None: those added are all). A call that queues no more windows
    than it has slots is a static batch: nothing waits to refill it (what
    benchmarks/continuous_batching.py measures continuous batching against)."""

    def __init__(self, slots: int, feed: Feed | None = None) -> None:
        if slots < 1:
            raise ValueError(f"slots={slots} must be >= 1")
        self.slots = slots
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.counters = Counters()
        self._feed = feed

    def pending(self) -> bool:
        """Whether work is left, once arrivals are taken from ``feed`` while slots are free (blocking
        for them only when nothing waits or runs)."""
        while True:
            room = len(self.waiting) + len(self.running) < self.slots
            if self._feed is not None and room and not self._feed(self, not self):
                self._feed = None
            if self or self._feed is None:
                return bool(self)

    def add(self, requests: Iterable[Request]) -> None:
        self.waiting.extend(requests)

    def __bool__(self) -> bool:
        return bool(self.waiting or self.running)

    def admit(self) -> list[Request]:
        """Waiting requests moved into the free slots, in queue order."""
        admitted: list[Request] = []
        was_running = bool(self.running)
        while self.waiting and len(self.running) < self.slots:
            request = self.waiting.popleft()
            request.slot = len(self.running)
            self.running.append(request)
            admitted.append(request)
        self.counters.admitted += len(admitted)
        self.counters.refills += len(admitted) if was_running else 0
        return admitted

    def step(self) -> None:
        """Count one decoder step over the running rows."""
        c = self.counters
        c.steps += 1
        c.rows += len(self.running)
        c.peak = max(c.peak, len(self.running))
        if self.waiting:
            c.queued_steps += 1
            c.queued_rows += len(self.running)

    def retire(self, request: Request) -> tuple[int, int] | None:
        """Take a running request out; its slot goes to the last running request.

        Returns (from_slot, to_slot), the row the runner must copy, or None when the retired request
        was the last row.
        """
        slot, last = request.slot, len(self.running) - 1
        moved = self.running.pop()
        request.slot = -1
        self.counters.retired += 1
        if slot == last:
            return None
        self.running[slot] = moved
        moved.slot = slot
        return last, slot
