"""Shared by the benchmark scripts: the device choice and plain-text tables for the console."""

from __future__ import annotations

import os
from typing import Any


def use_cuda(cpu_smoke: bool) -> bool:
    """True for a CUDA run; for ``--cpu-smoke`` False, with the kernels interpreted on CPU tensors.
    Call before anything imports triton (it picks compiled or interpreted at its first import)."""
    if cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        return False
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --cpu-smoke")
    return True


def cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def text_table(rows: list[dict[str, Any]], keys: list[str] | None = None) -> str:
    """Right-aligned columns; ``keys`` default to every key seen, in first-seen order."""
    keys = keys or list(dict.fromkeys(key for row in rows for key in row))
    cells = [[cell(row.get(key, "")) for key in keys] for row in rows]
    widths = [max(len(key), *(len(c[i]) for c in cells)) for i, key in enumerate(keys)]
    lines = ["  ".join(key.rjust(w) for key, w in zip(keys, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)
