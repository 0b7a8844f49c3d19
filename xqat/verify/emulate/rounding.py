"""Integer rounding primitives of the TFLite int8 kernels, in torch int64 (tf-quant-semantics §5).

Every function takes int64 tensors that hold the int32 values the C++ kernels hold, so the results
are the kernels' results bit for bit. Multiplier encodings (`quantize_multiplier`) run once per op on
numpy/python scalars; the per-element work runs on the device.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "quantize_multiplier", "srdhm", "rdbp", "mbqm", "mbqm_ruy", "mbqm_single", "round_half_away",
    "wrap_int32", "fp32_requantize", "float64_requantize",
]

INT32_MIN = -(1 << 31)
INT32_MAX = (1 << 31) - 1


def quantize_multiplier(m) -> tuple[np.ndarray, np.ndarray]:
    """TFLite QuantizeMultiplier (§5.1): m = q * 2^shift with q an int32 in [2^30, 2^31), elementwise.

    frexp, then round-half-away of q * 2^31; shifts below -31 flush to (0, 0). Exact in double.
    """
    m = np.atleast_1d(np.asarray(m, np.float64))
    mult = np.zeros(m.shape, np.int64)
    shift = np.zeros(m.shape, np.int64)
    for i, v in enumerate(m.ravel()):
        if v == 0.0:
            continue
        q, s = math.frexp(float(v))
        q_fixed = int(math.copysign(math.floor(abs(q) * (1 << 31) + 0.5), q))  # exact: q*2^31 has <= 53 bits
        if q_fixed == (1 << 31):
            q_fixed //= 2
            s += 1
        if s < -31:
            s, q_fixed = 0, 0
        mult.flat[i] = q_fixed
        shift.flat[i] = s
    return mult, shift


def wrap_int32(x: torch.Tensor) -> torch.Tensor:
    """Two's-complement wrap of int64 values to int32, as C++ int32 arithmetic does on x86."""
    return ((x + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)


def srdhm(a: torch.Tensor, b) -> torch.Tensor:
    """gemmlowp SaturatingRoundingDoublingHighMul (§5.2), i.e. (a*b + nudge) / 2^31 truncated.

    For every sign of a*b this equals floor((a*b + 2^30) / 2^31): with the negative nudge 1 - 2^30
    and truncation, negative ties round toward +inf too. So it is one add and one arithmetic shift;
    only a == b == INT32_MIN saturates.
    """
    out = (a * b).add_(1 << 30).bitwise_right_shift_(31)
    if isinstance(b, torch.Tensor) or b == INT32_MIN:
        overflow = (a == INT32_MIN) & (torch.as_tensor(b, device=a.device) == INT32_MIN)
        out = torch.where(overflow, torch.full_like(out, INT32_MAX), out)
    return out


def rdbp(x: torch.Tensor, exponent) -> torch.Tensor:
    """gemmlowp RoundingDivideByPOT (§5.2): arithmetic shift right, rounding half away from zero.

    Equals (x + 2^(e-1) - [x < 0]) >> e: the -1 for negative x turns the half-up shift into half-away;
    x >> 63 is that -[x < 0] for int64.
    """
    if not isinstance(exponent, torch.Tensor):
        if exponent == 0:
            return x
        return (x >> 63).add_(x).add_(1 << (int(exponent) - 1)).bitwise_right_shift_(int(exponent))
    half = torch.bitwise_left_shift(torch.ones_like(exponent), exponent) >> 1  # 0 where exponent == 0
    return (x + half + torch.where(exponent > 0, x >> 63, 0)) >> exponent


def _split_shift(shift):
    if isinstance(shift, torch.Tensor):
        return shift.clamp(min=0), (-shift).clamp(min=0)
    return max(int(shift), 0), max(-int(shift), 0)


def _left(x: torch.Tensor, left) -> torch.Tensor:
    """x * 2^left with the int32 wrap of the C++ expression `x * (1 << left_shift)`."""
    if isinstance(left, int) and left == 0:
        return x
    return wrap_int32(x << left)


def mbqm(x: torch.Tensor, mult, shift) -> torch.Tensor:
    """TFLite MultiplyByQuantizedMultiplier, double rounding (pip build, §5.2):
    RDBP(SRDHM(x * 2^left, M), right)."""
    left, right = _split_shift(shift)
    return rdbp(srdhm(_left(x, left), mult), right)


def mbqm_ruy(x: torch.Tensor, mult, shift) -> torch.Tensor:
    """ruy's x86 AVX requantization (§5.2): r = (x*2^left*M + 2^30) >> 31, then (r + 2^(e-1)) >> e.

    The first step is exactly SRDHM; the second rounds half up (toward +inf) where gemmlowp's RDBP
    rounds half away from zero, so the two differ only on negative ties of the final shift.
    """
    left, right = _split_shift(shift)
    r = srdhm(_left(x, left), mult)
    if isinstance(right, torch.Tensor):
        return (r + (torch.bitwise_left_shift(torch.ones_like(right), right) >> 1)) >> right
    if right == 0:
        return r
    return r.add_(1 << (right - 1)).bitwise_right_shift_(right)


def mbqm_single(x: torch.Tensor, mult, shift) -> torch.Tensor:
    """TFLITE_SINGLE_ROUNDING MultiplyByQuantizedMultiplier (§5.2): (x*M + 2^(30-shift)) >> (31-shift)."""
    total = 31 - shift
    return (x * mult + (torch.bitwise_left_shift(torch.ones_like(total), total - 1)
                        if isinstance(total, torch.Tensor) else (1 << (total - 1)))) >> total


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C/C++ round()/TfLiteRound on any float dtype: ties away from zero, exact (no x+0.5 double rounding)."""
    t = torch.trunc(x)
    frac = x - t  # exact for floats
    return t + torch.sign(x) * (frac.abs() >= 0.5).to(x.dtype)


def fp32_requantize(acc: torch.Tensor, scale: torch.Tensor, zero_point: int, qmin: int,
                    qmax: int) -> torch.Tensor:
    """XNNPACK "fp32" requantization (§5.3): float32(acc) * scale, clamp to [qmin-zp, qmax-zp], round half
    even (lrintf / magic-bias), + zp. `scale` is a float32 tensor broadcast over the channel (last) dim."""
    v = acc.to(torch.float32) * scale
    v = v.clamp(float(qmin - zero_point), float(qmax - zero_point))
    return torch.round(v).to(torch.int64) + zero_point


def float64_requantize(acc: torch.Tensor, multiplier: torch.Tensor) -> torch.Tensor:
    """TFLite reference FULLY_CONNECTED (§5.3): round_half_away(double(acc) * double multiplier)."""
    return round_half_away(acc.to(torch.float64) * multiplier).to(torch.int64)
