"""Greedy decoding over filled per-layer caches, free of host synchronisation inside the step.

Every value a step reads lives on the device (token, step counter, finished mask), so on CUDA with the
Triton decode-attention kernel the whole step is captured once in a CUDA graph and replayed; EOS is
tracked on the device and the host only checks for "all finished" every ``check_every`` steps. On CPU
(or without Triton) the same step runs eagerly with SDPA over the filled part of each cache.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from pipeline.engine.cache import LayerCaches
from pipeline.engine.decoder import DecoderStack

# decode_attention(q [B, H, hd], k_cache, v_cache [B, Hkv, capacity, hd], lengths, scale) -> [B, H, hd]
DecodeKernel = Callable[..., Tensor]


class GreedyDecoder:
    """Decodes after prefill. ``run`` returns tokens [B, T] (pad after EOS) and the steps taken."""

    def __init__(
        self,
        stack: DecoderStack,
        caches: LayerCaches,
        prompt_length: int,
        first_tokens: Tensor,
        *,
        max_new_tokens: int,
        eos_token_ids: list[int],
        pad_token_id: int,
        kernel: DecodeKernel | None = None,
        use_graph: bool = False,
    ) -> None:
        if use_graph and kernel is None:
            raise ValueError("CUDA-graph decoding needs the decode-attention kernel (lengths on the device)")
        device = first_tokens.device
        batch = first_tokens.shape[0]
        self.stack, self.caches, self.kernel, self.use_graph = stack, caches, kernel, use_graph
        self.max_new_tokens = max_new_tokens
        self.pad = pad_token_id
        self.eos = torch.tensor(eos_token_ids, device=device)
        self.tokens = first_tokens.clone()
        self.step = torch.zeros(1, dtype=torch.long, device=device)
        self.position = torch.full((batch, 1), prompt_length, dtype=torch.long, device=device)
        self.finished = torch.isin(first_tokens, self.eos)
        self.out = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        self.out[:, 0] = first_tokens
        self.check_every = 16 if device.type == "cuda" else 1

    def _forward(self, host_step: int | None) -> Tensor:
        """Logits [B, V] for the current token at the current position."""
        stack, caches = self.stack, self.caches
        hidden = stack.embed_tokens(self.tokens)[:, None]
        cos, sin = stack.rope(self.position)
        for i, layer in enumerate(stack.layers):
            q, k, v = stack.qkv(layer, layer.attn_norm(hidden), cos, sin)
            caches.write_decode(i, k, v, self.step)
            if self.kernel is not None:
                length = caches.prefill_lengths[i] + self.step + 1
                attn = self.kernel(q[:, :, 0], caches.k[i], caches.v[i], length, stack.scale)
                attn = attn.reshape(q.shape[0], 1, -1)
            else:
                n = caches.lengths[i] + host_step + 1
                attn = stack.attend(q, caches.k[i][:, :, :n], caches.v[i][:, :, :n], causal=False)
            hidden = hidden + layer.o(attn)
            hidden = hidden + stack.mlp(layer, layer.mlp_norm(hidden))
        return stack.logits(hidden[:, -1])

    def _advance(self, host_step: int | None) -> None:
        token = self._forward(host_step).argmax(-1)
        self.step += 1
        self.position += 1
        self.out.index_copy_(1, self.step, torch.where(self.finished, self.pad, token)[:, None])
        self.finished |= torch.isin(token, self.eos)
        self.tokens.copy_(token)

    @torch.inference_mode()
    def run(self) -> tuple[Tensor, int]:
        steps = 1
        graph = None
        while steps < self.max_new_tokens:
            if steps % self.check_every == 0 and bool(self.finished.all()):
                break
            if graph is not None:
                graph.replay()
            elif self.use_graph and steps >= 3:  # two eager steps warm up kernels and allocator first
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    self._advance(None)
                graph.replay()
            else:
                self._advance(steps - 1)
            steps += 1
        return self.out, steps
