"""Inputs that stress fake-quant rounding: exact ties of the nudged grid and their float neighbours."""

from __future__ import annotations

import numpy as np

import xqat


def tie_heavy_inputs(rng: np.random.Generator, mn: float, mx: float, num_bits: int, narrow: bool, n: int = 1000):
    """Grid ties k+0.5 (in TF's own float32 arithmetic), their neighbours, bounds, and uniform noise."""
    g = xqat.nudge(mn, mx, num_bits, narrow)
    scale, nmin, nmax = (np.float32(t.item()) for t in (g.scale, g.nudged_min, g.nudged_max))
    k = rng.integers(-(1 << num_bits) - 4, (1 << num_bits) + 4, size=n).astype(np.float32)
    ties = ((k + np.float32(0.5)) * scale + nmin).astype(np.float32)
    up = np.nextafter(ties, np.float32(np.inf))
    down = np.nextafter(ties, np.float32(-np.inf))
    width = max(abs(float(mx) - float(mn)), 1e-3)
    noise = rng.uniform(float(mn) - width / 4, float(mx) + width / 4, n).astype(np.float32)
    fixed = np.array([mn, mx, 0.0, -0.0, nmin, nmax, np.nextafter(nmax, np.float32(np.inf)),
                      np.nextafter(nmin, np.float32(-np.inf))], np.float32)
    return np.concatenate([ties, up, down, noise, fixed]).astype(np.float32)


def random_range(rng: np.random.Generator, kind: int) -> tuple[np.float32, np.float32]:
    """Ranges of every kind TF special-cases: straddling 0, min=0, max=0, min>0, max<0."""
    mn = np.float32(rng.uniform(-8, 0))
    mx = np.float32(rng.uniform(0, 8))
    if kind == 1:
        mn = np.float32(0)
    elif kind == 2:
        mx = np.float32(0)
    elif kind == 3:
        mn = np.float32(rng.uniform(0.1, 2))
        mx = mn + np.float32(rng.uniform(0.1, 4))
    elif kind == 4:
        mx = np.float32(-rng.uniform(0.1, 2))
        mn = mx - np.float32(rng.uniform(0.1, 4))
    elif kind == 5:  # tiny ranges: large zero-point sensitivity
        mn = np.float32(-rng.uniform(1e-4, 1e-2))
        mx = np.float32(rng.uniform(1e-4, 1e-2))
    return mn, mx


def bit_mismatches(a: np.ndarray, b: np.ndarray) -> int:
    """Number of elements whose float32 bit patterns differ."""
    a = np.ascontiguousarray(a, np.float32)
    b = np.ascontiguousarray(b, np.float32)
    return int((a.view(np.int32) != b.view(np.int32)).sum())
