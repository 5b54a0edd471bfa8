"""Reduction presets: per model and task, the ReductionConfig a run uses unless told otherwise.

Dense tasks (asr, st) reduce gradually (``constant`` or ``decay`` from a middle layer); sparse tasks
(er, sqa) take one aggressive ``single`` merge. ``provisional`` marks presets not backed by our own
measurements on that model; ``basis`` says what backs each one. Bump PRESETS_VERSION on any change:
it is recorded in every manifest and the resolved config is part of the done-set fingerprint.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.merging.config import NO_REDUCTION, ReductionConfig

PRESETS_VERSION = "2026.11.2"
DEFAULT = "default"
NONE = "none"


class PresetError(ValueError):
    """No preset of that name for the model and task."""


@dataclass(frozen=True)
class Preset:
    config: ReductionConfig
    provisional: bool
    basis: str


_PAPER = "FastAdaSP paper Tables 1-2 (WavLLM, 32 layers); not measured on this model"
_WHISPER_EVAL = (
    "benchmarks/whisper-tiny-en-librispeech-dev-120: 120 LibriSpeech dev utterances, WER 5.09 without "
    "reduction; at 30% single 5.21, constant with chains <= 2 5.52 (uncapped 5.86, A-ToMe 5.60)"
)
_TINY = "random-weight test model: exercises the code path, says nothing about quality"

_QWEN_DENSE = {
    DEFAULT: Preset(ReductionConfig("fastadasp", "constant", first_layer=9, target=0.3), True, _PAPER),
    "decay": Preset(ReductionConfig("fastadasp", "decay", first_layer=9, target=0.3), True, _PAPER),
}
_QWEN_SPARSE = {
    DEFAULT: Preset(ReductionConfig("fastadasp", "single", first_layer=9, target=0.5), True, _PAPER),
    "aggressive": Preset(ReductionConfig("fastadasp", "single", first_layer=9, target=0.7), True, _PAPER),
}
_TINY_DENSE = {
    DEFAULT: Preset(ReductionConfig("fastadasp", "constant", first_layer=0, ratio=0.2), True, _TINY)
}
_TINY_SPARSE = {
    DEFAULT: Preset(ReductionConfig("fastadasp", "single", first_layer=0, ratio=0.5), True, _TINY)
}

PRESETS: dict[str, dict[str, dict[str, Preset]]] = {
    "whisper-tiny.en": {
        "asr": {
            # Whisper merges in its 4-layer encoder; all removal in the last layer did best at 30%. The
            # gradual schedule caps merge chains at 2 tokens: uncapped, long chains over steady speech
            # cost 0.3 WER points more at 30% and 1.2 at 50% (benchmarks/whisper-tiny-en-librispeech-dev).
            DEFAULT: Preset(
                ReductionConfig("fastadasp", "single", first_layer=3, ratio=0.3), False, _WHISPER_EVAL
            ),
            "constant": Preset(
                ReductionConfig("fastadasp", "constant", first_layer=1, ratio=0.112, max_chain=2),
                False,
                _WHISPER_EVAL,
            ),
        }
    },
    "Qwen/Qwen2-Audio-7B-Instruct": {
        "asr": _QWEN_DENSE,
        "st": _QWEN_DENSE,
        "er": _QWEN_SPARSE,
        "sqa": _QWEN_SPARSE,
    },
    "tiny-random-qwen2-audio": {
        "asr": _TINY_DENSE,
        "st": _TINY_DENSE,
        "er": _TINY_SPARSE,
        "sqa": _TINY_SPARSE,
    },
}


def resolve_reduction(model: str, task: str, name: str = DEFAULT) -> ReductionConfig:
    """The ReductionConfig for ``--reduction name``; ``none`` turns reduction off for any model."""
    if name == NONE:
        return NO_REDUCTION
    presets = PRESETS.get(model, {}).get(task, {})
    if name not in presets:
        known = ", ".join([NONE, *presets]) if presets else NONE
        raise PresetError(
            f"no reduction preset {name!r} for model {model!r}, task {task!r}; choose one of: {known}"
        )
    return presets[name].config
