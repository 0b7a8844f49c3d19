"""`xqat export`: rebuild a trained QAT model and write a verified full-integer .tflite."""

from __future__ import annotations

import argparse


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} must be comma-separated ints, e.g. 1,3,224,224") from None
    if not shape or any(d < 1 for d in shape):
        raise argparse.ArgumentTypeError(f"shape {text!r} must have positive dimensions")
    return shape


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="export a trained QAT model to a full-integer .tflite and verify every scale/zero point",
        description="Rebuild the float model with MODULE:FACTORY, apply the QAT checkpoint (xqat.save_qat or a "
        "state_dict of the prepare_qat model), export through ONNX Q/DQ and onnx2tf to a full-integer .tflite, "
        "and print the per-tensor report (torch vs tflite scale and zero point).")
    p.add_argument("factory", metavar="MODULE:FACTORY",
                   help="callable that builds the float model, e.g. mypkg.nets:build")
    p.add_argument("--weights", required=True, metavar="CKPT", help="QAT checkpoint (.pt)")
    p.add_argument("--input-shape", type=parse_shape, default=None, metavar="N,C,H,W",
                   help="model input shape (default: the one saved in the checkpoint)")
    p.add_argument("-o", "--output", required=True, metavar="MODEL.tflite", help="where to write the .tflite")
    p.add_argument("--io-dtype", choices=["int8", "uint8", "float32"], default="int8", help="model I/O type")
    p.add_argument("--saved-model", metavar="DIR", default=None, help="also keep the TF FakeQuant graph here")
    p.add_argument("--edgetpu", action="store_true", help="refuse layers and graphs that would leave the EdgeTPU")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the report as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import load_qat
    from ..export.api import export_tflite, save_report_json

    qat, shape = load_qat(args.factory, args.weights, args.input_shape)
    import torch

    report = export_tflite(qat, torch.zeros(shape), args.output, io_dtype=args.io_dtype,
                           saved_model_dir=args.saved_model, edgetpu=args.edgetpu)
    print(report.table())
    if args.json:
        save_report_json(report, args.json)
    return 0 if report.ok else 1
