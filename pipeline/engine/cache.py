"""Per-layer KV caches for a fixed number of rows (slots), where every layer and every row has its own
length.

Merging shortens later layers, so a layer's capacity is its own; a row prefills some length of each
layer (its merge plan's) and decodes after it, whatever the rows beside it hold. The buffers are
allocated once for a runner's life (pipeline/engine/runner.py): rows come and go, the memory stays.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class LayerCaches:
    """K/V buffers, one pair per layer: k[i], v[i] are [slots, Hkv, capacity[i], head_dim].

    ``filled[i][row]``: positions row's prefill filled in layer i (host); ``lengths`` [layers, slots]:
    the same on the device, where decode steps read it (no host value changes between steps, so a
    captured CUDA graph can replay them). A row's decode step t writes position ``lengths[i, row] + t``.
    """

    def __init__(
        self,
        slots: int,
        capacity: Sequence[int],
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        # Zeros, not garbage: a row's unused positions are masked, but a masked NaN still poisons SDPA
        # (0 * NaN), so they must hold finite values.
        self.k = [torch.zeros(slots, kv_heads, n, head_dim, dtype=dtype, device=device) for n in capacity]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.capacity = list(capacity)
        self.filled = [[0] * slots for _ in capacity]
        self.lengths = torch.zeros(len(capacity), slots, dtype=torch.long, device=device)

    @classmethod
    def for_rows(
        cls,
        row_lengths: Sequence[Sequence[int]],
        max_new_tokens: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> LayerCaches:
        """One slot per row: ``row_lengths[b][i]`` positions of prefill in layer i plus the decode budget."""
        capacity = [max(lengths) + max_new_tokens for lengths in zip(*row_lengths, strict=True)]
        return cls(len(row_lengths), capacity, kv_heads, head_dim, dtype, device)

    @property
    def slots(self) -> int:
        return self.k[0].shape[0]

    def fill(self, layer: int, k: Tensor, v: Tensor, rows: list[int]) -> None:
        """Prefill: k, v [len(rows), Hkv, n, hd] become the first n positions of ``layer`` in those slots."""
        n = k.shape[2]
        if n > self.capacity[layer]:
            raise ValueError(f"{n} positions do not fit layer {layer}'s {self.capacity[layer]}")
        index = torch.tensor(rows, device=k.device)
        self.k[layer][index, :, :n] = k
        self.v[layer][index, :, :n] = v
        self.lengths[layer, index] = n
        for row in rows:
            self.filled[layer][row] = n

    def move(self, src: int, dst: int, decoded: int) -> None:
        """Slot ``src``'s row, its prefill and the ``decoded`` positions after it in every layer, into
        slot ``dst`` (a retired row's slot goes to the last running row)."""
        for i, (k, v) in enumerate(zip(self.k, self.v, strict=True)):
            n = self.filled[i][src] + decoded
            k[dst, :, :n] = k[src, :, :n]
            v[dst, :, :n] = v[src, :, :n]
            self.filled[i][dst] = self.filled[i][src]
        self.lengths[:, dst] = self.lengths[:, src]

    def row_filled(self, row: int) -> list[int]:
        """Positions each layer's prefill filled in slot ``row``."""
        return [layer[row] for layer in self.filled]

    def nbytes(self, rows: Sequence[int] | None = None) -> int:
        """Bytes the prefills of ``rows`` (None: every slot) hold, over all layers."""
        rows = range(self.slots) if rows is None else rows
        per_position = [k[0, :, :1].numel() * k.element_size() * 2 for k in self.k]
        return sum(
            sum(filled[r] for r in rows) * size
            for filled, size in zip(self.filled, per_position, strict=True)
        )
