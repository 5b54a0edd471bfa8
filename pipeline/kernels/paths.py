"""Which implementation every dispatcher takes: the Triton kernels or the PyTorch paths.

The one place that decides. By default CUDA tensors take Triton (when installed) and everything else
PyTorch. ``forced_path`` picks one for a block of code: ``pytorch`` on CUDA (to time or compare it),
or ``triton`` on CPU tensors, which runs the kernels in Triton's interpreter and needs
TRITON_INTERPRET=1 set before triton is first imported (tests/conftest.py does). A leaf module: every
kernel module and the merging ops import it, it imports nothing of the project.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

PATHS = ("triton", "pytorch")
# Importing triton fixes its mode (compiled or interpreted) for the whole process, so the kernel modules
# import it only where a kernel can run: with a CUDA device, or when TRITON_INTERPRET=1 was set before.
HAS_TRITON = importlib.util.find_spec("triton") is not None and (
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
)
_FORCED: ContextVar[str | None] = ContextVar("kernel_path", default=None)


@contextmanager
def forced_path(path: str) -> Iterator[None]:
    """Inside the block, every dispatcher takes ``path`` whatever the device (see the module doc)."""
    if path not in PATHS:
        raise ValueError(f"path={path!r} is not one of {', '.join(PATHS)}")
    if path == "triton" and not HAS_TRITON:
        raise ValueError(
            "path='triton' needs triton, and TRITON_INTERPRET=1 set before it loads without CUDA"
        )
    token = _FORCED.set(path)
    try:
        yield
    finally:
        _FORCED.reset(token)


def triton_usable(device: torch.device) -> bool:
    """Whether the Triton kernels run for tensors on ``device``: forced, or a CUDA device with triton."""
    forced = _FORCED.get()
    if forced is not None:
        return forced == "triton"
    return device.type == "cuda" and HAS_TRITON


def supported_head_dim(head_dim: int) -> bool:
    """Whether the attention kernels take this head size: a power of two >= 16 (tiles span whole heads)."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def attention_kernels_usable(device: torch.device, head_dim: int) -> bool:
    """Whether attention on ``device`` with this head size takes the Triton kernels (mass, split-K decode
    attention): what decides CUDA-graph decoding (no host sync) and the mass's memory footprint."""
    return triton_usable(device) and supported_head_dim(head_dim)
