"""One decoding policy for every runtime: the prompt a row is fed first, the tokens it may not choose,
when it stops (end-of-text, its budget, the loop guard) and which language a multilingual row speaks.

A runner steps rows that are each at their own step (continuous batching, pipeline/decoding/scheduler.py);
the policy answers per row from what the row has fed and generated, so a row decodes the same tokens
whatever its neighbours are doing.

The loop guard is our one deliberate departure from greedy ``generate``: greedy decoding without
timestamps falls into loops (one phrase again and again up to the length limit), which both insert
garbage and hold a batch slot for hundreds of steps. A row whose last tokens are one phrase repeated
(``loop_start``) is cut after the phrase's first occurrence and stops. Rows that never loop decode exactly
as ``generate`` does; ``loop_tokens=0`` turns the guard off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.decoding.scheduler import Request

# Longest repeated phrase the loop guard looks for; loops seen on real speech repeat one sentence.
MAX_LOOP_PERIOD = 64
# How often (a row's generated tokens) the guard looks: a loop found late is cut back to its first phrase.
LOOP_CHECK_EVERY = 8
# The guard's length, both runtimes' default: 48 tokens is ~15 s of speech, far more than any phrase a
# speaker repeats verbatim three times.
LOOP_TOKENS = 48


@dataclass(frozen=True)
class DecodePolicy:
    """Token ids steering greedy decoding of one request's rows.

    prompt: tokens fed first, one per step (Whisper English-only: start-of-transcript, no-timestamps; multilingual:
    start-of-transcript, language, task, no-timestamps). detect: language token ids to choose among per
    row; when given, the prompt lacks the language, which the logits after prompt[0] pick (argmax over
    these ids, as ``generate``'s ``detect_language``) and which is fed second. A runtime that prefills
    its prompts (the decoder-only engine) has none here. eos: the ids that end a row.
    suppress: ids never generated; begin_suppress: ids not generated as the first token.
    max_length: total length including the prompt (the decoder's position table size).
    max_new_tokens: at most this many generated tokens (None: up to max_length; 0 with detect: language
    detection only). loop_tokens: a row stops once its last ``loop_tokens`` or more generated tokens are one
    phrase of at most ``MAX_LOOP_PERIOD`` tokens repeated three or more times; 0: never.
    """

    prompt: tuple[int, ...]
    eos: tuple[int, ...]
    suppress: tuple[int, ...]
    begin_suppress: tuple[int, ...]
    max_length: int
    detect: tuple[int, ...] = ()
    loop_tokens: int = 0
    max_new_tokens: int | None = None

    @property
    def prompt_length(self) -> int:
        """Tokens fed before the first generated one (the detected language included)."""
        return len(self.prompt) + bool(self.detect)

    @property
    def budget(self) -> int:
        """Generated tokens a row may take at most."""
        room = self.max_length - self.prompt_length
        return room if self.max_new_tokens is None else min(room, self.max_new_tokens)

    def row_prompt(self, language: int | None) -> list[int]:
        """The tokens a row feeds before generating: the prompt, the detected language after prompt[0]."""
        if not self.detect:
            return list(self.prompt)
        return [self.prompt[0], language, *self.prompt[1:]]

    def masks(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(suppress, begin_suppress) id tensors on ``device``."""
        return (
            torch.tensor(self.suppress, dtype=torch.long, device=device),
            torch.tensor(self.begin_suppress, dtype=torch.long, device=device),
        )

    def stop(self, generated: list[int], limit: int | None = None) -> tuple[str, int] | None:
        """Whether a row that just generated ``generated[-1]`` stops: (reason, tokens kept) or None.

        Reasons: "eos" (end-of-text, kept), "length" (its budget, or its own ``limit`` below it, spent),
        "loop" (cut by the guard).
        """
        if generated[-1] in self.eos:
            return "eos", len(generated)
        n = len(generated)
        if self.loop_tokens and n % LOOP_CHECK_EVERY == 0 and n >= self.loop_tokens:
            cut = loop_cut(generated, self.loop_tokens)
            if cut is not None:
                return "loop", cut
        if n >= (self.budget if limit is None else min(limit, self.budget)):
            return "length", n
        return None

    def take(self, request: Request, token: int, logprob: float | None = None) -> bool:
        """``token`` is ``request``'s next generated one: True when the request stops there (its
        ``finish`` set, its tokens cut to those ``stop`` keeps)."""
        request.generated.append(token)
        if logprob is not None:
            request.logprobs.append(logprob)
        stop = self.stop(request.generated, request.max_new_tokens)
        if stop is None:
            return False
        request.finish, kept = stop
        del request.generated[kept:], request.logprobs[kept:]
        return True


def choose(logits: Tensor, first: Tensor, suppress: Tensor, begin_suppress: Tensor) -> Tensor:
    """Greedy next tokens (n,) from logits (n, vocab), in place: ``suppress`` never, ``begin_suppress``
    not on the rows whose ``first`` (n,) bool says this is their first generated token."""
    logits[:, suppress] = -float("inf")
    if begin_suppress.numel() and bool(first.any()):
        rows = first.nonzero()
        logits[rows, begin_suppress[None, :]] = -float("inf")
    return logits.argmax(dim=-1)


def loop_cut(generated: list[int], loop_tokens: int) -> int | None:
    """How many of a row's ``generated`` tokens to keep if it ends in a loop, else None."""
    tail = min(len(generated), loop_tokens + 3 * MAX_LOOP_PERIOD)  # enough to see any loop's tail
    cut = loop_start(generated[len(generated) - tail :], loop_tokens)
    return None if cut is None else len(generated) - tail + cut


def loop_start(row: list[int], loop_tokens: int) -> int | None:
    """Where to cut ``row`` if its tail is a loop, else None.

    A loop: the last ``max(loop_tokens, 3 * p)`` tokens are periodic with some period p <=
    MAX_LOOP_PERIOD (a p-token phrase repeated three or more times, covering at least ``loop_tokens``).
    The cut keeps the periodic stretch's first phrase: the run is followed back to where it began.
    """
    n = len(row)
    for p in range(1, min(MAX_LOOP_PERIOD, n // 3) + 1):
        tail = max(loop_tokens, 3 * p)
        if tail > n or any(row[t] != row[t - p] for t in range(n - tail + p, n)):
            continue
        begin = n - tail
        while begin > 0 and row[begin - 1] == row[begin - 1 + p]:
            begin -= 1
        return begin + p
    return None
