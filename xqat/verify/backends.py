"""The TFLite kernel backends xqat runs and emulates: "xnnpack" (the interpreter's default delegate),
"builtin" (optimized kernels without delegates), "reference" (reference kernels)."""

from __future__ import annotations

from ..errors import InputError

__all__ = ["BACKENDS", "check_backend"]

BACKENDS = ("xnnpack", "builtin", "reference")


def check_backend(name: str) -> str:
    """`name` if it is one of BACKENDS; otherwise InputError saying which names exist."""
    if name not in BACKENDS:
        raise InputError(f"backend must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name
