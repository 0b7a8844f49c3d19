"""QUANTIZE (float -> codes, and requantize codes -> codes) and DEQUANTIZE, per backend rule."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ...errors import EmulationError
from .base import Kernel, Op, simd_body, simd_split, table_kernel
from .rounding import (
    mbqm,
    mbqm_ruy,
    quantize_multiplier,
    round_half_away,
)

__all__ = ["float_quantizer", "quantize", "dequantize"]


def float_quantizer(rule: str, scale, zero_point: int, qmin: int, qmax: int, sample_numel: int,
                    device: torch.device | str = "cpu") -> Callable[[torch.Tensor], torch.Tensor]:
    """float32 -> integer codes exactly as TFLite's QUANTIZE op under `rule` (rules.py, "quantize"); the
    input holds whole interpreter calls of `sample_numel` elements each (SIMD body vs scalar tail)."""
    so = np.float32(scale)
    inv = torch.tensor(np.float32(np.float32(1.0) / so), device=device)
    s32, s64 = torch.tensor(so, device=device), float(so)

    def div_away(x):  # reference: TfLiteRound(x / scale) in float32
        return round_half_away(x / s32)

    def mul_even(x):  # optimized SIMD / XNNPACK: x * (1/scale) in float32, round half even
        return torch.round(x * inv)

    def ddiv_away(x):  # optimized scalar tail: x / scale in double, round half away
        return round_half_away(x.to(torch.float64) / s64)

    if rule == "div_half_away":
        fn = div_away
    elif rule == "mul_half_even":
        fn = mul_even
    elif rule == "simd8_mul_even_tail_ddiv_away":
        body = torch.arange(sample_numel, device=device) < 8 * (sample_numel // 8)
        fn = simd_split(body, mul_even, ddiv_away)
    else:
        raise EmulationError(f"unknown quantize rule {rule!r}")
    return lambda x: (fn(x.to(torch.float32)).to(torch.int64) + int(zero_point)).clamp(qmin, qmax)


def quantize(o: Op) -> Kernel:
    tin, tout = o.tin(0), o.tout
    so, zo = o.qp(tout)
    qmin, qmax = o.qrange(tout)
    rule = o.rules["quantize" if tin.dtype == "FLOAT32" else "requantize"]
    if tin.dtype == "FLOAT32":
        try:
            fn = float_quantizer(rule, so, zo, qmin, qmax, int(np.prod(tin.shape)), o.device)
        except EmulationError as e:
            raise o.fail(str(e)) from None
        return lambda xs: o.cast_out(fn(xs[0]))
    si, zi = o.qp(tin)
    if rule == "xnnpack" and tin.dtype == tout.dtype:  # qs8/qu8 convert: 8 fractional bits
        mult = int(np.rint(np.float32(np.float32(256.0) * np.float32(si / so))))
        return table_kernel(o, lambda x: ((((x - zi) * mult + 128) >> 8) + zo).clamp(qmin, qmax))
    m, sh = quantize_multiplier(np.float64(si) / np.float64(so))
    m, sh = int(m[0]), int(sh[0])
    gemmlowp = lambda x: (mbqm(x - zi, m, sh) + zo).clamp(qmin, qmax)  # noqa: E731
    if rule == "simd16_ruy_tail_gemmlowp":  # optimized x86: 16-lane blocks like ruy, scalar tail gemmlowp
        return table_kernel(o, gemmlowp, lambda x: (mbqm_ruy(x - zi, m, sh) + zo).clamp(qmin, qmax))
    return table_kernel(o, gemmlowp)  # reference, and XNNPACK's int8<->uint8 fallback


def dequantize(o: Op) -> Kernel:
    tin = o.tin(0)
    si, zi = o.qp(tin)
    if o.tout.dtype != "FLOAT32":
        raise o.fail(f"DEQUANTIZE to {o.tout.dtype} is not emulated")
    # reference / XNNPACK: float32(s * (q - zp)): one rounding (a float32 times a 9-bit integer is exact
    # in double, so double(s) * (q - zp) rounded to float32 is the correctly rounded product).
    s64 = float(si)
    if o.rules["dequantize"] != "simd8_two_step":
        return lambda xs: ((xs[0].to(torch.float64) - zi) * s64).to(torch.float32)
    # optimized x86: SIMD blocks of 8 elements compute f32(q * s) + f32(-zp * s) (two roundings); the
    # scalar tail of each sample (flat size mod 8) uses the one-rounding form.
    offset = torch.tensor(np.float32(-np.float32(zi) * si), device=o.device)
    st = torch.tensor(si, device=o.device)
    fn = simd_split(simd_body(tin, 8, o.device), lambda x: x.to(torch.float32) * st + offset,
                     lambda x: ((x.to(torch.float64) - zi) * s64).to(torch.float32))
    return lambda xs: fn(xs[0])
