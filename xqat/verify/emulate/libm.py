"""float32 expf/tanhf/erfcf from the C math library the TFLite runtime itself links (glibc libm on Linux).

The lookup tables of LOGISTIC, TANH, GELU and SOFTMAX are built from expf/tanhf/erfcf in float32;
a 1-ulp difference in expf can flip a table entry at a rounding tie, so the tables call the same
libm functions through ctypes. Elsewhere numpy's float32 functions are the (documented) fallback.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
from functools import lru_cache

import numpy as np

__all__ = ["erfcf", "expf", "tanhf"]


@lru_cache(maxsize=1)
def _libm():
    name = ctypes.util.find_library("m")
    if name is None:
        return None
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return None
    for fn in ("expf", "tanhf", "erfcf"):
        getattr(lib, fn).restype = ctypes.c_float
        getattr(lib, fn).argtypes = [ctypes.c_float]
    return lib


def _apply(name: str, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    lib = _libm()
    if lib is None:  # pragma: no cover - non-glibc platforms
        return getattr(np, name[:-1])(x).astype(np.float32)
    f = getattr(lib, name)
    return np.array([f(float(v)) for v in x.ravel()], np.float32).reshape(x.shape)


def expf(x) -> np.ndarray:
    """Elementwise C expf on float32 values."""
    return _apply("expf", x)


def tanhf(x) -> np.ndarray:
    """Elementwise C tanhf on float32 values."""
    return _apply("tanhf", x)


def erfcf(x) -> np.ndarray:
    """Elementwise C erfcf on float32 values (std::erfc of a float, GELU's exact form)."""
    x = np.asarray(x, np.float32)
    if _libm() is None:  # pragma: no cover - non-glibc platforms: erfc in double, rounded to float32
        return np.array([math.erfc(float(v)) for v in x.ravel()], np.float32).reshape(x.shape)
    return _apply("erfcf", x)
