"""FastAdaSP token reduction, model-agnostic: planning and applying merges/evictions, schedules and
calibration (the attention mass is a kernel: ``pipeline.kernels.attention_mass``). See ``ops``,
``schedule`` and ``config``."""

from pipeline.merging.config import NO_REDUCTION, ReductionConfig, ReductionConfigError
from pipeline.merging.ops import (
    Reduction,
    adjacent_similarity,
    h2o_keep_indices,
    plan_reduction,
    right_aligned_positions,
)
from pipeline.merging.schedule import (
    calibrate,
    kv_reduction,
    layer_ratios,
    removed_counts,
    resolve_ratios,
    span_lengths,
)

__all__ = [
    "NO_REDUCTION",
    "Reduction",
    "ReductionConfig",
    "ReductionConfigError",
    "adjacent_similarity",
    "calibrate",
    "h2o_keep_indices",
    "kv_reduction",
    "layer_ratios",
    "plan_reduction",
    "removed_counts",
    "resolve_ratios",
    "right_aligned_positions",
    "span_lengths",
]
