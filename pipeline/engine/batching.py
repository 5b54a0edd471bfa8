"""Batching for decoder-only SpeechLMs: rows of (prompt ids, audio spans, audio embeddings) -> one
``generate`` call, and how many rows fit a device.

Rows with identical prompt ids (same text, same audio-token counts) form one prompt group and prefill
together; every row decodes in one batch over its own cache lengths, and results come back in the
rows' order. On CUDA a batch holds as many rows as the free memory allows under the reduction (merged
caches are shorter, so more fit); elsewhere a fixed number.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from pipeline.engine.generate import Generation, generate
from pipeline.engine.memory import footprint, free_device_bytes, max_batch
from pipeline.engine.prefill import PromptGroup
from pipeline.engine.stack import DecoderStack
from pipeline.kernels.paths import attention_kernels_usable
from pipeline.merging.config import ReductionConfig
from pipeline.merging.step import Span

CPU_BATCH_SIZE = 8  # rows per generate call off CUDA (no memory reading there; past this, little gain)


@dataclass(frozen=True)
class AudioPrompt:
    """One row: prompt token ids with placeholders where the audio goes, the placeholder spans, and
    one embedding [n_j, D] per span (n_j = that span's length)."""

    ids: tuple[int, ...]
    spans: tuple[Span, ...]
    audio: tuple[Tensor, ...]


def embed(stack: DecoderStack, ids: Tensor, spans: list[Span], audio: list[list[Tensor]]) -> Tensor:
    """ids [B, L]; audio[b][j] = clip j of row b -> input embeddings [B, L, D] with the audio in place."""
    embeds = stack.embed_tokens(ids.to(stack.device))
    for b, clips in enumerate(audio):
        for (s, e), clip in zip(spans, clips, strict=True):
            embeds[b, s:e] = clip.to(embeds.dtype)
    return embeds


@torch.inference_mode()
def generate_rows(
    stack: DecoderStack,
    rows: list[AudioPrompt],
    reduction: ReductionConfig,
    *,
    max_new_tokens: int,
    eos_token_ids: list[int],
    pad_token_id: int,
    loop_tokens: int = 0,
) -> Generation:
    """Greedy generation for every row in one decode batch; the Generation's rows follow ``rows``.
    loop_tokens: the loop guard (``pipeline.decoding.policy``; 0: off)."""
    reduction.check_layers(stack.num_layers)
    by_prompt: dict[tuple[tuple[int, ...], tuple[Span, ...]], list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        by_prompt[row.ids, row.spans].append(i)
    groups, order = [], []
    for (ids, spans), members in by_prompt.items():
        ids_t = torch.tensor([ids] * len(members))
        audio = [list(rows[i].audio) for i in members]
        groups.append(PromptGroup(embed(stack, ids_t, list(spans), audio), list(spans)))
        order += members
    gen = generate(
        stack,
        groups,
        reduction,
        max_new_tokens=max_new_tokens,
        eos_token_ids=eos_token_ids,
        pad_token_id=pad_token_id,
        loop_tokens=loop_tokens,
    )
    return _reorder(gen, order)


def _reorder(gen: Generation, order: list[int]) -> Generation:
    """gen's rows are in group order: row j of gen is input row order[j]. Back to input order."""
    back = torch.argsort(torch.tensor(order, device=gen.tokens.device))
    return replace(
        gen,
        tokens=gen.tokens[back],
        num_tokens=gen.num_tokens[back],
        plans=[gen.plans[i] for i in back.tolist()],
        first_logits=None if gen.first_logits is None else gen.first_logits[back],
        loop_cuts=sorted(order[row] for row in gen.loop_cuts),
    )


def fit_batch(
    stack: DecoderStack,
    length: int,
    spans: list[Span],
    reduction: ReductionConfig,
    max_new_tokens: int,
    batch_size: int | None = None,
) -> int:
    """Rows of a ``length``-token prompt with ``spans`` per generate call: on CUDA the largest batch
    whose caches and prefill activations fit the free memory (``pipeline.engine.memory``), at least 1
    and at most ``batch_size``; elsewhere ``batch_size`` or ``CPU_BATCH_SIZE``."""
    device = stack.device
    if device.type != "cuda":
        return batch_size or CPU_BATCH_SIZE
    need = footprint(
        stack,
        length,
        spans,
        reduction,
        max_new_tokens,
        fused_mass=attention_kernels_usable(device, stack.head_dim),
    )
    fit = max(1, max_batch(free_device_bytes(device), need))
    return min(fit, batch_size or fit)
