"""Continuous batching for the decoder-only SpeechLMs: a decode step over the running rows of caches
allocated once, and merge-aware prefill of arriving windows into free slots while the others decode.

Whisper's runner (pipeline/models/whisper_runner.py) has the same shape, scheduler and policy
(pipeline/decoding/): requests wait, are admitted into free slots and prefill there (the prompt through
every layer at once, merged as its plan says: pipeline/engine/prefill.py, the rows that share a prompt
shape in one pass); then each step feeds every running row its last token at its own position, and
every row writes and reads its own cache lengths. A row retires at the step it stops and the last
running row moves into its slot, so a step computes on the first rows of the buffers alone.

Every value a step reads lives on the device (tokens, positions, steps, cache lengths), so on CUDA with
the Triton kernels the step is captured once per batch-size bucket (powers of two up to the slots) and
replayed: a refill changes how many rows run, never a graph. A bucket's rows past the running ones
compute on what their free slots hold and write only there.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.nn import functional

from pipeline.decoding.policy import DecodePolicy, choose
from pipeline.decoding.scheduler import Request, Scheduler
from pipeline.device import sync
from pipeline.engine.cache import LayerCaches
from pipeline.engine.plan import LayerPlan, plan_layers
from pipeline.engine.prefill import PromptGroup, prefill_group
from pipeline.engine.stack import DecoderStack
from pipeline.kernels.decode_attention import decode_attention
from pipeline.kernels.fused import FUSED, StepOps
from pipeline.kernels.paths import attention_kernels_usable
from pipeline.merging.config import ReductionConfig


def engine_policy(eos_token_ids: Sequence[int], max_new_tokens: int, loop_tokens: int) -> DecodePolicy:
    """The decoding policy of a prefilled row: no prompt to feed, no suppressions, any of ``eos_token_ids``
    ends it, at most ``max_new_tokens``; loop_tokens: the loop guard (0: off)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    return DecodePolicy(
        prompt=(),
        eos=tuple(eos_token_ids),
        suppress=(),
        begin_suppress=(),
        max_length=max_new_tokens,
        loop_tokens=loop_tokens,
    )


def capacity(plan: LayerPlan, policy: DecodePolicy) -> list[int]:
    """Cache positions per layer a row of ``plan`` needs: its prefill, then its decode budget."""
    return [n + policy.budget for n in plan.cache_lengths]


def _buckets(slots: int) -> list[int]:
    return sorted({min(1 << i, slots) for i in range(slots.bit_length() + 1)})


