"""Greedy decoding over filled per-layer caches, free of host synchronisation inside the step.

Every value a step reads lives on the device (token, step counter, cache lengths, finished mask), so
on CUDA with the Triton split-K decode-attention kernel the whole step is captured once in a CUDA graph
and replayed; EOS is tracked on the device and the host only checks for "all finished" every
``check_every`` steps, and, with the loop guard on, reads the tokens back every ``LOOP_CHECK_EVERY``
steps once rows are ``loop_tokens`` long (greedy ASR loops hold a batch for hundreds of steps; the
read is one small copy between replays). On CPU the same step runs eagerly with masked SDPA over the
filled prefix.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor
from torch.nn import functional

from pipeline.decoding.policy import LOOP_CHECK_EVERY, loop_cut
from pipeline.engine.cache import LayerCaches
from pipeline.engine.stack import DecoderStack
from pipeline.kernels.decode_attention import decode_attention
from pipeline.kernels.fused import FUSED, StepOps
from pipeline.kernels.paths import attention_kernels_usable


class GreedyDecoder:
    """Decodes after prefill. ``run`` returns tokens [B, T] (pad after EOS) and the steps taken.

    prompt_lengths [B]: each row's prompt length (its next position); first_tokens [B]: the tokens
    prefill chose. Every row writes and attends at its own cache lengths (``caches.prefill_lengths``).
    loop_tokens: the loop guard of ``pipeline.decoding.policy`` (0: off): a row whose tokens end in one
    phrase repeated stops, and ``cuts`` says how many of its tokens it keeps.
    ops: the step's elementwise ops (``fused.FUSED``; benchmarks/decode_step.py passes the PyTorch twins).
    """

    def __init__(
        self,
        stack: DecoderStack,
        caches: LayerCaches,
        prompt_lengths: Tensor,
        first_tokens: Tensor,
        *,
        max_new_tokens: int,
        eos_token_ids: list[int],
        pad_token_id: int,
        loop_tokens: int = 0,
        ops: StepOps = FUSED,
    ) -> None:
        device = first_tokens.device
        batch = first_tokens.shape[0]
        self.stack, self.caches, self.ops = stack, caches, ops
        # The PyTorch decode attention reads the lengths on the host, which a graph cannot capture.
        self.use_graph = device.type == "cuda" and attention_kernels_usable(device, stack.head_dim)
        self.max_new_tokens = max_new_tokens
        self.pad = pad_token_id
        self.eos = torch.tensor(eos_token_ids, device=device)
        self.tokens = first_tokens.clone()
        self.step = torch.zeros((), dtype=torch.long, device=device)
        # Original positions: a row's next token sits at its prompt length however merging shortened it.
        self.position = prompt_lengths.to(device=device, dtype=torch.long).view(batch, 1).clone()
        self.finished = torch.isin(first_tokens, self.eos)
        self.out = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        self.out[:, 0] = first_tokens
        self.check_every = 16 if device.type == "cuda" else 1
        self.loop_tokens = loop_tokens
        self.cuts: dict[int, int] = {}  # row -> tokens it keeps, for rows the loop guard stopped

    def _forward(self) -> Tensor:
        """Logits [B, V] for the current token at the current position.

        Per layer: [add residual + RMSNorm] -> qkv GEMM -> [rope + cache write] -> decode
        attention -> o GEMM -> [add residual + RMSNorm] -> gate_up GEMM -> [silu * up] -> down GEMM;
        the bracketed steps are single Triton kernels on CUDA (``pipeline.kernels.fused``; their PyTorch
        twins elsewhere), so a captured step launches about ten kernels per layer, not thirty.
        """
        stack, caches, ops = self.stack, self.caches, self.ops
        batch = self.tokens.shape[0]
        cos, sin = stack.rope(self.position)  # [B, 1, 1, hd]: once per step, shared by all layers
        positions = caches.prefill_lengths + self.step  # [layers, B]: where each layer and row writes
        lengths = positions + 1  # keys each layer and row attends to, this token included
        x, residual = stack.embed_tokens(self.tokens), None  # [B, D]
        for i, layer in enumerate(stack.layers):
            norm = layer.attn_norm
            normed, residual = ops.add_rmsnorm(x, residual, norm.weight, norm.variance_epsilon)
            # The bias inside the GEMM (its epilogue), as in prefill: bf16 rounds once, not twice.
            qkv = functional.linear(normed, layer.qkv_weight, layer.qkv_bias)
            q = ops.rope_and_cache(qkv, cos, sin, caches.k[i], caches.v[i], positions[i])
            attn = decode_attention(q, caches.k[i], caches.v[i], lengths[i], stack.scale)
            x = layer.o(attn.view(batch, -1))
            norm = layer.mlp_norm
            normed, residual = ops.add_rmsnorm(x, residual, norm.weight, norm.variance_epsilon)
            x = layer.down(ops.silu_mul(functional.linear(normed, layer.gate_up_weight)))
        norm = stack.final_norm
        normed, _ = ops.add_rmsnorm(x, residual, norm.weight, norm.variance_epsilon)
        return stack.lm_head(normed).float()

    def _advance(self) -> None:
        token = self._forward().argmax(-1)
        self.step += 1
        self.position += 1
        self.out.index_copy_(1, self.step.view(1), torch.where(self.finished, self.pad, token)[:, None])
        self.finished |= torch.isin(token, self.eos)
        self.tokens.copy_(token)

    def _cut_loops(self, steps: int) -> None:
        """Stop the rows whose first ``steps`` tokens end in a loop (a host read of the tokens, every
        ``LOOP_CHECK_EVERY`` steps: a loop found late is cut back to its first phrase anyway)."""
        rows = (~self.finished).nonzero().flatten().tolist()
        tokens = self.out[rows, :steps].tolist()
        for b, generated in zip(rows, tokens, strict=True):
            cut = loop_cut(generated, self.loop_tokens)
            if cut is not None:
                self.cuts[b] = cut
                self.finished[b] = True

    @torch.inference_mode()
    def run(self) -> tuple[Tensor, int]:
        """Decode until every row hit EOS or the budget is spent -> (out [B, T], columns filled).

        Also sets ``steady_s`` / ``steady_steps``: wall time and count of the steps after warm-up and
        graph capture (all steps on CPU), the per-step cost a long generation converges to.
        """
        steps = 1
        graph = None
        t_steady, steady_from = time.perf_counter(), 1
        while steps < self.max_new_tokens:
            if steps % self.check_every == 0 and bool(self.finished.all()):
                break
            if self.loop_tokens and steps % LOOP_CHECK_EVERY == 0 and steps >= self.loop_tokens:
                self._cut_loops(steps)
            if graph is not None:
                graph.replay()
            elif self.use_graph and steps >= 3:  # two eager steps warm up kernels and allocator first
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    self._advance()
                torch.cuda.synchronize()
                t_steady, steady_from = time.perf_counter(), steps
                graph.replay()
            else:
                self._advance()
            steps += 1
        if self.out.device.type == "cuda":
            torch.cuda.synchronize()
        self.steady_s, self.steady_steps = time.perf_counter() - t_steady, steps - steady_from
        return self.out, steps
