"""Per-layer KV cache where every layer has its own length (merging shortens later layers)."""

from __future__ import annotations

import torch
from torch import Tensor


class LayerCaches:
    """Preallocated K/V buffers, one pair per layer: k[i], v[i] are [B, Hkv, capacity_i, head_dim].

    Capacity of layer i = its prefill length + the decode budget, so decoding writes in place and never
    reallocates. ``lengths[i]`` is how many positions of layer i are filled.
    """

    def __init__(
        self,
        prefill_lengths: list[int],
        max_new_tokens: int,
        batch: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.k = [
            torch.empty(batch, kv_heads, n + max_new_tokens, head_dim, dtype=dtype, device=device)
            for n in prefill_lengths
        ]
        self.v = [torch.empty_like(k) for k in self.k]
        self.lengths = [0] * len(prefill_lengths)
        # Device copy of the prefill lengths: decode steps index with it, so no host value changes
        # between steps and a captured CUDA graph can replay them.
        self.prefill_lengths = torch.tensor(prefill_lengths, dtype=torch.long, device=device)

    def fill(self, layer: int, k: Tensor, v: Tensor, rows: slice) -> None:
        """Prefill: k, v [rows, Hkv, n, hd] become the first n positions of ``layer`` for those rows."""
        n = k.shape[2]
        self.k[layer][rows, :, :n] = k
        self.v[layer][rows, :, :n] = v
        self.lengths[layer] = n

    def nbytes(self) -> int:
        """Bytes held by the filled parts of all layers."""
        return sum(
            n * k[:, :, :1].numel() * k.element_size() * 2 for n, k in zip(self.lengths, self.k, strict=True)
        )
