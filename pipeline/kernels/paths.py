"""Which implementation every dispatcher takes: the Triton kernels or the PyTorch paths.

By default CUDA tensors take Triton (when installed) and everything else PyTorch. ``forced_path``
picks one for a block of code: ``pytorch`` on CUDA (to time or compare it), or ``triton`` on CPU
tensors, which runs the kernels in Triton's interpreter and needs TRITON_INTERPRET=1 set before triton
is first imported (tests/conftest.py does). A leaf module: the merging ops import it, and
``pipeline.kernels`` imports the merging maths.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

PATHS = ("triton", "pytorch")
_FORCED: ContextVar[str | None] = ContextVar("kernel_path", default=None)


@contextmanager
def forced_path(path: str) -> Iterator[None]:
    """Inside the block, every dispatcher takes ``path`` whatever the device (see the module doc)."""
    if path not in PATHS:
        raise ValueError(f"path={path!r} is not one of {', '.join(PATHS)}")
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
    return device.type == "cuda" and importlib.util.find_spec("triton") is not None
