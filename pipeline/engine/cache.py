"""Per-layer KV cache where every layer, and every row, has its own length.

Merging shortens later layers; rows prefilled apart (prompts of different lengths) fill different
lengths of the same layer and then decode together.
"""

from __future__ import annotations

import torch
from torch import Tensor


class LayerCaches:
    """Preallocated K/V buffers, one pair per layer: k[i], v[i] are [B, Hkv, capacity_i, head_dim].

    ``row_lengths[b][i]``: positions row b fills in layer i at prefill. Capacity of layer i = the
    longest row's length + the decode budget, so decoding writes in place and never reallocates.
    ``filled[i][b]`` is how many positions of layer i row b holds so far.
    """

    def __init__(
        self,
        row_lengths: list[list[int]],
        max_new_tokens: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        layers = len(row_lengths[0])
        if any(len(row) != layers for row in row_lengths):
            raise ValueError("every row needs a length for every layer")
        batch = len(row_lengths)
        capacity = [max(row[i] for row in row_lengths) + max_new_tokens for i in range(layers)]
        # Zeros, not garbage: a shorter row's unused positions are masked, but a masked NaN still
        # poisons SDPA (0 * NaN), so they must hold finite values.
        self.k = [torch.zeros(batch, kv_heads, n, head_dim, dtype=dtype, device=device) for n in capacity]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.row_lengths = row_lengths
        self.filled = [[0] * batch for _ in range(layers)]
        # Device copy [layers, B]: decode steps index with it, so no host value changes between steps
        # and a captured CUDA graph can replay them.
        self.prefill_lengths = torch.tensor(row_lengths, dtype=torch.long, device=device).T.contiguous()

    def fill(self, layer: int, k: Tensor, v: Tensor, rows: slice) -> None:
        """Prefill: k, v [rows, Hkv, n, hd] become the first n positions of ``layer`` for those rows."""
        n = k.shape[2]
        self.k[layer][rows, :, :n] = k
        self.v[layer][rows, :, :n] = v
        for b in range(*rows.indices(len(self.filled[layer]))):
            self.filled[layer][b] = n

    def check_filled(self) -> None:
        """After prefill: every row filled exactly what its plan predicted."""
        filled = [list(row) for row in zip(*self.filled, strict=True)]
        if filled != self.row_lengths:
            raise RuntimeError(f"cache lengths {filled} differ from the plan {self.row_lengths}")

    def nbytes(self) -> int:
        """Bytes held by the filled parts of all layers and rows."""
        per_position = [k[0, :, :1].numel() * k.element_size() * 2 for k in self.k]
        return sum(sum(rows) * size for rows, size in zip(self.filled, per_position, strict=True))
