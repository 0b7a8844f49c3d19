"""`xqat` command line: thin wrappers that parse arguments, call the public API and print tables.

Each subcommand lives in its own module of this package and exposes `add_parser(subparsers)`,
which registers the subcommand and sets `func` to a callable taking the parsed args and returning
an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..errors import XQATError

# Subcommand modules, in the order `xqat --help` lists them.
COMMANDS = ["demo", "export", "parity", "check_edgetpu"]

DESCRIPTION = """\
xqat trains quantization-aware models in PyTorch with TensorFlow's exact fake-quant numerics and
deploys them as full-integer TFLite models (EdgeTPU-ready) whose scales and zero points are the ones
learned in torch.

Typical flow:
  xqat demo                                  train -> QAT -> export -> parity on the bundled digits data
  xqat export pkg.nets:build --weights qat.pt -o model.tflite
                                             full-integer .tflite, every scale/zero point checked vs torch
  xqat parity model.tflite --model pkg.nets:build --weights qat.pt --layerwise
                                             torch simulation vs interpreter, per output and per layer
  xqat check-edgetpu model.tflite            what EdgeTPU compiler 16 would reject or run on the CPU
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xqat", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"xqat {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(sub)
    return parser


def _version() -> str:
    from .. import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except XQATError as e:
        print(f"xqat {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
