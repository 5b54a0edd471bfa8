"""pipeline/cli.py: the reduction flags spell the same ReductionConfig on one job and in a sweep."""

from __future__ import annotations

import argparse
from dataclasses import replace

from pipeline.cli import add_reduction_args, reduction_from_args, sweep_from_args
from pipeline.merging.config import ReductionConfig


def _parse(argv: list[str], sweep: bool = False) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_reduction_args(parser, sweep=sweep)
    return parser.parse_args(argv)


def test_one_reduction_with_every_setting():
    argv = ["--method", "fastadasp", "--schedule", "decay", "--first-layer", "2", "--ratio", "0.3"]
    argv += ["--position", "right", "--mass", "tail", "--seed", "4", "--max-chain", "2"]
    assert reduction_from_args(_parse(argv)) == ReductionConfig(
        "fastadasp", "decay", 2, ratio=0.3, position="right", mass="tail", seed=4, max_chain=2
    )
    assert reduction_from_args(_parse([])) == ReductionConfig()


def test_sweep_runs_none_once_and_each_method_at_each_level():
    args = _parse(["--methods", "none", "average", "--levels", "0.2", "0.4", "--max-chain", "3"], sweep=True)
    capped = ReductionConfig("average", target=0.2, max_chain=3)
    assert list(sweep_from_args(args)) == [
        ("none", 0.0, ReductionConfig()),
        ("average", 0.2, capped),
        ("average", 0.4, replace(capped, target=0.4)),
    ]
