"""`xqat parity`: torch simulation vs the TFLite interpreter, at the output and layer by layer."""

from __future__ import annotations

import argparse

from .args import check_output, load_inputs, non_negative_int, parse_shape, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "parity", help="compare the torch QAT simulation with the .tflite in the interpreter, in output LSB",
        description="Run the same inputs through the QAT model (eval) and the TFLite interpreter and compare "
        "integer codes: identical share, |Δ| histogram, max |Δ|, mean Δ (bias), top-1 agreement. With "
        "--layerwise, every fake-quant point is matched to its TFLite tensor through the mapping stored at "
        "export, and the first diverging layer is named; --local feeds each layer the interpreter's own inputs. "
        "Exit code 1 when an output or layer diverges beyond --tolerance, 2 on a user error or an invalid file.")
    p.add_argument("tflite", metavar="MODEL.tflite", help="a .tflite written by `xqat export`")
    p.add_argument("--model", required=True, metavar="MODULE:FACTORY", help="callable that builds the float model")
    p.add_argument("--weights", required=True, metavar="CKPT", help="QAT checkpoint (.pt)")
    p.add_argument("--input-shape", type=parse_shape, default=None, metavar="N,C,H,W",
                   help="model input shape (default: the one saved in the checkpoint)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", metavar="FILE.npy", help="float inputs, NCHW, batch along axis 0 (finite numbers)")
    src.add_argument("--random", type=positive_int, metavar="N", default=32,
                     help="N uniform [0, 1) random inputs (default 32)")
    p.add_argument("--layerwise", action="store_true", help="compare every layer, name the first diverging one")
    p.add_argument("--local", action="store_true",
                   help="layerwise, teacher-forced: every torch layer gets the interpreter's own int8 inputs, so "
                        "each row is that layer's own mismatch (end to end, differences accumulate)")
    p.add_argument("--backend", choices=["xnnpack", "builtin", "reference"], default="xnnpack",
                   help="interpreter kernels (default xnnpack: what the interpreter uses by default)")
    p.add_argument("--tolerance", type=non_negative_int, default=1,
                   help="LSB beyond which a layer counts as diverging (>= 0, default 1)")
    p.add_argument("--plot", metavar="OUT.png", help="per-layer |Δ| chart")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import load_factory
    from ..tflite.model import read_tflite
    from ..tflite.validate import validate_model

    check_output(args.plot, "plot")  # every argument checked before the slow work
    check_output(args.json, "JSON report")
    validate_model(read_tflite(args.tflite), runnable=True)
    x = load_inputs(args.data) if args.data else None
    build = load_factory(args.model)

    import torch

    from ..checkpoint import load_qat
    from ..export.atomic import atomic_write_bytes
    from ..verify.parity import parity

    qat, shape = load_qat(build, args.weights, args.input_shape)
    if x is None:
        x = torch.rand(args.random, *shape[1:], generator=torch.Generator().manual_seed(0))
    report = parity(qat, args.tflite, x, backend=args.backend, layerwise=args.layerwise, tolerance=args.tolerance,
                    local=args.local)
    print(report.table())
    if args.plot:
        report.plot(args.plot)
        print(f"plot: {args.plot}")
    if args.json:
        atomic_write_bytes(args.json, report.to_json().encode())
    diverging = report.first_divergent or any(t.diverges(args.tolerance) for t in report.outputs)
    return 1 if diverging else 0
