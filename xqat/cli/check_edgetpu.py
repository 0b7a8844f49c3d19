"""`xqat check-edgetpu`: static EdgeTPU readiness of a .tflite file (what compiler 16 would reject)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check-edgetpu",
        help="check a .tflite model for EdgeTPU compiler 16 (no compiler needed)",
        description="Reads the flatbuffer and reports what edgetpu_compiler 16 would reject (FAIL), leave on "
        "the CPU (CPU) or risk (WARN), with a fix for each, and estimates the TPU segment. "
        "Exit code 1 when any FAIL is found, 2 when the file cannot be read.",
    )
    p.add_argument("model", help="path to the .tflite file")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..edgetpu.check import check_edgetpu

    report = check_edgetpu(args.model)
    print(report.to_json() if args.json else report.table())
    return 0 if report.ok else 1
