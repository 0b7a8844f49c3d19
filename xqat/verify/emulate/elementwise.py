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
    mbqm_floor,
    mbqm_single,
    quantize_multiplier,
)
from .rules import RULES

__all__ = ["add", "sub", "mul"]


def add(o: Op) -> Kernel:
    """ADD: both inputs rescaled to a common fixed-point scale, summed, rescaled to the output."""
    return _add_sub(o, 1)


def sub(o: Op) -> Kernel:
    """SUB: ADD's arithmetic with the second input negated: its scaled value (the reference kernel, which the
    builtin int8 SUB runs too) or its multiplier (XNNPACK); rules.py, "sub"."""
    return _add_sub(o, -1)


def _add_sub(o: Op, sign: int) -> Kernel:
    t1, t2 = o.tin(0), o.tin(1)
    (s1, z1), (s2, z2), (so, zo) = o.qp(t1), o.qp(t2), o.qp(o.tout)
    lo, hi = activation_range(o, o.op.fused_activation)
    rule = o.rules["add"]
    negate = o.rules["sub"] if sign < 0 else None
    if negate == "reference_kernel":  # this backend's int8 SUB is the reference kernel, broadcast or not
        rule, negate = RULES["reference"]["add"], RULES["reference"]["sub"]
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

    def out(in_scale, a, b):
        scaled2 = in_scale((b - z2) << left_shift, m2, sh2)
        raw = in_scale((a - z1) << left_shift, m1, sh1) + (-scaled2 if negate == "result" else scaled2)
        return mbqm(raw, mo, sho) + zo

    def tail(a, b):
        return out(mbqm, a, b).clamp(lo, hi)

    if rule != "simd16_int16wrap":
        return table_kernel(o, tail)
    # builtin: the SIMD blocks of each kernel call pack their results to int16 (wrapping), the scalar tail does not
    kind, run = broadcast_calls(o.tin(0).shape, o.tin(1).shape)
    if kind == "generic":
        return table_kernel(o, tail)
    # elementwise calls: shift by 20 + shift, then one rounding multiply; scalar-broadcast calls: rounding
    # multiply of x << 20, then a truncating shift right (mbqm_floor)
    block, in_scale = (16, mbqm_single) if kind == "elementwise" else (8, mbqm_floor)
    pos = torch.arange(int(np.prod(o.tout.shape))) % run
    return table_kernel(o, tail, lambda a, b: wrap_int16(out(in_scale, a, b)).clamp(lo, hi),
                        body_mask=pos < block * (run // block))


def broadcast_calls(shape1, shape2) -> tuple[str, int]:
    """How the optimized int8 ADD splits one call over its output (TFLite's ProcessBroadcastShapes and the
    five-fold broadcast loop): ("elementwise", n) for AddElementwise on each run of n contiguous output
    elements (n = the whole output without broadcast), ("scalar", n) for AddScalarBroadcast on each run of n
    (one element of the broadcast input against n of the other), ("generic", 0) for the reference slow
    broadcast (shapes that fold into no five-fold pattern)."""
    n = max(len(shape1), len(shape2))
    e1 = (1,) * (n - len(shape1)) + tuple(int(d) for d in shape1)
    e2 = (1,) * (n - len(shape2)) + tuple(int(d) for d in shape2)
    if e1 == e2:
        return "elementwise", int(np.prod(e1))
    i = max(j for j in range(n) if e1[j] != e2[j])
    if 1 not in (e1[i], e2[i]):
        return "generic", 0
    a, b = (e1, e2) if e1[i] == 1 else (e2, e1)  # a: the input that broadcasts in the innermost differing dim
    y = [1] * 5
    i = n - 1
    for k, cond in ((4, lambda j: a[j] == b[j]), (3, lambda j: a[j] == 1), (2, lambda j: a[j] == b[j]),
                    (1, lambda j: b[j] == 1), (0, lambda j: a[j] == b[j])):
        while i >= 0 and cond(i):
            y[k] *= max(a[i], b[i])
            i -= 1
    if i >= 0:
        return "generic", 0
    return ("elementwise", y[4]) if y[4] > 1 else ("scalar", y[3])


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
