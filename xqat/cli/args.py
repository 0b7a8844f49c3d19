"""Argument types and checks shared by the subcommands: all of them run before any slow work, so a typo
costs a second, not a whole export or parity run."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from ..errors import InputError

__all__ = ["parse_shape", "positive_int", "non_negative_int", "check_output", "load_inputs"]


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} must be comma-separated ints, e.g. 1,3,224,224") from None
    if not shape or any(d < 1 for d in shape):
        raise argparse.ArgumentTypeError(f"shape {text!r} must have positive dimensions")
    from ..checkpoint import MAX_EXAMPLE_ELEMENTS

    if math.prod(shape) > MAX_EXAMPLE_ELEMENTS:
        raise argparse.ArgumentTypeError(f"shape {text!r} has {math.prod(shape):,} elements (at most "
                                         f"{MAX_EXAMPLE_ELEMENTS:,}); is there a typo?")
    return shape


def _int_at_least(text: str, minimum: int) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {v}")
    return v


def positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def check_output(path: str | os.PathLike | None, what: str) -> None:
    """Fail now if an output file cannot be written later (missing folder, a directory, no permission)."""
    if path is not None:
        from ..export.atomic import check_writable

        check_writable(path, what=what)


def load_inputs(path: str | os.PathLike):
    """A float tensor from a .npy file of finite numbers, batch along axis 0; anything else is an InputError."""
    import numpy as np
    import torch

    p = Path(path)
    if not p.is_file():
        raise InputError(f"--data {p}: no such file")
    try:
        a = np.load(p, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise InputError(f"cannot read inputs from {p}: {e} (save them with numpy.save as one .npy array)") from e
    if not isinstance(a, np.ndarray):  # an .npz archive
        a.close()
        raise InputError(f"--data {p} is an .npz archive; save one array with numpy.save (.npy)")
    if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_) or np.iscomplexobj(a):
        raise InputError(f"--data {p} holds {a.dtype} values; parity needs real numbers (float32 images, NCHW)")
    if a.ndim < 2 or a.size == 0:
        raise InputError(f"--data {p} has shape {a.shape}; parity needs a non-empty batch along axis 0")
    x = torch.from_numpy(a.astype(np.float32))
    if not bool(torch.isfinite(x).all()):
        raise InputError(f"--data {p} contains NaN or Inf (or values beyond float32); clean the inputs first")
    return x
