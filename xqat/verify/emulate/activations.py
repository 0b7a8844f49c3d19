"""Activations by lookup table over all input codes (LOGISTIC, TANH, GELU) and SOFTMAX."""

from __future__ import annotations

import math

import numpy as np
import torch

from . import fixedpoint as fxp
from .base import Kernel, Op, table_kernel
from .libm import erfcf, expf, tanhf
from .rounding import (
    quantize_multiplier,
    rdbp,
    round_half_away,
    srdhm,
)

__all__ = ["lut_op", "softmax"]


_SQRT_2_OVER_PI = np.float32(1.12837916709551257390 * 0.70710678118654752440)  # M_2_SQRTPI * M_SQRT1_2


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    """reference_ops::GeluTransformApproximate in C float arithmetic, left to right, with C tanhf:
    0.5f * x * (1 + tanhf(sqrt(2/pi) * (x + 0.044715f * x * x * x)))."""
    f = np.float32
    cubic = ((f(0.044715) * x).astype(f) * x).astype(f) * x
    inner = (x + cubic.astype(f)).astype(f)
    return ((f(0.5) * x).astype(f) * (f(1) + tanhf((_SQRT_2_OVER_PI * inner).astype(f))).astype(f)).astype(f)


_NEG_SQRT1_2 = np.float32(-0.70710678118654752440)  # static_cast<float>(-M_SQRT1_2)


def _gelu_erf(x: np.ndarray) -> np.ndarray:
    """reference_ops::GeluTransform (approximate=False) in C float arithmetic with C erfcf:
    0.5f * x * erfcf(x * -M_SQRT1_2)."""
    f = np.float32
    return ((f(0.5) * x).astype(f) * erfcf((x * _NEG_SQRT1_2).astype(f))).astype(f)


def lut_op(o: Op, fn: str) -> Kernel:
    """LOGISTIC / TANH / GELU as a table built the way the backend builds its own (rules.py, "lut"); GELU runs
    TFLite's table on every backend (XNNPACK leaves int8 GELU), in its exact (erf) or tanh form."""
    tin, tout = o.tin(0), o.tout
    (si, zi), (so, zo) = o.qp(tin), o.qp(tout)
    qmin, qmax = o.qrange(tin)
    codes = np.arange(qmin, qmax + 1)
    x = (np.float32(si) * (codes - zi).astype(np.float32)).astype(np.float32)
    one = np.float32(1)
    if fn == "gelu":
        y = _gelu_tanh(x) if o.op.options.get("approximate", False) else _gelu_erf(x)
    elif o.rules["lut"] == "xnnpack":  # XNNPACK: the function in double (C exp/tanh), rounded to float32
        f64 = (lambda v: 1.0 / (1.0 + math.exp(-v))) if fn == "logistic" else math.tanh
        y = np.array([f64(float(v)) for v in x], np.float32)
    else:  # TFLite LUTPopulate: float32 arithmetic with C expf/tanhf
        y = (one / (one + expf(-x))).astype(np.float32) if fn == "logistic" else tanhf(x)
    r = (y * np.float32(one / so)).astype(np.float32)
    if o.rules["lut"] == "xnnpack" and fn != "gelu":  # lrintf: half even
        q = np.rint(r).astype(np.int64) + zo
    else:  # TfLiteRound: half away from zero
        q = (np.sign(r) * np.floor(np.abs(r.astype(np.float64)) + 0.5)).astype(np.int64) + zo
    table = torch.as_tensor(np.clip(q, *o.qrange(tout)))
    return table_kernel(o, lambda x: table[x - qmin])


def softmax(o: Op) -> Kernel:
    tin, tout = o.tin(0), o.tout
    (si, _), (so, zo) = o.qp(tin), o.qp(tout)  # softmax only sees input differences: no input zp
    beta = np.float32(o.op.options.get("beta", 1.0))
    qmin, qmax = o.qrange(tout)
    if o.rules["softmax"] == "float_table":  # optimized_ops::Softmax with PopulateSoftmaxLookupTable
        scale = np.float32(-si * beta)
        table = np.zeros(256, np.float32)
        table[255 - np.arange(256)] = expf((scale * np.arange(256).astype(np.float32)).astype(np.float32))
        t = torch.as_tensor(table, device=o.device)

        def run(xs):
            x = xs[0].to(torch.int64)
            mx = x.max(dim=-1, keepdim=True).values
            e = t[255 - mx + x]  # exp(-s*beta*(max - x))
            total = torch.zeros_like(e[..., 0])
            for j in range(e.shape[-1]):  # float32, sequential like the C++ loop
                total = total + e[..., j]
            inv = torch.tensor(np.float32(1.0), device=x.device) / (total * torch.tensor(so, device=x.device))
            p = e * inv[..., None]
            if tout.dtype == "UINT8":  # x86 QuantizeSoftmaxOutput<uint8_t>: int(p + 0.5f), no zero point
                return o.cast_out(torch.trunc(p + 0.5).to(torch.int64).clamp(qmin, qmax))
            return o.cast_out((round_half_away(p).to(torch.int64) + zo).clamp(qmin, qmax))

        return run
    # reference: gemmlowp fixed point (Q5.26 input differences, Q12 accumulator)
    real = min(np.float64(beta) * np.float64(si) * float(1 << 26), float((1 << 31) - 1))
    m, left = quantize_multiplier(real)
    m, left = int(m[0]), int(left[0])
    max_rescaled = 1.0 * ((1 << 5) - 1) * (1 << (31 - 5)) / (1 << left)
    diff_min = -int(np.floor(max_rescaled))
    diffs = -torch.arange(256, dtype=torch.int64)  # input - max, from 0 down to -255
    rescaled = srdhm(diffs << left, m)
    exp_table = fxp.exp_on_negative_values(rescaled, 5).to(o.device)
    valid_table = (diffs >= diff_min).to(o.device)

    def run(xs):
        x = xs[0].to(torch.int64)
        idx = x.max(dim=-1, keepdim=True).values - x
        e, valid = exp_table[idx], valid_table[idx]
        acc = torch.where(valid, rdbp(e, 12), torch.zeros_like(e)).sum(dim=-1, keepdim=True)
        recip, nbits = fxp.get_reciprocal(acc, 12)
        out = rdbp(srdhm(recip, e), nbits + 31 - 8) + qmin
        out = torch.where(valid, out, torch.full_like(out, qmin))
        return o.cast_out(out.clamp(qmin, qmax))

    return run
