"""Where a sparse task's one aggressive merge goes: FastAdaSP's layer selection ("transfer entropy").

Model-agnostic: the model is a callable ``run(layer) -> [hidden (L_b, D) per utterance]`` that prefills
the calibration set with one merge at ``layer`` (schedule ``single``, ratio r) and returns the last
layer's audio-span hidden states (Whisper: encoder blocks; decoder-only SpeechLMs: decoder blocks).

As the reference scripts compute it: entropy proxy H = mean over utterances of the sum over tokens of
log(std over hidden dims) (a Gaussian differential-entropy proxy); the reference H_ref is the merge at
the last layer (the least a merge at ratio r can change); score(L) = |H_ref - H_L|, min-max normalised
to [0, 1]. Every layer merges the same number of tokens, so every H sums over the same token count.

The reference read the layer off a plot. Our rule (``choose_layer``): the earliest layer from which
every later layer scores at most ``tolerance`` (default 0.1, a tenth of the largest drift). Why:
an earlier merge saves more (every later layer runs on fewer tokens), and the score is how far the
final representation drifts from the nearly harmless last-layer merge, so we want the earliest layer
past the knee of the curve; requiring every later layer to stay low too keeps one early dip (a layer
that happens to score low between bad ones, as Qwen-Audio's layer 8 between 0 and 10) from being
picked on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

TOLERANCE = 0.1


def entropy_proxy(states: Sequence[Tensor]) -> float:
    """Mean over utterances of sum over tokens of log(std over hidden dims); states[b]: (L_b, D)."""
    if not states:
        raise ValueError("no utterances to measure")
    totals = [torch.log(h.double().std(dim=-1)).sum() for h in states]
    return float(torch.stack(totals).mean())


def normalised_scores(entropies: Sequence[float], reference: float) -> list[float]:
    """|reference - H_L| min-max normalised to [0, 1]; all zeros when every layer scores the same."""
    raw = [abs(reference - h) for h in entropies]
    low, span = min(raw), max(raw) - min(raw)
    return [0.0 if span == 0 else (r - low) / span for r in raw]


def choose_layer(scores: Sequence[float], tolerance: float = TOLERANCE) -> int:
    """The earliest layer from which every score is at most ``tolerance``."""
    if not scores:
        raise ValueError("no layer scores")
    layer = len(scores) - 1
    while layer > 0 and scores[layer - 1] <= tolerance:
        layer -= 1
    return layer


@dataclass(frozen=True)
class LayerSelection:
    """entropies[L]: H after one merge at layer L (the last one is the reference); scores[L] normalised."""

    entropies: list[float]
    scores: list[float]
    layer: int
    tolerance: float

    def to_dict(self) -> dict:
        return {
            "entropies": self.entropies,
            "scores": self.scores,
            "layer": self.layer,
            "tolerance": self.tolerance,
        }


def select_layer(
    run: Callable[[int], Sequence[Tensor]], num_layers: int, tolerance: float = TOLERANCE
) -> LayerSelection:
    """Score every layer 0..num_layers-1 with ``run`` (one merge there) and choose by ``choose_layer``."""
    if num_layers < 1:
        raise ValueError(f"num_layers={num_layers}: need at least one layer")
    entropies = [entropy_proxy(run(layer)) for layer in range(num_layers)]
    scores = normalised_scores(entropies, entropies[-1])
    return LayerSelection(entropies, scores, choose_layer(scores, tolerance), tolerance)
