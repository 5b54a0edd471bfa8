"""Per-layer reduction ratios, the token counts they imply, and calibration to a KV-cache target.

A ratio list ``ratios[i]`` (one entry per layer, 0 = no reduction) is the common currency:
- hidden-shortening methods (merges and evictions) remove ``k_i = floor(r_i * L_i)`` audio tokens after
  layer i's attention, so layer i caches ``L_i`` audio keys and layer i+1 sees ``L_i - k_i``;
- ``h2o`` shrinks each layer's cache on its own: layer i caches ``L - floor(r_i * L)`` audio keys.

A ``target`` is met by ``calibrate`` under a measure of what is reduced: ``kv_reduction`` (a decoder's
audio KV, averaged over its layers) or ``output_reduction`` (an encoder's tokens at its output, what
the cross-attention caches).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from pipeline.merging.config import (
    EVICT_METHODS,
    KV_METHODS,
    MERGE_METHODS,
    PAIR_CAP,
    SCHEDULES,
    ReductionConfig,
)

REDUCING_METHODS = (*MERGE_METHODS, *EVICT_METHODS, *KV_METHODS)
# r * L is meant to be exact for ratios such as 0.29 * 100; binary floats land just below the integer.
_FLOOR_SLACK = 1e-9


def _check_method(method: str) -> None:
    if method not in REDUCING_METHODS:
        raise ValueError(f"method={method!r} is not one of {', '.join(REDUCING_METHODS)}")


def _floor(x: float) -> int:
    return math.floor(x + _FLOOR_SLACK)


def layer_ratios(schedule: str, ratio: float, first_layer: int, num_layers: int) -> list[float]:
    """Ratio r_i of each of ``num_layers`` layers: 0 before ``first_layer`` (P), then
    ``single``: r at P only; ``constant``: r at every i >= P; ``decay``: r * (N-1-i) / (N-1-P), which
    reaches 0 at the last layer (when P is the last layer, the single ramp point is r)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not one of {', '.join(SCHEDULES)}")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio={ratio} is outside [0, 1)")
    if not 0 <= first_layer < num_layers:
        raise ValueError(f"first_layer={first_layer} is outside the layers 0..{num_layers - 1}")
    ratios = [0.0] * num_layers
    last = num_layers - 1
    for i in range(first_layer, num_layers):
        if schedule == "single" and i > first_layer:
            break
        if schedule == "decay" and last > first_layer:
            ratios[i] = ratio * (last - i) / (last - first_layer)
        else:
            ratios[i] = ratio
    return ratios


def _removed(ratio: float, length: int, method: str) -> int:
    """floor(r * L), capped so that a span always keeps a token (a-tome: at most half of it)."""
    k = min(_floor(ratio * length), max(length - 1, 0))
    return min(k, length // 2) if method == "a-tome" else k


def removed_counts(span_len: int, ratios: list[float], method: str) -> list[int]:
    """k_i, the audio tokens layer i removes from a span of ``span_len`` tokens entering layer 0
    (h2o: the keys evicted from layer i's cache)."""
    _check_method(method)
    if span_len < 0:
        raise ValueError(f"span_len={span_len} must be >= 0")
    if method in KV_METHODS:
        return [_removed(r, span_len, method) for r in ratios]
    counts, length = [], span_len
    for r in ratios:
        k = _removed(r, length, method)
        counts.append(k)
        length -= k
    return counts


def span_lengths(span_len: int, ratios: list[float], method: str) -> list[int]:
    """L_i, the span's length entering layer i = the audio KV length layer i caches."""
    counts = removed_counts(span_len, ratios, method)
    if method in KV_METHODS:
        return [span_len - k for k in counts]
    lengths = [span_len]
    for k in counts[:-1]:
        lengths.append(lengths[-1] - k)
    return lengths


def kv_reduction(ratios: list[float], method: str) -> float:
    """The fraction m of audio KV removed, averaged over layers, in continuous terms (no flooring):
    layer i keeps prod_{j<i} (1 - r_j) of the audio (h2o: 1 - r_i). This is the evaluation scripts'
    definition of the "reduction" axis, with every layer counted once."""
    _check_method(method)
    if not ratios:
        raise ValueError("ratios is empty")
    if method in KV_METHODS:
        return sum(ratios) / len(ratios)
    kept, keep = 0.0, 1.0
    for r in ratios:
        kept += keep
        keep *= 1.0 - (min(r, PAIR_CAP) if method == "a-tome" else r)
    return 1.0 - kept / len(ratios)


def output_reduction(ratios: list[float], method: str) -> float:
    """Fraction of audio tokens removed at the output of the layers, in continuous terms:
    1 - prod(1 - r_i) (an encoder's measure: its output is what the decoder's cross-attention caches)."""
    kept = 1.0
    for r in ratios:
        kept *= 1.0 - (min(r, PAIR_CAP) if method == "a-tome" else r)
    return 1.0 - kept


Measure = Callable[[list[float], str], float]


def calibrate(
    target: float,
    schedule: str,
    first_layer: int,
    num_layers: int,
    method: str = "fastadasp",
    measure: Measure = kv_reduction,
) -> float:
    """The ratio r whose ``measure(layer_ratios(schedule, r, ...), method)`` equals ``target``
    (bisection to 1e-9; every measure grows monotonically with r). Raises if the target is unreachable."""
    _check_method(method)
    if not 0.0 <= target < 1.0:
        raise ValueError(f"target={target} is outside [0, 1)")

    def reduction(r: float) -> float:
        return measure(layer_ratios(schedule, r, first_layer, num_layers), method)

    lo, hi = 0.0, PAIR_CAP if method == "a-tome" else math.nextafter(1.0, 0.0)
    if reduction(lo) >= target:
        return lo
    if reduction(hi) < target:
        raise ValueError(
            f"target={target} is unreachable with method={method!r} schedule={schedule!r} "
            f"first_layer={first_layer} of {num_layers} layers: at most {reduction(hi):.4f}"
        )
    while hi - lo > 1e-10:
        mid = (lo + hi) / 2
        if reduction(mid) < target:
            lo = mid
        else:
            hi = mid
    return hi


def resolve_ratios(cfg: ReductionConfig, num_layers: int, measure: Measure = kv_reduction) -> list[float]:
    """Per-layer ratios of a run: the config's ratio, or the one calibrated to its target under
    ``measure`` (the model's meaning of the target)."""
    cfg.check_layers(num_layers)
    if not cfg.enabled:
        return [0.0] * num_layers
    ratio = cfg.ratio
    if ratio is None:
        ratio = calibrate(cfg.target, cfg.schedule, cfg.first_layer, num_layers, cfg.method, measure)
    return layer_ratios(cfg.schedule, ratio, cfg.first_layer, num_layers)
