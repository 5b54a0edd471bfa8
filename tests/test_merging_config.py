"""ReductionConfig validation: every invalid field is named, with what it allows."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pipeline.merging.config import NO_REDUCTION, ReductionConfig, ReductionConfigError


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"method": "tome"},
            "method='tome' is not one of none, fastadasp, average, random-merge, a-tome, "
            "fastv, random-evict, h2o",
        ),
        ({"schedule": "none"}, "schedule='none' is not one of single, constant, decay"),
        ({"position": "last"}, "position='last' is not one of first, right"),
        ({"mass": "head"}, "mass='head' is not one of full, tail"),
        ({"ratio": 1.0}, r"ratio=1.0 is outside \[0, 1\)"),
        ({"ratio": -0.1}, r"ratio=-0.1 is outside \[0, 1\)"),
        ({"ratio": float("nan")}, r"ratio=nan is outside \[0, 1\)"),
        ({"ratio": "0.3"}, r"ratio='0.3' must be a number in \[0, 1\)"),
        ({"ratio": None, "target": 1.5}, r"target=1.5 is outside \[0, 1\)"),
        ({"target": 0.3}, "needs exactly one of ratio or target"),
        ({"ratio": None}, "needs exactly one of ratio or target"),
        ({"first_layer": -1}, "first_layer=-1 must be >= 0"),
        ({"first_layer": 2.0}, "first_layer=2.0 must be an integer"),
        ({"seed": "1"}, "seed='1' must be an integer"),
        ({"method": "a-tome", "ratio": 0.6}, "ratio=0.6 is above 0.5"),
        ({"max_chain": 1}, "max_chain=1 must be None or an integer >= 2"),
        ({"max_chain": True}, "max_chain=True must be None or an integer >= 2"),
        (
            {"method": "a-tome", "max_chain": 2},
            "max_chain=2 applies to fastadasp, average, random-merge, not",
        ),
        ({"method": "fastv", "max_chain": 3}, "max_chain=3 applies to"),
    ],
)
def test_invalid_fields_are_named(changes, message):
    valid = {"method": "fastadasp", "ratio": 0.3}
    with pytest.raises(ReductionConfigError, match=message):
        ReductionConfig(**(valid | changes))


def test_valid_configs():
    cfg = ReductionConfig(method="fastadasp", schedule="decay", first_layer=9, target=0.3, position="right")
    assert cfg.enabled and cfg.to_dict()["target"] == 0.3
    assert not NO_REDUCTION.enabled
    assert not ReductionConfig(method="fastv", ratio=0.0).enabled
    assert replace(cfg, method="h2o").method == "h2o"
    assert cfg.max_chain is None and replace(cfg, max_chain=2).to_dict()["max_chain"] == 2
    with pytest.raises(ReductionConfigError, match="method='x'"):
        replace(cfg, method="x")


def test_first_layer_checked_against_the_model():
    cfg = ReductionConfig(method="fastadasp", first_layer=32, ratio=0.1)
    cfg.check_layers(33)
    with pytest.raises(ReductionConfigError, match=r"first_layer=32 is outside the model's layers 0..31"):
        cfg.check_layers(32)
    ReductionConfig(first_layer=99).check_layers(32)  # no reduction: nothing to check
