"""The two formulas that turn a (min, max) range into a quantization grid.

`nudge` is TensorFlow's fake-quant kernel (float32, zero point from min); `tflite_qparams` is the
TFLite converter (double, zero point from whichever end has the smaller error). They disagree near
zero points of .5, so every other part of xqat calls these two functions and nothing else.
Formulas: docs/numerics.md#nudge and docs/numerics.md#converter-qparams.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

__all__ = ["nudge", "tflite_qparams", "quant_bounds", "check_num_bits", "Nudged", "TFLiteQParams", "int32_bias",
           "bias_codes", "converter_scale", "MIN_WEIGHT_ABSMAX"]

INT32_MAX = (1 << 31) - 1

# The converter widens every FakeQuant range with max - min <= 1e-6 to [-5e-7, 5e-7] before deriving its grid, so
# a weight range that narrow would deploy on another grid than the one trained (all codes change). Weight ranges
# start at +-1e-6 instead: wide enough that the converter keeps them (docs/numerics.md, converter qparams).
MIN_WEIGHT_ABSMAX = 1.0e-6


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


def _nudge_core(mn, mx, qmin, qmax, where, floor):
    """TF's Nudge (docs/numerics.md#nudge) over float32 arrays of either library: each op rounds in float32."""
    steps = qmax - qmin
    scale = (mx - mn) / steps
    inv_scale = steps / (mx - mn)  # computed separately, NOT 1/scale
    zp_from_min = qmin - mn / scale
    f = floor(zp_from_min)  # std::round for values >= 0, exactly (floor(v + .5) would round 0.49999997 up)
    rounded = where((zp_from_min - f) >= 0.5, f + 1, f)
    zp = where(zp_from_min < qmin, qmin, where(zp_from_min > qmax, qmax, rounded))
    return scale, zp, (qmin - zp) * scale, (qmax - zp) * scale, inv_scale


def nudge_with_inverse(min_val, max_val, num_bits: int = 8, narrow_range: bool = False):
    """`nudge` plus TF's separately computed inverse scale, (qmax-qmin)/(max-min), not 1/scale
    (docs/numerics.md#nudge)."""
    qmin_i, qmax_i = quant_bounds(num_bits, narrow_range)
    mn = _as_f32(min_val)
    mx = _as_f32(max_val, device=mn.device)
    qmin = torch.tensor(float(qmin_i), dtype=torch.float32, device=mn.device)
    qmax = torch.tensor(float(qmax_i), dtype=torch.float32, device=mn.device)
    scale, zp, nmin, nmax, inv_scale = _nudge_core(mn, mx, qmin, qmax, torch.where, torch.floor)
    return Nudged(scale, zp, nmin, nmax), inv_scale


def nudge_numpy(min_val, max_val, num_bits: int = 8, narrow_range: bool = False) -> tuple[np.ndarray, ...]:
    """`nudge` in numpy float32, for export-time searches over many candidate ranges."""
    qmin_i, qmax_i = quant_bounds(num_bits, narrow_range)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = _nudge_core(np.asarray(min_val, np.float32), np.asarray(max_val, np.float32),
                          np.float32(qmin_i), np.float32(qmax_i), np.where, np.floor)
    return tuple(np.asarray(v, np.float32) for v in out[:4])


def nudge(min_val, max_val, num_bits: int = 8, narrow_range: bool = False) -> Nudged:
    """(scale, zero_point, nudged_min, nudged_max) exactly as TF's fake-quant kernel computes them.

    float32 throughout, zero point always from `min` and rounded half away from zero (docs/numerics.md#nudge).
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
    (FakeQuantSupport.cc getNudgedScaleAndZeroPoint, docs/numerics.md#converter-qparams). Elementwise over arrays.
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


def converter_scale(scale: float | torch.Tensor, zero_point: int | torch.Tensor, num_bits: int = 8,
                    narrow_range: bool = False) -> torch.Tensor:
    """The converter's double scale of TF's grid (scale, unsigned zero point) as export writes it: (max - min) /
    (qmax - qmin) of the FakeQuant range with the float32 grid ends (qmin - zp)·s, (qmax - zp)·s (the canonical
    range; `canonical_range` searches further only where TF and the converter disagree on those, which is rare).
    Weights: narrow_range=True, zero point 2^(num_bits-1) (symmetric)."""
    qmin, qmax = quant_bounds(num_bits, narrow_range)
    s = torch.as_tensor(scale).to(torch.float32)
    zp = torch.as_tensor(zero_point, device=s.device).to(torch.float32)
    lo, hi = (qmin - zp) * s, (qmax - zp) * s  # float32 products: the range export writes
    return (hi.double() - lo.double()) / float(qmax - qmin)


def bias_codes(bias: torch.Tensor, input_scale: float | torch.Tensor,
               weight_scales: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The converter's int32 bias (docs/numerics.md#bias): round_half_away(b / (s_in · s_w[c])) with its *double*
    scales (`converter_scale`), before that product is stored as float32; dividing by the stored float32 product
    instead flips codes at near-ties (4674.49984 -> 4674 where the converter writes 4675). Returns the codes (float64)
    and where they fit int32 (elsewhere the converter widens the weight scale; export reports it)."""
    s = _double(weight_scales) * _double(input_scale)
    q = bias.detach().double() / torch.where(s > 0, s, torch.ones_like(s))
    t = torch.trunc(q)
    q = t + torch.sign(q) * ((q - t).abs() >= 0.5).double()  # ties away from zero, exactly (no q + 0.5 rounding)
    return q, (s > 0) & (q.abs() <= INT32_MAX)


