"""Device helpers every layer may use (a leaf: imports torch only)."""

from __future__ import annotations

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a host clock times the work itself (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
