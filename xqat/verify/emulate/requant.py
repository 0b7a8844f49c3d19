"""Requantization of accumulators to the output tensor and fused-activation clamps, per backend rule.

MultiplyByQuantizedMultiplier + zero point + clamp runs as one exact float64 floor over a clamped window
(`rounding.one_floor_requantizer`), the int64 chain otherwise."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .base import Op
from .rounding import (
    float64_requantize,
    mbqm,
    mbqm_ruy,
    one_floor_requantizer,
    quantize_multiplier,
    round_half_away,
)

__all__ = ["activation_range", "fixed_point_stage", "output_stage"]


def activation_range(o: Op, act: str) -> tuple[int, int]:
    """Integer clamp of a fused activation: TFLite rounds f/s half away, XNNPACK lrintf(f/s + zp)."""
    s, zp = o.qp(o.tout)
    qmin, qmax = o.qrange(o.tout)
    bounds = {"NONE": (None, None), "RELU": (0.0, None), "RELU6": (0.0, 6.0), "RELU_N1_TO_1": (-1.0, 1.0)}
    if act not in bounds:
        raise o.fail(f"fused activation {act} is not emulated (only NONE, RELU, RELU6, RELU_N1_TO_1)")
    lo, hi = bounds[act]

    def q(f: float) -> int:
        if o.rules["activation_range"] == "xnnpack":
            v = np.float32(np.float32(np.float32(f) / s) + np.float32(zp))
            return int(np.rint(np.clip(v, np.float32(qmin), np.float32(qmax))))  # lrintf: half even
        return zp + int(round_half_away(torch.tensor(np.float32(np.float32(f) / s))).item())

    return (qmin if lo is None else max(qmin, q(lo))), (qmax if hi is None else min(qmax, q(hi)))


def _multipliers(rule: str, s_in: np.float32, s_w: np.ndarray, s_out: np.float32,
                 fc_multiplier: str = "double") -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (int32 multiplier, shift) of a conv/FC output stage: s_in * s_w / s_out in double,
    or for the optimized per-tensor FC float32(s_in * s_w) / s_out."""
    s_w = np.asarray(s_w, np.float32)
    if fc_multiplier == "float_product":
        real = np.float32(s_in * s_w).astype(np.float64) / np.float64(s_out)
    else:
        real = np.float64(s_in) * s_w.astype(np.float64) / np.float64(s_out)
    return quantize_multiplier(real)


def _ruy_channels(rule: str, channels: int) -> np.ndarray:
    """Which output channels round like ruy (half-up last shift) rather than gemmlowp (half away)."""
    if rule == "ruy":
        return np.ones(channels, bool)
    if rule == "ruy8":  # AVX2 blocks of 8 channels round like ruy, the remainder channels like gemmlowp
        return np.arange(channels) < 8 * (channels // 8)
    if rule == "gemmlowp":
        return np.zeros(channels, bool)
    raise ValueError(rule)


def fixed_point_stage(o: Op, mult: np.ndarray, shift: np.ndarray, ruy: np.ndarray, zp: int, lo: int,
                       hi: int, acc_bound) -> Callable[[torch.Tensor], torch.Tensor]:
    """acc (exact integers in a float or int tensor, channels last) -> clamp(MBQM(acc) + zp, lo, hi), cast
    to the output type: one float64 floor where `one_floor_requantizer` proves it exact, else the int64
    chain of SRDHM and the rounding shift."""
    fast = one_floor_requantizer(mult, shift, ruy, zp, lo, hi, acc_bound, o.device)
    if fast is not None:
        return lambda acc: o.cast_out(fast(acc))
    mt, st = torch.as_tensor(mult, device=o.device), torch.as_tensor(shift, device=o.device)
    if mult.size == 1 or (int(mt.min()) == int(mt.max()) and int(st.min()) == int(st.max())):
        mt, st = int(mult.flat[0]), int(shift.flat[0])
    if ruy.all():
        fn = lambda x: mbqm_ruy(x, mt, st)  # noqa: E731
    elif not ruy.any():
        fn = lambda x: mbqm(x, mt, st)  # noqa: E731
    else:
        rt = torch.as_tensor(ruy, device=o.device)
        fn = lambda x: torch.where(rt, mbqm_ruy(x, mt, st), mbqm(x, mt, st))  # noqa: E731
    return lambda acc: o.cast_out(fn(acc.to(torch.int64)).add_(zp).clamp_(lo, hi))


def output_stage(o: Op, rule: str, s_in, s_w, s_out, act_lo: int, act_hi: int, acc_bound: np.ndarray,
                  fc_multiplier: str = "double") -> Callable[[torch.Tensor], torch.Tensor]:
    """Requantize accumulators (exact integers held in a float tensor, channels last, |acc| <= acc_bound
    per channel) to the output tensor: scale, + zp, clamp."""
    _, zp = o.qp(o.tout)
    if rule == "fp32":  # XNNPACK: float32(acc) * f32(f32(s_in * s_w) / s_out), clamp, half even, + zp
        sc = (np.float32(s_in) * np.asarray(s_w, np.float32)).astype(np.float32) / np.float32(s_out)
        sct = torch.as_tensor(sc.astype(np.float32), device=o.device)
        lo, hi = float(act_lo - zp), float(act_hi - zp)

        def fp32(acc):  # to(float32) rounds like XNNPACK's int32 -> float conversion (nearest even)
            v = acc.to(torch.float32).mul_(sct)
            return o.cast_out(v.clamp_(lo, hi).round_().add_(zp))

        return fp32
    if rule == "float64":  # reference FC: round_half_away(double(acc) * double multiplier)
        real = np.float64(s_in) * np.asarray(s_w, np.float32).astype(np.float64) / np.float64(s_out)
        m = torch.as_tensor(real, dtype=torch.float64, device=o.device)
        return lambda acc: o.cast_out(float64_requantize(acc, m).add_(zp).clamp_(act_lo, act_hi))
    if rule not in ("gemmlowp", "ruy", "ruy8"):
        raise o.fail(f"unknown requantization rule {rule!r}")
    mult, shift = _multipliers(rule, s_in, s_w, s_out, fc_multiplier)
    return fixed_point_stage(o, mult, shift, _ruy_channels(rule, len(np.atleast_1d(s_w))), zp, act_lo,
                              act_hi, acc_bound)