def _double(v) -> torch.Tensor:
    """A float64 tensor of a scale (a Python float is a double already: never through float32)."""
    return v.detach().double() if isinstance(v, torch.Tensor) else torch.as_tensor(v, dtype=torch.float64)


def int32_bias(bias: torch.Tensor, input_scale: float | torch.Tensor, input_zero_point: int | torch.Tensor,
               weight_scales: torch.Tensor) -> torch.Tensor:
    """`bias` as the .tflite holds it, back in float: the converter's int32 codes (`bias_codes`) on the grid of
    TF's input grid (scale, unsigned zero point) and weight scales, times the float32 bias scale the file stores.
    Where that scale exceeds the output scale (large folded weights into a narrow output range) the rounding is
    worth several output LSB, so the simulation must apply it too. Channels whose code would not fit int32 keep
    the float bias."""
    s_w = converter_scale(weight_scales.detach(), 1 << 7, 8, True)
    s_in = converter_scale(input_scale.detach() if isinstance(input_scale, torch.Tensor) else input_scale,
                           input_zero_point)
    q, fits = bias_codes(bias, s_in, s_w)
    stored = (s_in * s_w).float().double()  # the float32 bias scale in the .tflite
    return torch.where(fits, (q * stored).to(bias.dtype), bias.detach())


class SnappedRange(NamedTuple):
    """A float32 range whose TF nudge and TFLite-converter qparams are the same grid."""

    min: float
    max: float
    scale: float  # float32 value
    zero_point: int  # unsigned code space
    converter_disagreed: bool  # the original range would have given the converter another grid
    scale_moved_ulps: int  # 0 unless the TF grid itself had no agreeing representation


def _agree(mn: np.float32, mx: np.float32, num_bits: int, narrow_range: bool):
    scale, zp, _, _ = nudge_numpy(mn, mx, num_bits, narrow_range)
    q = tflite_qparams(mn, mx, num_bits, narrow_range)
    s, z = np.float32(scale), int(zp)
    return (s, z) if (q.scale == s and int(q.zero_point) == z) else None


def canonical_range(scale: float, zero_point: int, num_bits: int = 8, narrow_range: bool = False,
                    max_ulps: int = 4) -> tuple[float, float] | None:
    """A float32 (min, max) that both TF's nudge and the TFLite converter turn into exactly
    (scale, zero_point); None if no candidate within `max_ulps` of the grid ends does.

    The exporter rebuilds FakeQuant ranges from ONNX Q/DQ (scale, zero point) with this, so the
    .tflite stores the grid torch simulated (docs/numerics.md#converter-qparams, #snapping).
    """
    qmin, qmax = quant_bounds(num_bits, narrow_range)
    s = np.float32(scale)
    base_lo = np.float32(np.float32(qmin - zero_point) * s)  # TF: nudged_min = (qmin - zp) * scale, float32
    base_hi = np.float32(np.float32(qmax - zero_point) * s)
    steps = sorted(range(-max_ulps, max_ulps + 1), key=abs)
    for d in range(0, 2 * max_ulps + 1):  # total ulp distance, smallest first
        for a in steps:
            b_abs = d - abs(a)
            if b_abs < 0:
                continue
            for b in {b_abs, -b_abs}:
                lo, hi = _ulp_shift(base_lo, a), _ulp_shift(base_hi, b)
                if _agree(lo, hi, num_bits, narrow_range) == (s, int(zero_point)):
                    return float(lo), float(hi)
    return None


def _ulp_shift(v: np.float32, n: int) -> np.float32:
    direction = np.float32(np.inf) if n > 0 else np.float32(-np.inf)
    for _ in range(abs(n)):
        v = np.nextafter(v, direction, dtype=np.float32)
    return np.float32(v)


def snap_range(min_val: float, max_val: float, num_bits: int = 8, narrow_range: bool = False) -> SnappedRange:
    """The range to deploy for a learned (min, max): TF's nudged grid (what training simulated),
    written so the converter derives the same grid. If that grid has no such representation, the
    scale moves by the fewest float32 ulps that give one (reported in `scale_moved_ulps`).
    """
    mn, mx = np.float32(min_val), np.float32(max_val)
    scale, zp, _, _ = nudge_numpy(mn, mx, num_bits, narrow_range)
    s, z = np.float32(scale), int(zp)
    disagreed = _agree(mn, mx, num_bits, narrow_range) is None
    for k in range(0, 64):
        for ulps in ([0] if k == 0 else [k, -k]):
            r = canonical_range(_ulp_shift(s, ulps), z, num_bits, narrow_range)
            if r is not None:
                s2 = np.float32(_ulp_shift(s, ulps))
                return SnappedRange(r[0], r[1], float(s2), z, disagreed, ulps)
    raise ValueError(f"no float32 range near [{min_val}, {max_val}] gives TF and the TFLite converter the same "
                     "grid; is the range degenerate (min == max) or not finite?")
