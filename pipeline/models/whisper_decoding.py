"""Greedy decoding (no timestamps) of Whisper over encoder outputs of different lengths, with language
detection for multilingual checkpoints.

Our own loop over the weights of transformers' ``WhisperDecoderLayer`` modules (as whisper_encoder.py
does for the encoder), with the same arithmetic, and what ``WhisperDecoder.forward`` lacks: a
cross-attention key mask, so that windows whose encoder outputs were shortened by different amounts
(merging) share one batch. Without reduction it decodes what ``WhisperForConditionalGeneration.generate``
decodes (same suppressions, same stopping rule, same pad after end-of-text). Language detection is the
one ``generate`` runs before it (``detect_language``): the logits after start-of-transcript alone, argmax
over the language tokens; here that first step stays in the cache and the prompt continues from it, so
the batch pays one extra decoder step, not a second pass over the encoder output.

Where the time goes on a CPU, and so the layout: a step reads every window's cross-attention keys and
values (1,500 positions per layer for a 30 s window), which outweighs the rest of the step at batch 16.
They are kept transposed, (hd, S) per head, so both products of a step read contiguous rows, which
beats SDPA's CPU kernel for one query over a decoder batch (no benchmark folder records it: compare
against ``F.scaled_dot_product_attention`` before changing the layout); the self-attention cache is
preallocated and written in place. Windows that have finished leave the batch (``generate`` keeps computing their padding): rows are
independent, so the rows kept compute what they would have, and a batch whose windows finish at
different lengths stops paying for the finished ones.

One deliberate departure, ``DecodeOptions.loop_tokens``: greedy Whisper without timestamps falls into
loops (the same phrase again and again up to the 448-token limit), which both insert garbage and hold
the whole batch for hundreds of steps. A row whose last tokens are one phrase repeated (see
``_loop_start``) is cut after the phrase's first occurrence and stops. Rows that never loop decode
exactly as ``generate`` does; ``loop_tokens=0`` turns the guard off.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.device import sync
from pipeline.models.whisper_encoder import split_heads

if TYPE_CHECKING:  # transformers' modeling modules take seconds to import; describing a model needs none
    from transformers import WhisperForConditionalGeneration
    from transformers.models.whisper.modeling_whisper import WhisperDecoderLayer


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
# Finished windows leave the batch once they are at least 1/_COMPACT_WHEN of it: a step's cost is per row
# (the cross-attention reads each row's encoder K/V, the output projection each row's logits), and
# dropping rows copies the cache of the rows kept, about one step's cross-attention reads.
_COMPACT_WHEN = 8


@dataclass
class DecodeResult:
    """tokens: per window, generated ids up to and including end-of-text (if reached).

    languages: per window, the detected language token (None when options.detect is empty).
    loops: indices of the windows the loop guard cut.
    logprobs: per window, the log-probability of each generated token under the distribution it was
    chosen from; cross: the windows' cross K/V (both only when ``greedy_decode`` was asked to keep them).
    first_step_s: the prompt step(s) up to the first generated token (language detection included), which
    also project the encoder outputs to cross-attention K/V. rest_s: all later steps.
    """

    tokens: list[list[int]]
    first_step_s: float
    rest_s: float
    languages: list[int] | None = None
    loops: list[int] = field(default_factory=list)
    logprobs: list[list[float]] | None = None
    cross: CrossKV | None = None


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


class _Cache:
    """Per decoder layer: self-attention keys/values (B, H, max_length, hd), written in place; the
    encoder outputs' cross-attention keys and values, transposed (B, H, hd, S); ``bias`` (B, 1, 1, S)
    additive, -inf on padding keys (None when no window is shorter than the batch's encoder output)."""

    def __init__(self, layers: int, batch: int, heads: int, head_dim: int, length: int, like: Tensor) -> None:
        shape = (batch, heads, length, head_dim)
        self.keys = [like.new_empty(shape) for _ in range(layers)]
        self.values = [like.new_empty(shape) for _ in range(layers)]
        self.cross_keys: list[Tensor] = []
        self.cross_values: list[Tensor] = []
        self.bias: Tensor | None = None
        self.length = 0

    def keep(self, rows: Tensor) -> None:
        """Only these batch rows from now on."""
        for tensors in (self.keys, self.values, self.cross_keys, self.cross_values):
            tensors[:] = [t[rows] for t in tensors]
        self.bias = None if self.bias is None else self.bias[rows]


def _self_attention(layer: WhisperDecoderLayer, x: Tensor, cache: _Cache, i: int) -> Tensor:
    attn = layer.self_attn
    past, new = cache.length, x.shape[1]
    h = layer.self_attn_layer_norm(x)
    q = split_heads(attn.q_proj(h) * attn.scaling, attn.num_heads)
    cache.keys[i][:, :, past : past + new] = split_heads(attn.k_proj(h), attn.num_heads)
    cache.values[i][:, :, past : past + new] = split_heads(attn.v_proj(h), attn.num_heads)
    k, v = cache.keys[i][:, :, : past + new], cache.values[i][:, :, : past + new]
    mask = None
    if past and new > 1:  # several tokens after cached ones: SDPA's is_causal would align top-left
        keys, queries = (
            torch.arange(past + new, device=x.device),
            torch.arange(past, past + new, device=x.device),
        )
        mask = keys[None, :] <= queries[:, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=not past and new > 1, scale=1.0)
    return x + attn.out_proj(out.transpose(1, 2).reshape(x.shape))


def _cross_weights(layer: WhisperDecoderLayer, x: Tensor, cache: _Cache, i: int) -> Tensor:
    """Layer i's cross-attention weights (B, H, T, S) for hidden states x (B, T, D)."""
    attn = layer.encoder_attn
    h = layer.encoder_attn_layer_norm(x)
    q = split_heads(attn.q_proj(h) * attn.scaling, attn.num_heads)
    scores = q @ cache.cross_keys[i]  # (B, H, T, S)
    if cache.bias is not None:
        scores = scores + cache.bias
    return scores.float().softmax(dim=-1).to(q.dtype)  # fp32 softmax, as SDPA's kernels


def _cross_attention(
    layer: WhisperDecoderLayer, x: Tensor, cache: _Cache, i: int, weights: Tensor | None = None
) -> Tensor:
    weights = _cross_weights(layer, x, cache, i) if weights is None else weights
    out = cache.cross_values[i] @ weights.transpose(-1, -2)  # (B, H, hd, T)
    return x + layer.encoder_attn.out_proj(out.permute(0, 3, 1, 2).reshape(x.shape))


def _project_encoder(
    model: WhisperForConditionalGeneration, states: Tensor
) -> tuple[list[Tensor], list[Tensor]]:
    """Every decoder layer's cross-attention keys and values of the encoder outputs, transposed
    ((B, H, hd, S) each)."""
    keys, values = [], []
    for layer in model.model.decoder.layers:
        attn = layer.encoder_attn
        for proj, out in ((attn.k_proj, keys), (attn.v_proj, values)):
            out.append(
                proj(states).view(*states.shape[:2], attn.num_heads, -1).permute(0, 2, 3, 1).contiguous()
            )
    return keys, values


def _step(model: WhisperForConditionalGeneration, ids: Tensor, cache: _Cache) -> Tensor:
    """One decoder call. ids (B, T) -> next-token logits (B, vocab) of the last position."""
    decoder = model.model.decoder
    positions = torch.arange(cache.length, cache.length + ids.shape[1], device=ids.device)
    hidden = decoder.embed_tokens(ids) + decoder.embed_positions.weight[positions]
    for i, layer in enumerate(decoder.layers):
        hidden = _self_attention(layer, hidden, cache, i)
        hidden = _mlp(layer, _cross_attention(layer, hidden, cache, i))
    cache.length += ids.shape[1]
    return _vocab_logits(model.proj_out, decoder.layer_norm(hidden[:, -1]))


def _mlp(layer: WhisperDecoderLayer, hidden: Tensor) -> Tensor:
    return hidden + layer.fc2(layer.activation_fn(layer.fc1(layer.final_layer_norm(hidden))))


@dataclass(frozen=True)
class CrossKV:
    """The windows' cross-attention keys and values as ``greedy_decode`` projected them (per decoder
    layer, (B, H, hd, S)) and their padding bias, kept for the alignment pass (``alignment_weights``)."""

    keys: list[Tensor]
    values: list[Tensor]
    bias: Tensor | None


@torch.inference_mode()
def cross_kv(model: WhisperForConditionalGeneration, states: Tensor, key_bias: Tensor | None) -> CrossKV:
    """The cross K/V of encoder outputs ``states`` (B, S, D) with their ``key_bias`` (B, S) or None, as
    ``greedy_decode`` projects them: what ``alignment_weights`` reads."""
    keys, values = _project_encoder(model, states)
    return CrossKV(keys, values, None if key_bias is None else key_bias.to(states)[:, None, None])


@torch.inference_mode()
def alignment_weights(
    model: WhisperForConditionalGeneration, cross: CrossKV, ids: Tensor, heads: list[tuple[int, int]]
) -> Tensor:
    """One teacher-forced decoder pass of ids (B, T) (each row its prompt and decided tokens, padded at
    the end, which causal attention keeps from the rows' real tokens) over the windows' cross K/V.

    Returns the cross-attention weights of ``heads`` ((layer, head) pairs) as (B, len(heads), T, S)
    float32; layers after the last one holding a head are not run.
    """
    config = model.config
    heads_dim = config.d_model // config.decoder_attention_heads
    batch, length = ids.shape
    cache = _Cache(
        config.decoder_layers, batch, config.decoder_attention_heads, heads_dim, length, cross.keys[0]
    )
    cache.cross_keys, cache.cross_values, cache.bias = cross.keys, cross.values, cross.bias
    decoder = model.model.decoder
    hidden = decoder.embed_tokens(ids) + decoder.embed_positions.weight[:length]
    last = max(layer for layer, _ in heads)
    picked: dict[tuple[int, int], Tensor] = {}
    for i, layer in enumerate(decoder.layers[: last + 1]):
        hidden = _self_attention(layer, hidden, cache, i)
        weights = _cross_weights(layer, hidden, cache, i)
        picked |= {(li, h): weights[:, h].float() for li, h in heads if li == i}
        if i < last:
            hidden = _mlp(layer, _cross_attention(layer, hidden, cache, i, weights))
    return torch.stack([picked[head] for head in heads], dim=1)


def _vocab_logits(proj: nn.Module, h: Tensor) -> Tensor:
    """h (B, D) -> logits (B, vocab). A float projection computes them as ``weight @ h.T``, (vocab, B),
    returned transposed: for a small decoder batch CPU sgemm takes that shape faster than
    ``h @ weight.T`` (benchmarks/cpu-peer-longform-dev/README.md), and this product is the largest of a
    step. Quantized projections (int8) are called as they are."""
    if isinstance(proj, nn.Linear) and proj.bias is None:
        return (proj.weight @ h.T).T
    return proj(h)


@torch.inference_mode()
def greedy_decode(
    model: WhisperForConditionalGeneration,
    encoder_states: torch.Tensor,
    key_bias: torch.Tensor | None,
    options: DecodeOptions,
    max_new_tokens: int | None = None,
    keep_for_timing: bool = False,
) -> DecodeResult:
    """Greedy decode B windows.

    encoder_states: (B, S, D); key_bias: (B, S) added to the cross-attention logits (-inf on a row's
    padding, the log of its size on a merged padding token: ``EncoderOutput.key_bias``) or None. max_new_tokens: at most this many generated tokens (default: up to max_length);
    0 with options.detect runs language detection only. keep_for_timing: also return the tokens'
    log-probabilities and the cross K/V (what word timing needs; the decoded tokens are the same).
    """
    batch = encoder_states.shape[0]
    device = encoder_states.device
    suppress = torch.tensor(options.suppress, dtype=torch.long, device=device)
    begin_suppress = torch.tensor(options.begin_suppress, dtype=torch.long, device=device)
    prompt_length = len(options.prompt) + bool(options.detect)
    steps = options.max_length - prompt_length
    steps = steps if max_new_tokens is None else min(steps, max_new_tokens)
    config = model.config
    cache = _Cache(
        config.decoder_layers,
        batch,
        config.decoder_attention_heads,
        config.d_model // config.decoder_attention_heads,
        prompt_length + steps,
        encoder_states,
    )
    ids = torch.tensor([options.prompt] * batch, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    generated = []
    languages = None
    sync(device)
    start = time.perf_counter()
    projected = cross_kv(model, encoder_states, key_bias)
    cache.cross_keys, cache.cross_values, cache.bias = (
        list(projected.keys),
        list(projected.values),
        projected.bias,
    )
    cross = projected if keep_for_timing else None
    logprobs: list[Tensor] = []
    first_step_s = 0.0
    if options.detect:
        logits = _step(model, ids[:, :1], cache)
        candidates = torch.tensor(options.detect, dtype=torch.long, device=device)
        languages = candidates[logits[:, candidates].argmax(dim=-1)]
        ids = torch.cat([languages[:, None], ids[:, 1:]], dim=1)
    cuts: dict[int, int] = {}  # row -> generated length kept, for rows the loop guard stopped
    rows = torch.arange(batch, device=device)  # the windows still in the decoder's batch
    for step in range(steps):
        logits = _step(model, ids, cache)
        logits[:, suppress] = -float("inf")
        if step == 0:
            logits[:, begin_suppress] = -float("inf")
        next_ids = torch.full((batch,), options.pad, dtype=torch.long, device=device)
        chosen = logits.argmax(dim=-1)
        next_ids[rows] = torch.where(finished[rows], options.pad, chosen)
        if keep_for_timing:
            logprob = logits.gather(1, chosen[:, None])[:, 0].float() - logits.float().logsumexp(-1)
            logprobs.append(torch.zeros(batch, device=device).index_put((rows,), logprob))
        finished |= next_ids == options.eos
        generated.append(next_ids)
        if step == 0:
            sync(device)
            first_step_s = time.perf_counter() - start
        if options.loop_tokens and (step + 1) % _LOOP_CHECK_EVERY == 0:
            finished |= _cut_loops(generated, finished, options.loop_tokens, cuts)
        if bool(finished.all()):
            break
        live = ~finished[rows]
        if int((~live).sum()) * _COMPACT_WHEN >= len(rows):
            keep = live.nonzero().flatten()
            rows = rows[keep]
            cache.keep(keep)
        ids = next_ids[rows][:, None]
    sync(device)
    if not generated:  # detection only: its step is the first
        first_step_s = time.perf_counter() - start
    rest_s = time.perf_counter() - start - first_step_s
    rows = torch.stack(generated, dim=1).tolist() if generated else [[] for _ in range(batch)]
    tokens = [row[: cuts[b]] if b in cuts else _until_eos(row, options.eos) for b, row in enumerate(rows)]
    kept_logprobs = None
    if keep_for_timing:
        table = torch.stack(logprobs, dim=1).tolist() if logprobs else [[] for _ in range(batch)]
        kept_logprobs = [row[: len(t)] for row, t in zip(table, tokens, strict=True)]
    return DecodeResult(
        tokens,
        first_step_s,
        rest_s,
        None if languages is None else languages.tolist(),
        sorted(cuts),
        kept_logprobs,
        cross,
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
