"""Command-line flags shared by the jobs: one way to spell a reduction on every entry point (the
rest of the jobs' conventions: jobs/common.py)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from pipeline.merging.config import MASS_ESTIMATORS, METHODS, POSITIONS, SCHEDULES, ReductionConfig


def add_reduction_args(parser: argparse.ArgumentParser, sweep: bool = False) -> None:
    """The reduction flags. ``sweep``: --methods and --levels (audio-KV targets) in place of --method
    and --ratio / --target, for a job that runs every method at every level (sweep_from_args)."""
    group = parser.add_argument_group("token reduction (README: Token reduction)")
    if sweep:
        group.add_argument(
            "--methods",
            nargs="+",
            choices=METHODS,
            default=["none", "fastadasp"],
            help="methods compared, each at every --levels (none once)",
        )
        group.add_argument(
            "--levels", type=float, nargs="+", default=[0.5], help="target audio-KV reductions"
        )
    else:
        group.add_argument(
            "--method",
            choices=METHODS,
            default="none",
            help="fastadasp: merge similar adjacent audio tokens weighted by attention mass; average, "
            "random-merge, a-tome: other merges; fastv, random-evict, h2o: evictions",
        )
        amount = group.add_mutually_exclusive_group()
        amount.add_argument("--ratio", type=float, help="fraction of audio tokens removed at the first layer")
        amount.add_argument("--target", type=float, help="fraction of audio KV removed, averaged over layers")
    group.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default="constant",
        help="single: one reduction at --first-layer; constant: the same ratio at every layer from it; "
        "decay: a ratio falling linearly to 0 at the last layer",
    )
    group.add_argument("--first-layer", type=int, default=0, help="the first layer that reduces (from 0)")
    group.add_argument(
        "--position",
        choices=POSITIONS,
        default="first",
        help="a merged token's position id: its group's first position, or right-aligned",
    )
    group.add_argument(
        "--mass",
        choices=MASS_ESTIMATORS,
        default="full",
        help="attention mass from every query (full) or only the queries after the audio (tail)",
    )
    group.add_argument("--seed", type=int, default=0, help="seed of the random methods")
    group.add_argument(
        "--max-chain", type=int, help="most tokens one merge chain may join (chain methods; default: no cap)"
    )


def reduction_from_args(args: argparse.Namespace) -> ReductionConfig:
    return _reduction(args, args.method, ratio=args.ratio, target=args.target)


def sweep_from_args(args: argparse.Namespace) -> Iterator[tuple[str, float, ReductionConfig]]:
    """(method, level, reduction) for each of --methods at each of --levels; ``none`` once, at 0."""
    for method in args.methods:
        for level in [0.0] if method == "none" else args.levels:
            yield method, level, _reduction(args, method, target=level)


def _reduction(
    args: argparse.Namespace, method: str, ratio: float | None = None, target: float | None = None
) -> ReductionConfig:
    if method == "none":
        return ReductionConfig()
    return ReductionConfig(
        method=method,
        schedule=args.schedule,
        first_layer=args.first_layer,
        ratio=ratio,
        target=target,
        position=args.position,
        mass=args.mass,
        seed=args.seed,
        max_chain=args.max_chain,
    )
