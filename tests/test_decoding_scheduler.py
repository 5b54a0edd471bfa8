"""Continuous batching: the scheduler's queues and slots, and both runners (Whisper's, and the engine's
for the decoder-only families' tiny checkpoints) refilling rows as they finish, every window decoding the
tokens it decodes alone whatever its neighbours and arrival."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from pipeline.audio.decode import decode_audio
from pipeline.decoding.scheduler import Counters, Request, Scheduler
from pipeline.merging.config import NO_REDUCTION, ReductionConfig
from pipeline.models.registry import load_model
from pipeline.presets import resolve_reduction
from pipeline.tasks import TaskRequest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ASR = TaskRequest("asr")


def test_rows_leave_their_slot_to_the_last_row_and_free_slots_refill():
    scheduler = Scheduler(3)
    requests = [Request(key=i, work=None) for i in range(5)]
    scheduler.add(requests)
    assert scheduler.admit() == requests[:3] and [r.slot for r in requests[:3]] == [0, 1, 2]
    scheduler.step()
    assert scheduler.retire(requests[0]) == (2, 0)  # the last row moves into the freed slot
    assert requests[2].slot == 0 and scheduler.running == [requests[2], requests[1]]
    assert scheduler.admit() == [requests[3]] and requests[3].slot == 2
    scheduler.step()
    assert scheduler.retire(requests[3]) is None  # the last row leaves: nothing moves
    counters = scheduler.counters
    assert (counters.steps, counters.rows, counters.refills, counters.queued_steps) == (2, 6, 1, 2)
    assert counters.occupancy(3) == 1.0


@pytest.fixture(scope="module")
def windows() -> list[np.ndarray]:
    """Real speech of many lengths (what decodes to outputs of many lengths): cuts of the examples."""
    speech = [decode_audio(EXAMPLES / name).samples for name in ("intro.wav", "standup.flac")]
    lengths_s = [1.5, 9.0, 3.0, 14.0, 0.8, 6.0, 11.0]
    return [speech[i % 2][int(16000 * i) : int(16000 * (i + s))] for i, s in enumerate(lengths_s)]


@pytest.fixture(scope="module")
def speech_lms(checkpoints) -> dict:
    models = {
        "qwen2_audio": load_model(str(checkpoints["qwen-instruct"])),
        "glm_asr": load_model(str(checkpoints["glm"])),
    }
    for model in models.values():
        model.max_new_tokens = 64  # random weights: some rows end early, some loop, some run to the budget
    return models


@pytest.fixture(params=["whisper", "qwen2_audio", "glm_asr"])
def model(request, whisper, speech_lms):
    """Whisper tiny.en and each decoder-only family's tiny checkpoint, in turn."""
    return whisper if request.param == "whisper" else speech_lms[request.param]


def _merging(model) -> object:
    if model.description.family == "whisper":
        return resolve_reduction(model.description, "asr")
    return ReductionConfig("fastadasp", "constant", first_layer=0, target=0.3)


def _streamed(model, waves, request, reduction, seed: int) -> dict:
    """Windows arriving in a random order at random steps: each pull hands over 0-2 of them (at least
    one when the batch is idle)."""
    rng = random.Random(seed)
    queue = [(i, waves[i]) for i in rng.sample(range(len(waves)), len(waves))]

    def pull(block: bool) -> list | None:
        if not queue:
            return None
        take = max(int(block), rng.choice([0, 0, 1, 2]))
        return [queue.pop(0) for _ in range(min(take, len(queue)))]

    outputs: dict = {}
    model.stream(pull, request, reduction, outputs.__setitem__)
    return outputs


@pytest.mark.parametrize("merging", [False, True])
def test_a_window_decodes_the_same_tokens_whatever_arrives_beside_it(model, windows, merging):
    reduction = _merging(model) if merging else NO_REDUCTION
    alone = [model.run([w], ASR, reduction)[0] for w in windows]
    slots = model.batch_size
    try:
        for seed, model.batch_size in ((0, 2), (1, 3), (2, 7)):
            got = _streamed(model, windows, ASR, reduction, seed)
            assert [got[i].text for i in range(len(windows))] == [o.text for o in alone]
            tokens = [got[i].stats.generated_tokens for i in range(len(windows))]
            assert tokens == [o.stats.generated_tokens for o in alone]
    finally:
        model.batch_size = slots


# GLM-ASR's random weights repeat one token from the start: every row stops at the same step (the loop
# guard's), so its rows are freed together and nothing is refilled mid-batch.
@pytest.mark.parametrize("model", ["whisper", "qwen2_audio"], indirect=True)
def test_freed_rows_are_refilled_until_the_queue_drains(model, windows):
    """Short and long windows through 3 slots: every step runs 3 rows while windows wait, never 4."""
    slots = model.batch_size
    model.batch_size, model.counters = 3, Counters()
    try:
        model.run(windows, ASR, NO_REDUCTION)
    finally:
        model.batch_size = slots
    counters = model.counters
    queued = counters.queued_rows, counters.queued_steps
    assert counters.refills == len(windows) - 3
    assert counters.peak == 3  # room for 3 rows: never a fourth
    assert queued[1] > 0 and queued[0] == 3 * queued[1]  # full while windows waited


def test_a_window_that_is_not_one_fails_alone_in_a_stream(model, windows):
    """A window of two channels, and one longer than any a row has room for: error outputs; the
    windows around them decode."""
    bad, long = np.zeros((2, 16000), dtype=np.float32), np.zeros(31 * 16000, dtype=np.float32)
    items = [(0, windows[0]), (1, bad), (2, windows[2]), (3, long), (4, windows[1])]
    outputs: dict = {}
    model.stream(lambda _block: [items.pop(0)] if items else None, ASR, NO_REDUCTION, outputs.__setitem__)
    assert isinstance(outputs[1], ValueError) and "expected mono" in str(outputs[1])
    assert isinstance(outputs[3], ValueError) and "at most 30 s" in str(outputs[3])
    assert all(outputs[i].stats.generated_tokens for i in (0, 2, 4))


def test_batch_size_sizes_the_runner_once(whisper):
    runner = whisper.runner
    whisper.batch_size = 4  # fewer rows: the buffers stay
    assert whisper.runner is runner
    try:
        whisper.batch_size = runner.slots + 1  # more rows than the buffers hold: sized afresh
        assert whisper.runner.slots == runner.slots + 1
        with pytest.raises(ValueError, match="batch_size=0"):
            whisper.batch_size = 0
    finally:
        whisper.batch_size, whisper.runner = 16, runner


def test_the_engine_keeps_its_caches_across_streams(speech_lms, windows):
    """Allocated once per loaded model: a second stream of the same shape reuses the first's caches;
    a reduction whose rows need no more room too; more rows than they hold: allocated afresh."""
    qwen = speech_lms["qwen2_audio"]
    slots = qwen.batch_size
    try:
        qwen.batch_size = 2
        qwen.run(windows[:2], ASR, NO_REDUCTION)
        runner = qwen.runner
        qwen.run(windows[2:4], ASR, NO_REDUCTION)
        qwen.run(windows[2:4], ASR, _merging(qwen))  # merged rows need fewer positions
        assert qwen.runner is runner and runner.slots == 2
        qwen.batch_size = 3
        qwen.run(windows[:1], ASR, NO_REDUCTION)
        assert qwen.runner is not runner and qwen.runner.slots == 3
    finally:
        qwen.batch_size = slots
