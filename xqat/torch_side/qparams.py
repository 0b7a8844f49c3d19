"""The two formulas that turn a (min, max) range into a quantization grid.

`nudge` is TensorFlow's fake-quant kernel (float32, zero point from min); `tflite_qparams` is the
TFLite converter (double, zero point from whichever end has the smaller error). They disagree near
zero points of .5, so every other part of xqat calls these two functions and nothing else.
Spec: tf-quant-semantics.md §1.2 (nudge) and §4.3 (converter).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

__all__ = ["nudge", "tflite_qparams", "quant_bounds", "check_num_bits", "Nudged", "TFLiteQParams"]


def check_num_bits(num_bits: int) -> None:
    """TF accepts 2..16 bits (fake_quant_ops.cc); anything else is a user error."""
    if isinstance(num_bits, bool) or not isinstance(num_bits, (int, np.integer)):
        raise TypeError(f"num_bits must be an int in 2..16, got {type(num_bits).__name__} {num_bits!r}")
    if not 2 <= num_bits <= 16:
        raise ValueError(f"num_bits must be between 2 and 16 inclusive (as in TensorFlow), got {num_bits}")


def quant_bounds(num_bits: int, narrow_range: bool) -> tuple[int, int]:
    """Unsigned code range (quant_min, quant_max) of TF fake-quant: [0 or 1, 2^bits - 1]."""
    check_num_bits(num_bits)
    return (1 if narrow_range else 0), (1 << int(num_bits)) - 1


class Nudged(NamedTuple):
    """TF's nudged grid, all float32 tensors (zero_point is an integer-valued float, unsigned codes)."""

    scale: torch.Tensor
    zero_point: torch.Tensor
    nudged_min: torch.Tensor
    nudged_max: torch.Tensor


def _as_f32(v, device=None) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v.to(device=device if device is not None else v.device, dtype=torch.float32)
    return torch.as_tensor(v, dtype=torch.float32, device=device)


def _round_half_away_nonneg(v: torch.Tensor) -> torch.Tensor:
    """std::round for v >= 0, exactly: floor(v + 0.5) in float32 would round 0.49999997 up."""
    f = torch.floor(v)
    return f + ((v - f) >= 0.5).to(v.dtype)


def nudge_with_inverse(min_val, max_val, num_bits: int = 8, narrow_range: bool = False):
    """`nudge` plus TF's separately computed inverse scale, (qmax-qmin)/(max-min), not 1/scale (§1.2)."""
    qmin_i, qmax_i = quant_bounds(num_bits, narrow_range)
    mn = _as_f32(min_val)
    mx = _as_f32(max_val, device=mn.device)
    qmin = torch.tensor(float(qmin_i), dtype=torch.float32, device=mn.device)
    qmax = torch.tensor(float(qmax_i), dtype=torch.float32, device=mn.device)
    steps = qmax - qmin
    scale = (mx - mn) / steps
    inv_scale = steps / (mx - mn)
    zp_from_min = qmin - mn / scale
    zp = torch.where(
        zp_from_min < qmin, qmin, torch.where(zp_from_min > qmax, qmax, _round_half_away_nonneg(zp_from_min))
    )
    nudged_min = (qmin - zp) * scale
    nudged_max = (qmax - zp) * scale
    return Nudged(scale, zp, nudged_min, nudged_max), inv_scale


def nudge(min_val, max_val, num_bits: int = 8, narrow_range: bool = False) -> Nudged:
    """(scale, zero_point, nudged_min, nudged_max) exactly as TF's fake-quant kernel computes them.

    float32 throughout, zero point always from `min` and rounded half away from zero (§1.2).
    Works elementwise, so per-channel ranges nudge channel by channel.
    """
    return nudge_with_inverse(min_val, max_val, num_bits, narrow_range)[0]


class TFLiteQParams(NamedTuple):
    """What the TFLite converter stores for a FakeQuant(min, max): float32 scale, zero point in the
    unsigned code space of the fake-quant, and the signed form that lands in an int8 .tflite."""

    scale: np.ndarray  # float32
    zero_point: np.ndarray  # int64, unsigned code space [quant_min, quant_max]
    zero_point_signed: np.ndarray  # int64, zero_point - 2^(num_bits-1): the int8 (int16...) zero point


def tflite_qparams(min_val, max_val, num_bits: int = 8, narrow_range: bool = False) -> TFLiteQParams:
    """(scale, zero point) the TFLite converter derives from a FakeQuant's min/max.

    Double arithmetic; the zero point comes from min or max, whichever adds less error
    (FakeQuantSupport.cc getNudgedScaleAndZeroPoint, §4.3). Elementwise over arrays.
    """
    qmin, qmax = quant_bounds(num_bits, narrow_range)
    rmin = np.asarray(min_val.detach().cpu() if isinstance(min_val, torch.Tensor) else min_val, np.float64)
    rmax = np.asarray(max_val.detach().cpu() if isinstance(max_val, torch.Tensor) else max_val, np.float64)
    rmin, rmax = np.broadcast_arrays(rmin, rmax)
    with np.errstate(divide="ignore", invalid="ignore"):
        degenerate = np.abs(rmax - rmin) < np.finfo(np.float64).eps
        scale = np.where(degenerate, 1.0, (rmax - rmin) / float(qmax - qmin))
        zfm = qmin - rmin / scale
        err_min = abs(qmin) + np.abs(rmin / scale)
        zfx = qmax - rmax / scale
        err_max = abs(qmax) + np.abs(rmax / scale)
        z = np.where(err_min < err_max, zfm, zfx)
        # z lies in [qmin, qmax] >= 0 wherever it is used: round half away = floor + (frac >= .5),
        # with the exact fraction so 0.49999999999999994 does not round up as floor(z + .5) would.
        rounded = np.floor(z) + (z - np.floor(z) >= 0.5)
        zp = np.where(z < qmin, qmin, np.where(z > qmax, qmax, rounded))
        zp = np.where(degenerate, qmin, zp)
    zp = zp.astype(np.int64)
    return TFLiteQParams(scale.astype(np.float32), zp, zp - (1 << (num_bits - 1)))
