"""The stage schemas spell out what the pipeline's dataclasses hold."""

from __future__ import annotations

import dataclasses

import pyarrow as pa

from pipeline.stats import WindowStats
from schemas.stages import WINDOW_STATS_TYPE


def test_window_stats_type_has_every_field_of_window_stats():
    arrow = {"float": pa.float64(), "int": pa.int64()}
    expected = [pa.field(f.name, arrow[f.type], nullable=False) for f in dataclasses.fields(WindowStats)]
    assert list(WINDOW_STATS_TYPE) == expected
