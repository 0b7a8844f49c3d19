"""`xqat` command line: thin wrappers that parse arguments, call the public API and print tables.

Each subcommand lives in its own module of this package and exposes `add_parser(subparsers)`,
which registers the subcommand and sets `func` to a callable taking the parsed args and returning
an exit code. Exit codes, everywhere: 0 ok, 1 the check found a problem, 2 user error or invalid input
(one line on stderr, no traceback), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..errors import XQATError

# Subcommand modules, in the order `xqat --help` lists them.
COMMANDS = ["demo", "export", "parity", "check_edgetpu"]

EXIT_OK, EXIT_FOUND, EXIT_USER_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130

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

Exit codes: 0 ok, 1 the check found a problem, 2 user error or invalid input, 130 interrupted.
"""


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block), exit code 2 as everywhere."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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


def untrust_working_directory() -> None:
    """`python -m xqat` puts the current folder first on sys.path, where a stray onnx2tf.py or torch.py
    would shadow the real package; move it last (a factory module there is still found)."""
    if sys.path and sys.path[0] in ("", os.getcwd()):
        sys.path.append(sys.path.pop(0))


class _Interrupts:
    """SIGINT raises KeyboardInterrupt as usual, and is remembered: an interrupt that lands inside a library's
    import can surface as another error (numpy, half imported, recursing); it still ends as 'interrupted'."""

    def __init__(self) -> None:
        self.seen = False

    def __call__(self, signum, frame):
        self.seen = True
        raise KeyboardInterrupt

    def install(self) -> None:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, self)

    def uninstall(self, process_ends: bool) -> None:
        """Put the default back; when the process is about to end (a real command line, not a call from
        Python), ignore SIGINT instead: an interrupt during interpreter shutdown changes nothing any more."""
        import signal

        if signal.getsignal(signal.SIGINT) is self:
            signal.signal(signal.SIGINT, signal.SIG_IGN if process_ends else signal.default_int_handler)


def main(argv: list[str] | None = None) -> int:
    command = "xqat"
    interrupts = _Interrupts()
    try:
        interrupts.install()
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return EXIT_USER_ERROR
        command = f"xqat {args.command}"
        from ..export.workdir import terminate_raises

        with terminate_raises():  # SIGTERM: cleanup (temporary files) runs, then exit 143
            code = int(args.func(args) or 0)
        if interrupts.seen:  # a Ctrl-C whose KeyboardInterrupt a library swallowed (a C callback): still interrupted
            raise KeyboardInterrupt
        return code
    except XQATError as e:
        print(f"{command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except MemoryError:
        print(f"{command}: error: out of memory; use smaller inputs or batches", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception:
        if not interrupts.seen:
            raise
        print(f"{command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        interrupts.uninstall(process_ends=argv is None)


if __name__ == "__main__":  # pragma: no cover
    untrust_working_directory()
    sys.exit(main())
