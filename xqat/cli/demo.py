"""`xqat demo`: the main job end to end on the bundled default data."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the end-to-end demo on the bundled data (no download)",
        description="Smoke test of the installation: TF-exact fake quant checked against TensorFlow's "
        "own kernel, and learned ranges carried through the TFLite converter.",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..demo import smoke

    return 0 if smoke(seed=args.seed) else 1
