"""`xqat export`: rebuild a trained QAT model and write a verified full-integer .tflite."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from .args import check_output, parse_shape

__all__ = ["add_parser", "run", "parse_shape"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="export a trained QAT model to a full-integer .tflite and verify every scale/zero point",
        description="Rebuild the float model with MODULE:FACTORY, apply the QAT checkpoint (xqat.save_qat or a "
        "state_dict of the prepare_qat model), export through ONNX Q/DQ and onnx2tf to a full-integer .tflite, "
        "and print the per-tensor report (torch vs tflite scale and zero point). Exit code 1 when the report "
        "finds a problem, 2 on a user error; the outputs (.tflite and --json) are written together or not at all.")
    p.add_argument("factory", metavar="MODULE:FACTORY",
                   help="callable that builds the float model, e.g. mypkg.nets:build or path/to/nets.py:build")
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
    from ..checkpoint import load_factory

    check_output(args.output, ".tflite file")  # every output checked before the slow work
    check_output(args.json, "JSON report")
    if args.saved_model:
        from ..export.atomic import check_writable

        check_writable(args.saved_model, what="SavedModel folder", directory=True)
    build = load_factory(args.factory)  # a bad MODULE:FACTORY fails before torch and the checkpoint load

    import torch

    from ..checkpoint import load_qat
    from ..export.api import export_tflite, save_report_json

    qat, shape = load_qat(build, args.weights, args.input_shape)
    out = Path(args.output)
    existed = out.exists()
    report = export_tflite(qat, torch.zeros(shape), out, io_dtype=args.io_dtype,
                           saved_model_dir=args.saved_model, edgetpu=args.edgetpu)
    if args.json:
        try:
            save_report_json(report, args.json)
        except BaseException:
            if not existed:  # all outputs or none: take back the fresh .tflite
                with contextlib.suppress(OSError):
                    out.unlink()
            raise
    print(report.table())
    return 0 if report.ok else 1
