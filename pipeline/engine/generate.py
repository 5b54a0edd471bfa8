"""Generation over a ``DecoderStack``: merge-aware prefill (``prefill``), then greedy decoding
(``decode``), timed.

Decoding continues at the original prompt length whatever the merges did. Prompt groups
(``PromptGroup``) prefill apart, then all rows decode in one batch, every row over its own cache
lengths, so windows of different lengths batch without padding.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pipeline.device import sync
from pipeline.engine.decode import GreedyDecoder
from pipeline.engine.plan import LayerPlan
from pipeline.engine.prefill import PromptGroup, prefill
from pipeline.engine.stack import DecoderStack
from pipeline.merging.config import ReductionConfig


@dataclass
class Generation:
    """tokens [B, T] (after EOS: pad id), num_tokens [B] generated per row (EOS included; a row the
    loop guard stopped: the tokens it keeps); plans[b]: row b's layer plan (rows of one PromptGroup
    share it); loop_cuts: the rows the loop guard stopped."""

    tokens: Tensor
    num_tokens: Tensor
    plans: list[LayerPlan]
    prefill_s: float = 0.0
    decode_s: float = 0.0
    kv_bytes_full: int = 0
    kv_bytes_kept: int = 0
    steady_step_s: float = 0.0  # per decode step once warmed up (after CUDA-graph capture on GPU)
    first_logits: Tensor | None = field(default=None, repr=False)
    loop_cuts: list[int] = field(default_factory=list)


@torch.inference_mode()
def generate(
    stack: DecoderStack,
    groups: list[PromptGroup],
    cfg: ReductionConfig,
    *,
    max_new_tokens: int,
    eos_token_ids: list[int],
    pad_token_id: int,
    loop_tokens: int = 0,
) -> Generation:
    """Greedy decoding of every row of the prompt groups, all rows in one decode batch.

    -> Generation with tokens [B, max_new_tokens or fewer], rows in group order. Groups of different
    lengths prefill apart and decode together, each row attending to its own cache lengths, so a
    row's tokens do not depend on the other rows. Rows stop at any EOS id; the loop ends when all
    rows have stopped or the budget is spent. loop_tokens: the loop guard (``GreedyDecoder``; 0: off).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    device = groups[0].embeds.device if groups else torch.device("cpu")
    sync(device)
    t0 = time.perf_counter()
    logits, caches, plans = prefill(stack, groups, cfg, max_new_tokens)
    tokens = logits.argmax(-1)
    sync(device)
    t1 = time.perf_counter()
    prompt_lengths = torch.tensor([g.length for g in groups for _ in range(g.rows)], device=device)
    decoder = GreedyDecoder(
        stack,
        caches,
        prompt_lengths,
        tokens,
        max_new_tokens=max_new_tokens,
        eos_token_ids=eos_token_ids,
        pad_token_id=pad_token_id,
        loop_tokens=loop_tokens,
    )
    out, steps = decoder.run()
    sync(device)
    t2 = time.perf_counter()
    eos = decoder.eos
    stopped_at = torch.where(torch.isin(out[:, :steps], eos), torch.arange(steps, device=device), steps).amin(
        -1
    )
    num_tokens = torch.clamp(stopped_at + 1, max=steps)
    for row, kept in decoder.cuts.items():
        num_tokens[row] = kept
    steps = int(num_tokens.max())
    return Generation(
        tokens=out[:, :steps],
        num_tokens=num_tokens,
        plans=plans,
        prefill_s=t1 - t0,
        decode_s=t2 - t1,
        kv_bytes_full=sum(g.rows * g.length for g in groups) * stack.num_layers * stack.kv_bytes_per_token(),
        kv_bytes_kept=caches.nbytes(),
        steady_step_s=decoder.steady_s / max(decoder.steady_steps, 1),
        first_logits=logits,
        loop_cuts=sorted(decoder.cuts),
    )
