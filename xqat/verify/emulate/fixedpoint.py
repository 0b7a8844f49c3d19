"""gemmlowp fixed-point functions used by the TFLite reference int8 SOFTMAX, on int64 tensors holding int32.

Transcribed from the semantics of gemmlowp `fixedpoint.h` (exp_on_negative_values,
one_over_one_plus_x_for_x_in_0_1) and TFLite `GetReciprocal`; each step rounds exactly as the C++.
"""

from __future__ import annotations

import torch

from .rounding import INT32_MAX, INT32_MIN, rdbp, srdhm, wrap_int32

__all__ = ["exp_on_negative_values", "one_over_one_plus_x_for_x_in_0_1", "get_reciprocal", "sat_mul_pot"]


def sat_mul_pot(x: torch.Tensor, exponent: int) -> torch.Tensor:
    """SaturatingRoundingMultiplyByPOT<exponent>: saturating left shift, or rounding right shift."""
    if exponent == 0:
        return x
    if exponent < 0:
        return rdbp(x, -exponent)
    thr = (1 << (31 - exponent)) - 1
    out = wrap_int32(x << exponent)
    out = torch.where(x > thr, torch.full_like(out, INT32_MAX), out)
    return torch.where(x < -thr, torch.full_like(out, INT32_MIN), out)


def _exp_quarter(a: torch.Tensor) -> torch.Tensor:
    """exp(x) for x in [-1/4, 0), Q0.31 in and out (Taylor expansion around -1/8)."""
    constant_term = 1895147668
    one_third = 715827883
    x = wrap_int32(a + (1 << 28))
    x2 = srdhm(x, x)
    x3 = srdhm(x2, x)
    x4 = srdhm(x2, x2)
    x4_over_4 = sat_mul_pot(x4, -2)
    t = sat_mul_pot(wrap_int32(srdhm(wrap_int32(x4_over_4 + x3), one_third) + x2), -1)
    return wrap_int32(constant_term + srdhm(torch.full_like(x, constant_term), wrap_int32(x + t)))


_BARREL = ((-2, 1672461947), (-1, 1302514674), (0, 790015084), (1, 290630308), (2, 39332535), (3, 720401),
           (4, 242))


def exp_on_negative_values(a: torch.Tensor, integer_bits: int) -> torch.Tensor:
    """exp(a) for a <= 0 given in Q(integer_bits).(31-integer_bits); result in Q0.31."""
    frac_bits = 31 - integer_bits
    one_quarter = 1 << (frac_bits - 2)
    a_mod = (a & (one_quarter - 1)) - one_quarter
    result = _exp_quarter(sat_mul_pot(a_mod, integer_bits))
    remainder = wrap_int32(a_mod - a)
    for exponent, multiplier in _BARREL:
        if integer_bits > exponent:
            bit = 1 << (frac_bits + exponent)
            result = torch.where((remainder & bit) != 0, srdhm(result, multiplier), result)
    if integer_bits > 5:
        clamp = -(1 << (36 - integer_bits))
        result = torch.where(a < clamp, torch.zeros_like(result), result)
    return torch.where(a == 0, torch.full_like(result, INT32_MAX), result)


def _rounding_half_sum(a: torch.Tensor, b: int) -> torch.Tensor:
    s = a + b
    sign = torch.where(s >= 0, torch.ones_like(s), -torch.ones_like(s))
    return torch.div(s + sign, 2, rounding_mode="trunc")


def one_over_one_plus_x_for_x_in_0_1(a: torch.Tensor) -> torch.Tensor:
    """1 / (1 + a) for a in [0, 1) in Q0.31, by three Newton-Raphson steps in Q2.29."""
    half_den = _rounding_half_sum(a, INT32_MAX)
    x = wrap_int32(1515870810 + srdhm(half_den, -1010580540))
    one_f2 = 1 << 29
    for _ in range(3):
        hdx = srdhm(half_den, x)
        x = wrap_int32(x + sat_mul_pot(srdhm(x, wrap_int32(one_f2 - hdx)), 2))
    return sat_mul_pot(x, 1)


def get_reciprocal(x: torch.Tensor, x_integer_digits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """TFLite GetReciprocal: (Q0.31 of 1/x rescaled to [0.5, 1), num_bits_over_unit), for x > 0."""
    _, e = torch.frexp(x.to(torch.float64))  # x = m * 2^e, m in [0.5, 1): exact for int32 values
    headroom_plus_one = 32 - e.to(torch.int64)  # count of leading zeros of x as uint32
    num_bits_over_unit = x_integer_digits - headroom_plus_one
    shifted_minus_one = (x << headroom_plus_one) - (1 << 31)
    return one_over_one_plus_x_for_x_in_0_1(shifted_minus_one), num_bits_over_unit
