"""`xqat check-edgetpu`: static EdgeTPU readiness of a .tflite file (what compiler 16 would refuse or not map).

Exit codes (docs/edgetpu.md, "Levels"): 0 = every op maps to the EdgeTPU; 1 = the check found a problem:
the compiler would refuse the model (FAIL), or some ops would run on the CPU (with --allow-cpu, only FAIL
counts); 2 = the file cannot be read or is structurally invalid (the TFLite runtime would refuse it).
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check-edgetpu",
        help="check a .tflite model for EdgeTPU compiler 16 (no compiler needed)",
        description="Reads the flatbuffer and reports what edgetpu_compiler 16 would refuse (FAIL), leave on "
        "the CPU (CPU) or is worth knowing (WARN), with a fix for each, and where the one TPU segment starts "
        "and ends. Exit code 0 when every op maps, 1 when the model would fail to compile or run partly on "
        "the CPU (--allow-cpu: only a failed compile), 2 when the file cannot be read or is invalid (a file the "
        "TFLite runtime would refuse).",
    )
    p.add_argument("model", help="path to the .tflite file")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--allow-cpu", action="store_true",
                   help="exit 0 for a model that compiles with some ops on the CPU (e.g. a custom postprocessing op)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..edgetpu.check import check_edgetpu

    report = check_edgetpu(args.model)
    print(report.to_json() if args.json else report.table())
    passed = report.ok if args.allow_cpu else report.fully_mapped
    return 0 if passed else 1