class EngineRunner:
    """``slots`` rows of caches holding ``layer_capacity[i]`` positions in layer i, for one stack.

    ops: the step's elementwise ops (``fused.FUSED``; benchmarks/decode_step.py passes the PyTorch twins).
    """

    def __init__(
        self, stack: DecoderStack, slots: int, layer_capacity: Sequence[int], ops: StepOps = FUSED
    ) -> None:
        device = stack.device
        self.stack, self.ops = stack, ops
        self.caches = LayerCaches(
            slots, layer_capacity, stack.num_kv_heads, stack.head_dim, stack.dtype, device
        )
        # What each slot feeds next: its token, that token's position in the prompt's numbering (the
        # prompt's length plus the tokens before it, however merging shortened the caches) and its step
        # (tokens fed since prefill: it writes past each layer's prefill by that much).
        self.tokens = torch.zeros(slots, dtype=torch.long, device=device)
        self.positions = torch.zeros(slots, dtype=torch.long, device=device)
        self.steps = torch.zeros(slots, dtype=torch.long, device=device)
        # The PyTorch decode attention reads the lengths on the host, which a graph cannot capture.
        self.use_graph = device.type == "cuda" and attention_kernels_usable(device, stack.head_dim)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        # Steps after warm-up and capture (every step on CPU): the per-step cost a long run converges to.
        self.steady_s, self.steady_steps = 0.0, 0

    @property
    def slots(self) -> int:
        return self.caches.slots

    def holds(self, layer_capacity: Sequence[int]) -> bool:
        """Whether a row needing ``layer_capacity`` positions per layer fits a slot."""
        return all(n <= c for n, c in zip(layer_capacity, self.caches.capacity, strict=True))

    def _forward(self, n: int) -> Tensor:
        """Logits [n, V] of the first n slots' tokens, each at its own position and cache lengths.

        Per layer: [add residual + RMSNorm] -> qkv GEMM -> [rope + cache write] -> decode attention ->
        o GEMM -> [add residual + RMSNorm] -> gate_up GEMM -> [silu * up] -> down GEMM; the bracketed
        steps are single Triton kernels on CUDA (``pipeline.kernels.fused``; their PyTorch twins
        elsewhere), so a captured step launches about ten kernels per layer, not thirty.
        """
        stack, caches, ops = self.stack, self.caches, self.ops
        cos, sin = stack.rope(self.positions[:n, None])  # [n, 1, 1, hd]: once per step, for all layers
        written = caches.lengths[:, :n] + self.steps[:n]  # [layers, n]: where each layer and row writes
        lengths = written + 1  # keys each layer and row attends to, this token included
        x, residual = stack.embed_tokens(self.tokens[:n]), None  # [n, D]
        for i, layer in enumerate(stack.layers):
            k, v = caches.k[i][:n], caches.v[i][:n]
            norm = layer.attn_norm
            normed, residual = ops.add_rmsnorm(x, residual, norm.weight, norm.variance_epsilon)
            # The bias inside the GEMM (its epilogue), as in prefill: bf16 rounds once, not twice.
            qkv = functional.linear(normed, layer.qkv_weight, layer.qkv_bias)
            q = ops.rope_and_cache(qkv, cos, sin, k, v, written[i])
            attn = decode_attention(q, k, v, lengths[i], stack.scale)
            x = layer.o(attn.view(n, -1))
            norm = layer.mlp_norm
            normed, residual = ops.add_rmsnorm(x, residual, norm.weight, norm.variance_epsilon)
            x = layer.down(ops.silu_mul(functional.linear(normed, layer.gate_up_weight)))
        norm = stack.final_norm
        normed, _ = ops.add_rmsnorm(x, residual, norm.weight, norm.variance_epsilon)
        return stack.lm_head(normed).float()

    def step(self, n: int) -> Tensor:
        """One decode step of the first n slots (``tokens``, ``positions``, ``steps`` set) -> logits [n, V]."""
        if not self.use_graph:
            return self._forward(n)
        bucket = next(b for b in _buckets(self.slots) if b >= n)
        if bucket not in self._graphs:
            self._forward(bucket)  # eagerly first: kernels compiled and tuned outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self._forward(bucket)
            self._graphs[bucket] = graph, out
        graph, out = self._graphs[bucket]
        graph.replay()
        return out[:n]

    @torch.inference_mode()
    def run(
        self,
        scheduler: Scheduler,
        policy: DecodePolicy,
        reduction: ReductionConfig,
        encode: Callable[[list[Request]], None] | None = None,
        done: Callable[[Request], None] | None = None,
        first_logits: bool = False,
    ) -> None:
        """Decode every request of ``scheduler`` until its queue drains and its feed is exhausted.

        A request's ``state`` holds "embeds" [L, D] (its prompt's embeddings, audio in place), "spans"
        and "group" (requests of one group share the prompt's length and spans and prefill together);
        encode(admitted) sets them for the admitted requests that lack them. Each request then gains
        "plan" (its merge plan), "prefill_s" and "decode_s" (its shares of the passes it was in) and, with
        ``first_logits``, its prefill's logits. done(request): a request finished.
        """
        if scheduler.slots > self.slots:
            raise ValueError(f"the scheduler has {scheduler.slots} slots, the runner {self.slots}")
        device = self.stack.device
        suppress, begin_suppress = policy.masks(device)
        while scheduler.pending():
            admitted = scheduler.admit()
            while admitted:  # rows that stop at their first token free their slots before the step
                todo = [r for r in admitted if "embeds" not in r.state]
                if todo and encode is not None:
                    encode(todo)
                stopped = self._prefill(admitted, policy, reduction, suppress, begin_suppress, first_logits)
                for r in stopped:
                    self._retire(scheduler, r, done)
                admitted = scheduler.admit() if stopped else []
            running = scheduler.running
            if not running:
                continue
            n, captured = len(running), len(self._graphs)
            start = time.perf_counter()
            self.tokens[:n] = torch.tensor([r.generated[-1] for r in running])
            self.positions[:n] = torch.tensor([r.fed for r in running])
            self.steps[:n] = torch.tensor([r.fed - r.state["plan"].prompt_length for r in running])
            logits = self.step(n)
            scheduler.step()
            for r in running:
                r.fed += 1
            first = torch.zeros(n, dtype=torch.bool, device=device)
            picked = choose(logits, first, suppress, begin_suppress).tolist()
            elapsed = time.perf_counter() - start
            if len(self._graphs) == captured:
                self.steady_s, self.steady_steps = self.steady_s + elapsed, self.steady_steps + 1
            stopped = []
            for r, token in zip(running, picked, strict=True):
                r.state["decode_s"] += elapsed / n
                if policy.take(r, token):
                    stopped.append(r)
            for r in stopped:
                self._retire(scheduler, r, done)

    def _prefill(
        self,
        admitted: list[Request],
        policy: DecodePolicy,
        reduction: ReductionConfig,
        suppress: Tensor,
        begin_suppress: Tensor,
        first_logits: bool,
    ) -> list[Request]:
        """The admitted requests' prompts into their slots, a pass per group; each takes its first
        token. Returns those that stopped there."""
        groups: dict[object, list[Request]] = {}
        for r in admitted:
            groups.setdefault(r.state["group"], []).append(r)
        stopped = []
        for members in groups.values():
            start = time.perf_counter()
            group = PromptGroup(
                torch.stack([r.state.pop("embeds") for r in members]), list(members[0].state["spans"])
            )
            plan = plan_layers(group.length, group.spans, reduction, self.stack.num_layers)
            if not self.holds(capacity(plan, policy)):
                raise ValueError(
                    f"a {group.length}-token prompt needs {capacity(plan, policy)} cache positions per layer; "
                    f"a slot holds {self.caches.capacity}"
                )
            logits = prefill_group(self.stack, group, reduction, plan, self.caches, [r.slot for r in members])
            first = torch.ones(len(members), dtype=torch.bool, device=logits.device)
            kept = logits.clone() if first_logits else None  # choose suppresses in place
            picked = choose(logits, first, suppress, begin_suppress).tolist()
            sync(logits.device)
            share = (time.perf_counter() - start) / len(members)
            for b, (r, token) in enumerate(zip(members, picked, strict=True)):
                r.fed = plan.prompt_length
                r.state |= {"plan": plan, "prefill_s": share, "decode_s": 0.0}
                if kept is not None:
                    r.state["first_logits"] = kept[b]
                if policy.take(r, token):
                    stopped.append(r)
        return stopped

    def _retire(self, scheduler: Scheduler, request: Request, done: Callable[[Request], None] | None) -> None:
        if done is not None:
            done(request)
        moved = scheduler.retire(request)
        if moved is not None:
            row = scheduler.running[moved[1]]  # the last running row, now in the freed slot
            self.caches.move(*moved, row.fed - row.state["plan"].prompt_length)
