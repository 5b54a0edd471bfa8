"""Reduction presets: per model family and checkpoint kind (and, where measured, per checkpoint) and
task, the ReductionConfig a run uses unless told otherwise.

Dense tasks (asr, st) reduce gradually (``constant`` or ``decay`` from a middle layer) or, on Whisper,
once in the encoder; sparse tasks (er, sqa, lid) take one aggressive ``single`` merge. A preset's
``first_layer`` is set for a model of ``layers`` reducing layers; on a model of another depth it is
rescaled to the same relative depth. ``provisional`` marks presets not backed by our own measurements
on that checkpoint; ``basis`` says what backs each one. Bump PRESETS_VERSION on any change: it is
recorded in every manifest and the resolved config is part of the done-set fingerprint.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from pipeline.errors import Refusal
from pipeline.merging.config import NO_REDUCTION, ReductionConfig
from pipeline.models.base import ModelDescription
from pipeline.tasks import TASKS, is_dense

PRESETS_VERSION = "2026.12.7.1"
DEFAULT = "default"
NONE = "none"


# Each padding policy's parameters (ReductionConfig.padding; pipeline/models/whisper_encoder.py). A window
# with under 10 s of padding past the margin keeps it (_PADDING_MIN).
PADDING: dict[str, dict] = {
    "keep": {},
    "merge": {"padding": "merge", "padding_margin": 50, "padding_group": 25, "padding_min": 500},
}
# tiny.en's own, measured (_PADDING_TINY): a tighter margin and coarser groups hold its accuracy too
_MERGED_TINY = PADDING["merge"] | {"padding_margin": 10, "padding_group": 100}


class PresetError(Refusal, ValueError):
    """No preset of that name for the model and task."""


@dataclass(frozen=True)
class Preset:
    config: ReductionConfig
    provisional: bool
    basis: str
    layers: int  # the depth config.first_layer was chosen for

    def for_depth(self, layers: int) -> ReductionConfig:
        """The config for a model of ``layers`` reducing layers (first layer at the same relative depth)."""
        if layers == self.layers:
            return self.config
        first = min(layers - 1, int(self.config.first_layer * layers / self.layers + 0.5))
        return replace(self.config, first_layer=first)


_PAPER = "FastAdaSP paper Tables 1-2 (WavLLM, 32 layers); not measured on this model"
_WHISPER_EVAL = (
    "benchmarks/whisper-tiny-en-librispeech-dev-120: 120 LibriSpeech dev utterances, WER 5.09 without "
    "reduction; at 30% single 5.21, constant with chains <= 2 5.52 (uncapped 5.86, A-ToMe 5.60)"
)
_WHISPER_OTHER = "measured on whisper-tiny.en only (" + _WHISPER_EVAL + ")"
_PADDING_MIN = (
    "windows with under 10 s of padding past the margin keep it (benchmarks/cpu-peer-longform-dev-padding: "
    "tiny.en's default on the long-form dev recordings WER 6.19 as keeping it, 6.43 merging every window's)"
)
_PADDING_TINY = (
    "padding merged (benchmarks/whisper-tiny-en-librispeech-dev-padding, 200 LibriSpeech dev utterances): "
    "WER 4.90 against 4.95 keeping it; with the single 30% merge at layer 3 5.00 against 5.65; trimmed "
    "past 50 positions 5.26, dropped after the encoder 11.08; " + _PADDING_MIN
)
_PADDING_BASE = (
    "padding merged, 50 positions kept, groups of 25, on whisper-base: "
    "benchmarks/whisper-base-librispeech-dev-padding-margin50-group25 (200 LibriSpeech utterances) WER 5.00 "
    "against 4.89 keeping it (decay merge from layer 0 on top: 7.53 against 5.13); "
    "benchmarks/whisper-base-multilingual-dev-padding/st-margin50-group25 (22 clips) BLEU / chrF 15.56 / 41.87 "
    "against 15.42 / 42.26 (constant merge on top: 14.30 / 41.48 against 14.73 / 42.48); 10 kept, groups of "
    "100 lost more (WER 6.41, BLEU 13.98: benchmarks/whisper-base-librispeech-dev-padding, .../st); "
    + _PADDING_MIN
)
_PADDING_LID = (
    "padding merged: benchmarks/whisper-base-multilingual-dev-padding/lid-margin50-group25, 48 of 49 clips "
    "with and without the single 50% merge at layer 3, as keeping the padding (groups of 100: 46 of 49 with it); "
    + _PADDING_MIN
)
_TINY = "random-weight test model: exercises the code path, says nothing about quality"
_SPARSE_GUESS = "not measured: one aggressive merge at the last reducing layer until a layer selection run"

_QWEN_DENSE = {
    DEFAULT: Preset(ReductionConfig("fastadasp", "constant", first_layer=9, target=0.3), True, _PAPER, 32),
    "decay": Preset(ReductionConfig("fastadasp", "decay", first_layer=9, target=0.3), True, _PAPER, 32),
}
_QWEN_SPARSE = {
    DEFAULT: Preset(ReductionConfig("fastadasp", "single", first_layer=9, target=0.5), True, _PAPER, 32),
    "aggressive": Preset(ReductionConfig("fastadasp", "single", first_layer=9, target=0.7), True, _PAPER, 32),
}
_QWEN = {"asr": _QWEN_DENSE, "st": _QWEN_DENSE, "er": _QWEN_SPARSE, "sqa": _QWEN_SPARSE}


_MERGED = PADDING["merge"]


def _padding_only(basis: str, provisional: bool, layers: int, merged: dict = _MERGED) -> Preset:
    """The window's padding merged, no speech token touched: the best accuracy at the padding's speed."""
    return Preset(ReductionConfig(**merged), provisional, basis, layers)


def _whisper_dense(measured: bool) -> dict[str, Preset]:
    # Whisper merges in its encoder; all removal in the last layer did best at 30%. The gradual
    # schedule caps merge chains at 2 tokens: uncapped, long chains over steady speech cost 0.3 WER
    # points more at 30% and 1.2 at 50% (benchmarks/whisper-tiny-en-librispeech-dev).
    basis = (
        (_WHISPER_EVAL if measured else _WHISPER_OTHER)
        + "; "
        + (_PADDING_TINY if measured else _PADDING_BASE)
    )
    merged = _MERGED_TINY if measured else _MERGED
    return {
        DEFAULT: Preset(
            ReductionConfig("fastadasp", "single", first_layer=3, ratio=0.3, **merged),
            not measured,
            basis,
            4,
        ),
        "constant": Preset(
            ReductionConfig("fastadasp", "constant", first_layer=1, ratio=0.112, max_chain=2, **merged),
            not measured,
            basis,
            4,
        ),
        "padding": _padding_only(_PADDING_TINY if measured else _PADDING_BASE, not measured, 4, merged),
    }


_WHISPER_SPARSE = {
    DEFAULT: Preset(
        ReductionConfig("fastadasp", "single", first_layer=3, ratio=0.5, **_MERGED), True, _SPARSE_GUESS, 4
    ),
    "padding": _padding_only(_PADDING_LID, True, 4),
}

# whisper-base, measured with the loop guard (b456c78); one clip moves st BLEU by up to ~1.2 and asr WER by
# up to ~1.2 (one word = 0.15 WER points), so the gaps quoted here between merges are ties.
_BASE_ST = (
    "benchmarks/whisper-base-multilingual-dev/st: 22 clips, no reduction BLEU 15.42 / chrF 42.26; FastAdaSP "
    "constant from layer 1 at 30% 14.73 / 42.48 (decay 14.51 / 41.70, chains <= 2 15.29 / 41.71, A-ToMe "
    "15.89 / 43.16: within one clip)"
)
_BASE_ASR = (
    "benchmarks/whisper-base-multilingual-dev/asr: 41 non-English clips, no reduction WER 23.21 (34 clips) / "
    "ja-ko-zh CER 24.43 (7) / raw CER 11.43; FastAdaSP decay from layer 0 at 30% 23.21 / 24.43 / 12.21 "
    "(constant 24.58 / 29.55 / 12.72; single at layer 5 25.34 / 25.00 / 13.81); on English "
    "(benchmarks/whisper-base-librispeech-dev-120) 4.84 vs 4.50 on 120 LibriSpeech utterances, and no wall "
    "time saved on CPU: English runs wanting the best WER pass --reduction none"
)
_BASE_ASR_CONSTANT = (
    "benchmarks/whisper-base-multilingual-dev/asr: FastAdaSP constant from layer 1, chains <= 2, at 30% "
    "WER 23.05 / ja-ko-zh CER 26.70 / raw CER 12.09 (no reduction 23.21 / 24.43 / 11.43; 41 clips)"
)
_BASE_LID = (
    "benchmarks/whisper-base-multilingual-dev/select-layer-lid: on all 49 clips at ratio 0.5 the rule chose "
    "layer 3 (scores 0.998 1.000 0.381 0.059 0.011 0.000); its --check sweep: 48 of 49 clips at layer 3, as "
    "without reduction, within one clip of the best layer (0: 49 of 49); layer 5: 47 of 49"
)

# (family, kind) -> task -> preset name -> Preset
BY_FAMILY: dict[tuple[str, str], dict[str, dict[str, Preset]]] = {
    ("whisper", "base"): {"asr": _whisper_dense(False), "st": _whisper_dense(False), "lid": _WHISPER_SPARSE},
    ("qwen2_audio", "base"): _QWEN,
    ("qwen2_audio", "instruct"): _QWEN,
    ("glm_asr", "instruct"): {"asr": _QWEN_DENSE},
}
# Checkpoints measured (or built) apart from their family: name -> task -> preset name -> Preset
BY_CHECKPOINT: dict[str, dict[str, dict[str, Preset]]] = {
    "whisper-tiny.en": {"asr": _whisper_dense(True)},
    "whisper-base": {
        "asr": {
            # speech tokens merged in every layer on top of merged padding lost 2.4 WER points
            # (_PADDING_BASE): the default reduces the padding alone; the named speech merges keep it
            DEFAULT: _padding_only(_PADDING_BASE, False, 6),
            "padding": _padding_only(_PADDING_BASE, False, 6),
            "decay": Preset(
                ReductionConfig("fastadasp", "decay", first_layer=0, target=0.3), False, _BASE_ASR, 6
            ),
            "constant": Preset(
                ReductionConfig("fastadasp", "constant", first_layer=1, target=0.3, max_chain=2),
                False,
                _BASE_ASR_CONSTANT,
                6,
            ),
        },
        "st": {
            # the padding alone beat it with the constant speech merge on top (_PADDING_BASE)
            DEFAULT: _padding_only(_PADDING_BASE, False, 6),
            "padding": _padding_only(_PADDING_BASE, False, 6),
            "constant": Preset(
                ReductionConfig("fastadasp", "constant", first_layer=1, target=0.3), False, _BASE_ST, 6
            ),
        },
        "lid": {
            DEFAULT: Preset(
                ReductionConfig("fastadasp", "single", first_layer=3, ratio=0.5, **_MERGED),
                False,
                _BASE_LID + "; " + _PADDING_LID,
                6,
            ),
            "padding": _padding_only(_PADDING_LID, False, 6),
        },
    },
    "tiny-random-qwen2-audio": {
        task: {
            DEFAULT: Preset(
                ReductionConfig("fastadasp", schedule, first_layer=0, ratio=ratio), True, _TINY, 4
            )
        }
        for task, schedule, ratio in (
            ("asr", "constant", 0.2),
            ("st", "constant", 0.2),
            ("er", "single", 0.5),
            ("sqa", "single", 0.5),
        )
    },
}


def presets_for(model: ModelDescription, task: str) -> dict[str, Preset]:
    """The named presets for a model and task: its checkpoint's own, else its family's and kind's. A task
    with neither reduces as the model's first task of the same density does (dense ones gradually, sparse
    ones once), so that a new task needs no presets of its own."""
    dense = is_dense(task)
    alike = [t for t in TASKS if t != task and t in model.tasks and is_dense(t) == dense]
    for candidate in (task, *alike):
        own = BY_CHECKPOINT.get(model.name, {}).get(candidate)
        if own is None:
            own = BY_FAMILY.get((model.family, model.kind), {}).get(candidate)
        if own is not None:
            return own
    return {}


def resolve_reduction(model: ModelDescription, task: str, name: str = DEFAULT) -> ReductionConfig:
    """The ReductionConfig for ``--reduction name``; ``none`` turns reduction off for any model."""
    if name == NONE:
        return NO_REDUCTION
    presets = presets_for(model, task)
    if name not in presets:
        known = ", ".join([NONE, *presets]) if presets else NONE
        raise PresetError(
            f"no reduction preset {name!r} for model {model.name!r} ({model.family}, {model.kind}), "
            f"task {task!r}; choose one of: {known}"
        )
    return presets[name].for_depth(model.reducing_layers)
