"""`xqat demo`: the main job end to end on the bundled default data."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train -> QAT -> export -> verify on the bundled digits data (no download, ~1-2 min)",
        description="Train a small float CNN on scikit-learn's digits (bundled, upsampled to 16x16), fine-tune "
        "it with QAT, export a full-integer .tflite, and print one table: accuracy of the float model, the QAT "
        "simulation, the int8 TFLite and a post-training-quantized TFLite of the same float model; parity; the "
        "EdgeTPU check; size and latency. Everything is saved in a run folder.")
    p.add_argument("--out", default="runs", help="parent folder of the run folder (default: runs/)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--epochs", type=int, default=8, help="float training epochs (default 8)")
    p.add_argument("--qat-epochs", type=int, default=3, help="QAT fine-tuning epochs (default 3)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..demo.pipeline import run_demo

    res = run_demo(args.out, seed=args.seed, epochs=args.epochs, qat_epochs=args.qat_epochs)
    return 0 if res.edgetpu.get("ok") else 1
