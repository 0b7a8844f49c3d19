"""Elementwise binary ops (ADD, SUB, MUL): tables over all input-code pairs, built from each backend's
integer formula. Broadcasting (an SE gate (N,1,1,C) times (N,H,W,C)) is the table lookup's own."""

from __future__ import annotations

import numpy as np
import torch

from .base import Kernel, Op, table_kernel, wrap_int16
from .requant import activation_range
from .rounding import (
    fp32_requantize,
    mbqm,
    mbqm_single,
    quantize_multiplier,
)
from .rules import RULES

__all__ = ["add", "sub", "mul"]


def add(o: Op) -> Kernel:
    """ADD: both inputs rescaled to a common fixed-point scale, summed, rescaled to the output."""
    return _add_sub(o, 1)


def sub(o: Op) -> Kernel:
    """SUB: ADD's arithmetic with the second input negated where each backend negates it (rules.py, "sub")."""
    return _add_sub(o, -1)


def _add_sub(o: Op, sign: int) -> Kernel:
    t1, t2 = o.tin(0), o.tin(1)
    (s1, z1), (s2, z2), (so, zo) = o.qp(t1), o.qp(t2), o.qp(o.tout)
    lo, hi = activation_range(o, o.op.fused_activation)
    rule = o.rules["add"]
    negate = o.rules["sub"] if sign < 0 else None
    if rule == "xnnpack":  # qs8 vadd: one fixed-point multiply-add, arithmetic shift
        sa, sb = np.float32(s1 / so), np.float32(s2 / so)
        mx = max(sa, sb)
        shift = 20 - int(np.floor(np.log2(np.float64(mx))))
        if not 0 < shift <= 31:
            raise o.fail(f"input/output scale ratio {mx} is outside what XNNPACK's ADD accepts")
        am = int(np.rint(np.float32(sa * np.float32(2.0 ** shift))))
        bm = sign * int(np.rint(np.float32(sb * np.float32(2.0 ** shift))))  # lrintf: odd, the sign commutes
        bias = (1 << (shift - 1)) - am * z1 - bm * z2
        return table_kernel(o, lambda a, b: ((bias + am * a + bm * b) >> shift).add(zo).clamp(lo, hi))
    left_shift = 20
    twice_max = 2.0 * float(max(s1, s2))
    m1, sh1 = quantize_multiplier(float(s1) / twice_max)
    m2, sh2 = quantize_multiplier(float(s2) / twice_max)
    mo, sho = quantize_multiplier(twice_max / ((1 << left_shift) * float(so)))
    m1, sh1, m2, sh2, mo, sho = (int(v[0]) for v in (m1, sh1, m2, sh2, mo, sho))
    simd = rule == "simd16_int16wrap"  # builtin: single-rounding input scaling, int16 packing
    in_scale = mbqm_single if simd else mbqm

    if negate == "multiplier":  # the optimized kernel runs ADD with the second input's multiplier negated
        m2 = -m2

    def out(a, b):
        scaled2 = in_scale((b - z2) << left_shift, m2, sh2)
        raw = in_scale((a - z1) << left_shift, m1, sh1) + (-scaled2 if negate == "result" else scaled2)
        return mbqm(raw, mo, sho) + zo

    if simd:  # 16-lane blocks pack the results to int16 (wrapping), the scalar tail does not
        return table_kernel(o, lambda a, b: out(a, b).clamp(lo, hi),
                             lambda a, b: wrap_int16(out(a, b)).clamp(lo, hi))
    return table_kernel(o, lambda a, b: out(a, b).clamp(lo, hi))


def mul(o: Op) -> Kernel:
    t1, t2 = o.tin(0), o.tin(1)
    (s1, z1), (s2, z2), (so, zo) = o.qp(t1), o.qp(t2), o.qp(o.tout)
    lo, hi = activation_range(o, o.op.fused_activation)
    rule = o.rules["mul"]
    if rule == "fp32":
        sc = torch.tensor(np.float32(np.float32(s1 * s2) / so))
        return table_kernel(o, lambda a, b: fp32_requantize((a - z1) * (b - z2), sc, zo, lo, hi))
    m, sh = quantize_multiplier(np.float64(s1) * np.float64(s2) / np.float64(so))
    m, sh = int(m[0]), int(sh[0])
    if sh > 0 and o.rules is RULES["builtin"]:
        ratio = float(s1) * float(s2) / float(so)
        raise o.fail(f"s1*s2/s_out = {ratio:.4g} >= 1: the optimized x86 MUL kernel "
                     "overflows in its SIMD lanes for such (saturating) outputs and is not emulated; use "
                     "backend='reference', or give the output a range that covers the product")
    return table_kernel(o, lambda a, b: (mbqm((a - z1) * (b - z2), m, sh) + zo).clamp(lo, hi))
