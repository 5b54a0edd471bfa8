"""One static batch through the engine's runner: every row of the prompt groups admitted at once,
prefilled (merge-aware, each group in its own pass), decoded until the last row stops, timed.

What the model stage streams (``pipeline.models.speechlm``) is the same runner fed as windows arrive;
this is the call for a batch known up front (the oracle tests, ``jobs/generate.py``, the benchmarks).
Decoding continues at the original prompt length whatever the merges did, each row over its own cache
lengths, so windows of different lengths batch without padding and a row's tokens do not depend on
the other rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pipeline.decoding.scheduler import Request, Scheduler
from pipeline.device import sync
from pipeline.engine.plan import LayerPlan, plan_layers
from pipeline.engine.prefill import PromptGroup
from pipeline.engine.runner import EngineRunner, capacity, engine_policy
from pipeline.engine.stack import DecoderStack
from pipeline.merging.config import ReductionConfig


@dataclass
class Generation:
    """tokens [B, T] (after a row's last token: pad id), num_tokens [B] generated per row (EOS included;
    a row the loop guard stopped: the tokens it keeps); plans[b]: row b's layer plan (rows of one
    PromptGroup share it); loop_cuts: the rows the loop guard stopped; first_logits [B, V]: prefill's."""

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
    """Greedy decoding of every row of the prompt groups -> Generation, rows in group order.

    Rows stop at any EOS id, at the budget, or at the loop guard (``loop_tokens``; 0: off: see
    ``pipeline.decoding.policy``).
    """
    if not groups:
        raise ValueError("no prompts to generate from")
    policy = engine_policy(eos_token_ids, max_new_tokens, loop_tokens)
    plans = [plan_layers(g.length, g.spans, cfg, stack.num_layers) for g in groups]
    layer_capacity = [max(layer) for layer in zip(*(capacity(p, policy) for p in plans), strict=True)]
    rows = [(i, embeds) for i, g in enumerate(groups) for embeds in g.embeds]
    requests = [
        Request(key=b, work=None, state={"embeds": embeds, "spans": groups[i].spans, "group": i})
        for b, (i, embeds) in enumerate(rows)
    ]
    runner = EngineRunner(stack, len(requests), layer_capacity)
    scheduler = Scheduler(len(requests))
    scheduler.add(requests)
    sync(stack.device)
    start = time.perf_counter()
    runner.run(scheduler, policy, cfg, first_logits=True)
    sync(stack.device)
    wall = time.perf_counter() - start
    prefill_s = sum(r.state["prefill_s"] for r in requests)
    steps = max(len(r.generated) for r in requests)
    tokens = torch.full((len(requests), steps), pad_token_id, dtype=torch.long)
    for b, r in enumerate(requests):
        tokens[b, : len(r.generated)] = torch.tensor(r.generated)
    per_token = stack.kv_bytes_per_token()
    row_plans = [r.state["plan"] for r in requests]
    return Generation(
        tokens=tokens.to(stack.device),
        num_tokens=torch.tensor([len(r.generated) for r in requests], device=stack.device),
        plans=row_plans,
        prefill_s=prefill_s,
        decode_s=wall - prefill_s,
        kv_bytes_full=sum(p.prompt_length for p in row_plans) * stack.num_layers * per_token,
        kv_bytes_kept=sum(sum(p.cache_lengths) for p in row_plans) * per_token,
        steady_step_s=runner.steady_s / max(runner.steady_steps, 1),
        first_logits=torch.stack([r.state["first_logits"] for r in requests]),
        loop_cuts=[b for b, r in enumerate(requests) if r.finish == "loop"],
    )
