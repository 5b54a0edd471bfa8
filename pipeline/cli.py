"""Command-line flags shared by the jobs: one way to spell a reduction on every entry point."""

from __future__ import annotations

import argparse

from pipeline.merging.config import MASS_ESTIMATORS, METHODS, POSITIONS, SCHEDULES, ReductionConfig


def add_reduction_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("token reduction")
    group.add_argument("--method", choices=METHODS, default="none")
    group.add_argument("--schedule", choices=SCHEDULES, default="constant")
    group.add_argument("--first-layer", type=int, default=0)
    amount = group.add_mutually_exclusive_group()
    amount.add_argument("--ratio", type=float, help="fraction of audio tokens removed at the first layer")
    amount.add_argument("--target", type=float, help="fraction of audio KV removed, averaged over layers")
    group.add_argument("--position", choices=POSITIONS, default="first")
    group.add_argument("--mass", choices=MASS_ESTIMATORS, default="full")
    group.add_argument("--seed", type=int, default=0)


def reduction_from_args(args: argparse.Namespace) -> ReductionConfig:
    if args.method == "none":
        return ReductionConfig()
    return ReductionConfig(
        method=args.method,
        schedule=args.schedule,
        first_layer=args.first_layer,
        ratio=args.ratio,
        target=args.target,
        position=args.position,
        mass=args.mass,
        seed=args.seed,
    )
