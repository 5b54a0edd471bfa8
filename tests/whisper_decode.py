"""Whisper's runner on encoder outputs computed apart (the decoder tests feed it states directly)."""

from __future__ import annotations

from torch import Tensor

from pipeline.decoding.policy import DecodePolicy
from pipeline.decoding.scheduler import Request, Scheduler
from pipeline.models.whisper_runner import Encoded, WhisperRunner


def decode_encoded(
    model: object,
    states: Tensor,
    key_bias: Tensor | None,
    policy: DecodePolicy,
    slots: int | None = None,
) -> list[Request]:
    """Greedy decoding of encoder outputs already computed: states (B, S, D), key_bias (B, S) or None.
    One finished request per row, in order."""
    requests = [
        Request(
            key=b, work=None, state={"encoded": Encoded(states[b], None if key_bias is None else key_bias[b])}
        )
        for b in range(states.shape[0])
    ]
    scheduler = Scheduler(slots or len(requests))
    scheduler.add(requests)
    WhisperRunner(model, scheduler.slots).run(scheduler, policy)
    return requests
