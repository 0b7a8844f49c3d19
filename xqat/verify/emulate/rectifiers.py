"""Piecewise-linear activations as standalone ops: RELU, RELU6, RELU_N1_TO_1, LEAKY_RELU, HARD_SWISH.

Each is a table over the input codes (`table_kernel`), built from the kernel's integer formula. The
multipliers come from float32 scale arithmetic (the C++ multiplies and divides `float` scales before
QuantizeMultiplier sees a double), which matters at ties.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import Kernel, Op, table_kernel
from .requant import activation_range
from .rounding import mbqm, quantize_multiplier, rdbp

__all__ = ["relu", "leaky_relu", "hard_swish"]


def _multiplier(real: np.float32) -> tuple[int, int]:
    m, sh = quantize_multiplier(np.float64(real))
    return int(m[0]), int(sh[0])


def relu(o: Op) -> Kernel:
    """ReluX: clamp(zo + MBQM(x - zi, f32(si / so)), act_lo, act_hi), the bounds as for a fused activation."""
    (si, zi), (so, zo) = o.qp(o.tin(0)), o.qp(o.tout)
    lo, hi = activation_range(o, o.op.name)  # the op names are the fused-activation names
    m, sh = _multiplier(np.float32(si / so))
    return table_kernel(o, lambda x: (mbqm(x - zi, m, sh) + zo).clamp(lo, hi))


def leaky_relu(o: Op) -> Kernel:
    """LEAKY_RELU: identity or alpha multiplier by the sign of x - zi (rules.py, "leaky_relu")."""
    (si, zi), (so, zo) = o.qp(o.tin(0)), o.qp(o.tout)
    qmin, qmax = o.qrange(o.tout)
    alpha = np.float32(o.op.options.get("alpha", 0.2))
    pos = np.float32(si / so)
    neg = np.float32(np.float32(si * alpha) / so)
    if o.rules["leaky_relu"] == "xnnpack":  # qs8 vlrelu: 8 fractional bits, half up (+128 >> 8)
        mp = int(np.rint(np.float32(np.float32(256.0) * pos)))
        mn = int(np.rint(np.float32(np.float32(256.0) * np.float32(pos * alpha))))

        def xnn(x):
            d = x - zi
            return ((d * torch.where(d >= 0, mp, mn) + 128 >> 8) + zo).clamp(qmin, qmax)

        return table_kernel(o, xnn)
    (m1, s1), (m2, s2) = _multiplier(pos), _multiplier(neg)

    def ref(x):
        d = x - zi
        return (torch.where(d >= 0, mbqm(d, m1, s1), mbqm(d, m2, s2)) + zo).clamp(qmin, qmax)

    return table_kernel(o, ref)


def _int16_multiplier(real: np.float32) -> tuple[int, int]:
    """QuantizeMultiplier, then DownScaleInt32ToInt16Multiplier: (q + 2^15) >> 16, saturating at 2^15 - 1."""
    m, sh = _multiplier(real)
    return (32767 if m >= (1 << 31) - 1 - (1 << 15) else (m + (1 << 15)) >> 16), sh


def _srdhm16(a: torch.Tensor, b: int) -> torch.Tensor:
    """gemmlowp SaturatingRoundingDoublingHighMul on int16: (a*b + nudge) / 2^15 truncated, nudge 2^14 for
    a*b >= 0 else 1 - 2^14, so ties round up for either sign; only a == b == -2^15 saturates."""
    ab = a * b
    nudge = torch.where(ab >= 0, 1 << 14, 1 - (1 << 14))
    out = torch.div(ab + nudge, 1 << 15, rounding_mode="trunc")
    return torch.where((a == -32768) & (b == -32768), 32767, out)


def _sat16(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-32768, 32767)


def hard_swish(o: Op) -> Kernel:
    """HARD_SWISH (reference_ops::HardSwish, which every backend here runs for int8): x on a 2^7 finer
    "hires" scale, an int16 reluish factor in [0, 1] from x/3, product by a truncating doubling high mul."""
    (si, zi), (so, zo) = o.qp(o.tin(0)), o.qp(o.tout)
    qmin, qmax = o.qrange(o.tout)
    hires = np.float32(np.float32(1.0 / 128.0) * si)
    out_m, out_e = _int16_multiplier(np.float32(hires / so))
    rel_m, rel_e = _int16_multiplier(np.float32(hires / np.float32(3.0 / 32768.0)))
    if out_e > 0:
        raise o.fail("input scale / output scale >= 128: TFLite's HARD_SWISH rejects such scales")

    def fn(x):
        hi_in = (x - zi) * 128  # fits int16 for 8-bit codes
        pre_out = _srdhm16(hi_in, out_m)
        r = hi_in
        if rel_e > 0:
            r = _sat16(r * (1 << (rel_e - 1)))
        r = _srdhm16(r, rel_m)
        if rel_e > 0:
            r = _sat16(r * 2)
        elif rel_e < 0:
            r = rdbp(r, -rel_e)
        r = (r + (1 << 15)) >> 1
        prod = torch.div(r * pre_out, 1 << 15, rounding_mode="trunc")  # SaturatingDoublingHighMul: truncates
        prod = torch.where((r == -32768) & (pre_out == -32768), 32767, prod)
        return (rdbp(prod, -out_e) + zo).clamp(qmin, qmax)

    return table_kernel(o, fn)
