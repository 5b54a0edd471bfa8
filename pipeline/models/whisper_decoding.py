"""Greedy decoding (no timestamps) of Whisper over encoder outputs of different lengths, with language
detection for multilingual checkpoints.

The decoder's own layer modules and transformers' EncoderDecoderCache do the work; this loop only adds
what ``WhisperDecoder.forward`` lacks: a cross-attention key mask, so that windows whose encoder outputs
were shortened by different amounts (merging) share one batch. When every window has the same encoder
length no mask is passed, and the arithmetic is exactly that of ``WhisperForConditionalGeneration.generate``
(same suppressions, same stopping rule, same pad after end-of-text). Language detection is the one
``generate`` runs before it (``detect_language``): the logits after start-of-transcript alone, argmax over
the language tokens; here that first step stays in the cache and the prompt continues from it, so the
batch pays one extra decoder step, not a second pass over the encoder output.

One deliberate departure, ``DecodeOptions.loop_tokens``: greedy Whisper without timestamps falls into
loops (the same phrase again and again up to the 448-token limit), which both insert garbage and hold
the whole batch for hundreds of steps. A row whose last tokens are one phrase repeated (see
``_loop_start``) is cut after the phrase's first occurrence and stops. Rows that never loop decode
exactly as ``generate`` does; ``loop_tokens=0`` turns the guard off.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import WhisperForConditionalGeneration
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from pipeline.device import sync


@dataclass(frozen=True)
class DecodeOptions:
    """Token ids steering greedy decoding.

    prompt: tokens fed first (English-only: start-of-transcript, no-timestamps; multilingual:
    start-of-transcript, language, task, no-timestamps).
    detect: language token ids to choose among per window; when given, the prompt lacks the language,
    which the first step (start-of-transcript alone) picks and which is inserted after prompt[0].
    suppress: ids never generated; begin_suppress: ids not generated as the first token.
    max_length: total decoder length including the prompt (the decoder's position table size).
    loop_tokens: a row stops once its last ``loop_tokens`` or more generated tokens are one phrase of at
    most ``MAX_LOOP_PERIOD`` tokens repeated three or more times; 0: never (``generate``'s behaviour).
    """

    prompt: tuple[int, ...]
    eos: int
    pad: int
    suppress: tuple[int, ...]
    begin_suppress: tuple[int, ...]
    max_length: int
    detect: tuple[int, ...] = ()
    loop_tokens: int = 0


# Longest repeated phrase the loop guard looks for; loops seen on real speech repeat one sentence.
MAX_LOOP_PERIOD = 64
# How often (decoder steps) the guard looks: a loop found late is cut back to its first phrase anyway.
_LOOP_CHECK_EVERY = 8


@dataclass
class DecodeResult:
    """tokens: per window, generated ids up to and including end-of-text (if reached).

    languages: per window, the detected language token (None when options.detect is empty).
    loops: indices of the windows the loop guard cut.
    first_step_s: the prompt step(s) up to the first generated token (language detection included), which
    also project the encoder outputs to cross-attention K/V. rest_s: all later steps.
    """

    tokens: list[list[int]]
    first_step_s: float
    rest_s: float
    languages: list[int] | None = None
    loops: list[int] = field(default_factory=list)


def _loop_start(row: list[int], loop_tokens: int) -> int | None:
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


def _step(
    model: WhisperForConditionalGeneration,
    ids: torch.Tensor,
    encoder_states: torch.Tensor,
    cross_mask: torch.Tensor | None,
    cache: EncoderDecoderCache,
) -> torch.Tensor:
    """One decoder call. ids (B, T) -> next-token logits (B, vocab) of the last position."""
    decoder = model.model.decoder
    past = cache.get_seq_length()
    positions = torch.arange(past, past + ids.shape[1], device=ids.device)
    hidden = decoder.embed_tokens(ids) + decoder.embed_positions.weight[positions]
    mask = None
    if past and ids.shape[1] > 1:  # several tokens after a cached one: SDPA's is_causal would align top-left
        keys = torch.arange(past + ids.shape[1], device=ids.device)
        mask = torch.zeros(len(positions), len(keys), dtype=hidden.dtype, device=ids.device)
        mask = mask.masked_fill(keys[None, :] > positions[:, None], -float("inf"))[None, None]
    for layer in decoder.layers:
        hidden = layer(hidden, mask, encoder_states, encoder_attention_mask=cross_mask, past_key_values=cache)
    return model.proj_out(decoder.layer_norm(hidden[:, -1]))


@torch.inference_mode()
def greedy_decode(
    model: WhisperForConditionalGeneration,
    encoder_states: torch.Tensor,
    lengths: torch.Tensor,
    options: DecodeOptions,
    max_new_tokens: int | None = None,
) -> DecodeResult:
    """Greedy decode B windows.

    encoder_states: (B, S, D), window b valid in [0, lengths[b]) (the rest is padding never attended).
    lengths: (B,) int. max_new_tokens: at most this many generated tokens (default: up to max_length);
    0 with options.detect runs language detection only.
    """
    batch, seq, _ = encoder_states.shape
    device = encoder_states.device
    cross_mask = None
    if bool((lengths != seq).any()):
        cross_mask = (torch.arange(seq, device=device)[None, :] < lengths.to(device)[:, None])[
            :, None, None, :
        ]
    suppress = torch.tensor(options.suppress, dtype=torch.long, device=device)
    begin_suppress = torch.tensor(options.begin_suppress, dtype=torch.long, device=device)
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    ids = torch.tensor([options.prompt] * batch, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    generated = []
    languages = None
    sync(device)
    start = time.perf_counter()
    first_step_s = 0.0
    if options.detect:
        logits = _step(model, ids[:, :1], encoder_states, cross_mask, cache)
        candidates = torch.tensor(options.detect, dtype=torch.long, device=device)
        languages = candidates[logits[:, candidates].argmax(dim=-1)]
        ids = torch.cat([languages[:, None], ids[:, 1:]], dim=1)
    prompt_length = len(options.prompt) + bool(options.detect)
    steps = options.max_length - prompt_length
    cuts: dict[int, int] = {}  # row -> generated length kept, for rows the loop guard stopped
    for step in range(steps if max_new_tokens is None else min(steps, max_new_tokens)):
        logits = _step(model, ids, encoder_states, cross_mask, cache)
        logits[:, suppress] = -float("inf")
        if step == 0:
            logits[:, begin_suppress] = -float("inf")
        next_ids = torch.where(finished, options.pad, logits.argmax(dim=-1))
        finished |= next_ids == options.eos
        generated.append(next_ids)
        ids = next_ids[:, None]
        if step == 0:
            sync(device)
            first_step_s = time.perf_counter() - start
        if options.loop_tokens and (step + 1) % _LOOP_CHECK_EVERY == 0:
            finished |= _cut_loops(generated, finished, options.loop_tokens, cuts)
        if bool(finished.all()):
            break
    sync(device)
    if not generated:  # detection only: its step is the first
        first_step_s = time.perf_counter() - start
    rest_s = time.perf_counter() - start - first_step_s
    rows = torch.stack(generated, dim=1).tolist() if generated else [[] for _ in range(batch)]
    return DecodeResult(
        [row[: cuts[b]] if b in cuts else _until_eos(row, options.eos) for b, row in enumerate(rows)],
        first_step_s,
        rest_s,
        None if languages is None else languages.tolist(),
        sorted(cuts),
    )


def _cut_loops(
    generated: list[torch.Tensor], finished: torch.Tensor, loop_tokens: int, cuts: dict[int, int]
) -> torch.Tensor:
    """Rows (B,) bool that just fell into a loop; records where each is cut in ``cuts``."""
    looping = torch.zeros_like(finished)
    if len(generated) < loop_tokens:
        return looping
    window = min(len(generated), loop_tokens + 3 * MAX_LOOP_PERIOD)  # enough to see any loop's tail
    tails = torch.stack(generated[-window:], dim=1).tolist()
    offset = len(generated) - window
    for b in (~finished).nonzero().flatten().tolist():
        cut = _loop_start(tails[b], loop_tokens)
        if cut is not None:
            cuts[b] = offset + cut
            looping[b] = True
    return looping


def _until_eos(row: list[int], eos: int) -> list[int]:
    return row[: row.index(eos) + 1] if eos in row else row
