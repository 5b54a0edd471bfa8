"""What to reduce, where and how much: the one validated description of a reduction run.

Method names follow the paper's tables. Schedules (P = first layer, r = ratio, N = layers):
- ``single``: one reduction at layer P (the paper's "none" schedule, used for sparse tasks);
- ``constant``: ratio r at P and every later layer (lengths compound);
- ``decay``: r_i = r * (N-1-i) / (N-1-P) for i >= P, reaching 0 at the last layer.
Either ``ratio`` or ``target`` is given; a target is turned into the ratio by
``pipeline.merging.schedule.calibrate`` under the measure of what the model reduces (``target`` below).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from pipeline.errors import Refusal

MERGE_METHODS = ("fastadasp", "average", "random-merge", "a-tome")
CHAIN_METHODS = ("fastadasp", "average", "random-merge")  # selected edges form chains of any length
EVICT_METHODS = ("fastv", "random-evict")
KV_METHODS = ("h2o",)
METHODS = ("none", *MERGE_METHODS, *EVICT_METHODS, *KV_METHODS)
SCHEDULES = ("single", "constant", "decay")
POSITIONS = ("first", "right")
MASS_ESTIMATORS = ("full", "tail")
PADDING_POLICIES = ("keep", "merge")
PAIR_CAP = 0.5  # the most of its tokens pairwise merging (a-tome) removes: one of each pair


class ReductionConfigError(Refusal, ValueError):
    """A reduction setting is invalid; the message names the field and the allowed values."""


def _check_choice(field: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ReductionConfigError(f"{field}={value!r} is not one of {', '.join(allowed)}")


@dataclass(frozen=True)
class ReductionConfig:
    """Token reduction for one run.

    method: ``none`` or one of METHODS. ``fastadasp`` = top-k adjacent key-similarity chains merged
        with attention-mass weights; ``average`` = same chains, plain mean; ``random-merge`` = random
        edges, weighted; ``a-tome`` = disjoint adjacent pairs, plain mean; ``fastv`` = drop the least
        attended tokens; ``random-evict`` = drop random tokens; ``h2o`` = per-head eviction of the
        least attended audio keys from each layer's KV cache (hidden states untouched).
    schedule: ``single`` | ``constant`` | ``decay`` (module docstring).
    first_layer: P, the first layer that reduces (0-based).
    ratio: fraction of the current audio tokens removed at layer P, in [0, 1).
    target: fraction of the audio removed, in [0, 1); used when ratio is None. What is measured is what
        the model reduces: a decoder's audio KV averaged over its layers (``schedule.kv_reduction``, the
        engine) or an encoder's audio tokens at its output, which the decoder cross-attends to
        (``schedule.output_reduction``, Whisper).
    position: position id of a merged token: ``first`` = its group's first original position;
        ``right`` = the reference's right alignment (a layer holding M of N tokens uses N-M..N-1).
    mass: attention-mass estimator for weights and eviction scores: ``full`` = every query (the
        method as defined); ``tail`` = only the queries after the audio span (FastV-style, cheaper).
    seed: seed of the random methods.
    max_chain: None (the method as defined) or the most tokens one merge may join in one layer, >= 2, for
        the chain methods (CHAIN_METHODS): edges are then taken greedily by score, skipping those that
        would grow a chain past it. Off by default; an experiment against long runs of similar frames.
    padding: what an encoder that pads every window (Whisper: to 30 s) does with a window's trailing
        padding, a reduction of its own beside the speech tokens' (``ModelDescription.padding`` lists
        what a model can do): ``keep`` it all (as trained); ``merge`` keeps ``padding_margin`` positions
        after the speech and averages the rest ``padding_group`` positions at a time into tokens that
        stand for their positions in attention (log of the count added to their logits), when at least
        ``padding_min`` positions lie past the margin: a window with less (a nearly full one, where merging
        saves little) keeps all its padding. See pipeline/models/whisper_encoder.py.
    """

    method: str = "none"
    schedule: str = "constant"
    first_layer: int = 0
    ratio: float | None = None
    target: float | None = None
    position: str = "first"
    mass: str = "full"
    seed: int = 0
    max_chain: int | None = None
    padding: str = "keep"
    padding_margin: int = 0
    padding_group: int = 1
    padding_min: int = 0

    def __post_init__(self) -> None:
        _check_choice("method", self.method, METHODS)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_choice("position", self.position, POSITIONS)
        _check_choice("mass", self.mass, MASS_ESTIMATORS)
        _check_choice("padding", self.padding, PADDING_POLICIES)
        for field in ("first_layer", "seed", "padding_margin", "padding_group", "padding_min"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ReductionConfigError(f"{field}={value!r} must be an integer")
        for field in ("ratio", "target"):
            value = getattr(self, field)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise ReductionConfigError(f"{field}={value!r} must be a number in [0, 1) or None")
        if self.max_chain is not None:
            if isinstance(self.max_chain, bool) or not isinstance(self.max_chain, int) or self.max_chain < 2:
                raise ReductionConfigError(f"max_chain={self.max_chain!r} must be None or an integer >= 2")
            if self.method not in CHAIN_METHODS:
                raise ReductionConfigError(
                    f"max_chain={self.max_chain} applies to {', '.join(CHAIN_METHODS)}, not method={self.method!r}"
                )
        if self.padding_margin < 0 or self.padding_group < 1 or self.padding_min < 0:
            raise ReductionConfigError(
                f"padding_margin={self.padding_margin} and padding_min={self.padding_min} must be >= 0, "
                f"padding_group={self.padding_group} >= 1"
            )
        if self.method == "none":
            return
        if (self.ratio is None) == (self.target is None):
            raise ReductionConfigError(f"method={self.method!r} needs exactly one of ratio or target")
        for field in ("ratio", "target"):
            value = getattr(self, field)
            if value is not None and not 0.0 <= value < 1.0:
                raise ReductionConfigError(f"{field}={value} is outside [0, 1)")
        if self.first_layer < 0:
            raise ReductionConfigError(f"first_layer={self.first_layer} must be >= 0")
        if self.method == "a-tome" and self.ratio is not None and self.ratio > PAIR_CAP:
            raise ReductionConfigError(
                f"ratio={self.ratio} is above {PAIR_CAP}, the most pairwise merging removes"
            )

    @property
    def enabled(self) -> bool:
        return self.method != "none" and (self.ratio or self.target or 0.0) > 0.0

    def check_layers(self, num_layers: int) -> None:
        """Raise if first_layer does not exist in a model of ``num_layers`` layers."""
        if self.enabled and not 0 <= self.first_layer < num_layers:
            raise ReductionConfigError(
                f"first_layer={self.first_layer} is outside the model's layers 0..{num_layers - 1}"
            )

    def to_dict(self) -> dict:
        """Every field; the padding fields only when a policy is set, and ``padding_min`` only when set, so
        that a run recorded before they existed keeps its fingerprint (it kept the padding, or merged it
        whatever its length)."""
        fields = asdict(self)
        if not self.padding_min:
            del fields["padding_min"]
        policy = (self.padding, self.padding_margin, self.padding_group, self.padding_min)
        if policy == ("keep", 0, 1, 0):
            for name in ("padding", "padding_margin", "padding_group"):
                del fields[name]
        return fields


NO_REDUCTION = ReductionConfig()
