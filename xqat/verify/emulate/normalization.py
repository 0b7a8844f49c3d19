"""RSQRT, the one int8 op of a LayerNorm that no other kernel module covers (xqat decomposes LayerNorm into MEAN,
SUB, MUL, MEAN, RSQRT, MUL, MUL, ADD; docs/sequence-models.md).

TFLite's int8 RSQRT (elementwise.cc, the same kernel on every backend: XNNPACK leaves it) is a per-code function:
v = code - zp_in; v == 0 gives the largest code; else 1/sqrt(v) by GetInvSqrtQuantizedMultiplierExp (Newton-Raphson
in gemmlowp fixed point), brought to an integer with 20 extra bits, then requantized by
1 / (sqrtf(s_in) * s_out) (docs/numerics.md, per-backend kernel rules). It is built here as a table over the codes.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import Kernel, Op, table_kernel
from .fixedpoint import sat_mul_pot
from .rounding import mbqm, quantize_multiplier, srdhm, wrap_int32

__all__ = ["rsqrt"]

_SHIFT = 20  # kShift: "Shift to keep value integer"
_HALF_THREE = (1 << 28) + (1 << 27)  # 1.5 in Q3.28
_HALF_SQRT_2 = 1518500250  # sqrt(2) / 2 in Q0.31


def _inv_sqrt_multiplier_exp(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GetInvSqrtQuantizedMultiplierExp(v, kReverseShift) for int64 values 2 <= v < 2^29: (Q0.31 multiplier,
    left shift) with 1/sqrt(v) = multiplier * 2^(shift - 31)."""
    bits = torch.floor(torch.log2(v.double())).to(torch.int64) + 1  # bit length (exact for v < 2^29)
    left_pairs = (32 - bits - 1) // 2 - 1
    shift = 11 - left_pairs
    x_in = v << (2 * left_pairs)  # in [2^27, 2^29)
    half_input = sat_mul_pot(x_in >> 1, -1)  # Q3.28 of x_in / 2^28, halved
    x = torch.full_like(v, 1 << 28)  # 1.0 in Q3.28
    for _ in range(5):  # x = 1.5 x - (v/2) x^3, in Q3.28 with gemmlowp's rescales
        x3 = sat_mul_pot(srdhm(srdhm(x, x), x), 6)
        x = sat_mul_pot(wrap_int32(srdhm(torch.full_like(x, _HALF_THREE), x) - srdhm(half_input, x3)), 3)
    x = srdhm(x, _HALF_SQRT_2)
    neg = shift < 0
    x = torch.where(neg, wrap_int32(x << (-shift).clamp(min=0)), x)
    shift = torch.where(neg, torch.zeros_like(shift), shift)
    return x, -shift


def rsqrt(o: Op) -> Kernel:
    (si, zi), (so, zo) = o.qp(o.tin(0)), o.qp(o.tout)
    qmin, qmax = o.qrange(o.tout)
    real = 1.0 / np.float64(np.float32(np.sqrt(np.float32(si))) * np.float32(so))
    m, s = quantize_multiplier(real)
    m, s = int(m[0]), int(s[0])

    def table(codes: torch.Tensor) -> torch.Tensor:
        v = codes - zi
        out = torch.full_like(v, qmax)  # v == 0: "any value close to 0 represents the max output value"
        big = v >= 2
        if bool(big.any()):
            mult, shift = _inv_sqrt_multiplier_exp(v[big])
            data = mbqm(torch.ones_like(mult), mult, shift + _SHIFT)
            out[big] = (mbqm(data, m, s - _SHIFT) + zo).clamp(qmin, qmax)
        one = v == 1  # GetInvSqrtQuantizedMultiplierExp(1): INT32_MAX, shift 0
        if bool(one.any()):
            data = mbqm(torch.ones_like(v[one]), (1 << 31) - 1, _SHIFT)
            out[one] = (mbqm(data, m, s - _SHIFT) + zo).clamp(qmin, qmax)
        return out  # v < 0: the interpreter refuses such an input ("only defined for positive values")

    return table_kernel(o, table)
