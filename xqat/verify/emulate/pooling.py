"""AVERAGE/MAX_POOL_2D and MEAN, with each backend's division and rounding."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .base import Kernel, Op, same_padding
from .requant import activation_range, fixed_point_stage
from .rounding import (
    quantize_multiplier,
)

__all__ = ["pool", "mean"]


def pool(o: Op, kind: str) -> Kernel:
    opts = o.op.options
    tin = o.tin(0)
    (si, zi), (so, zo) = o.qp(tin), o.qp(o.tout)
    if (si, zi) != (so, zo):
        raise o.fail("input and output quantization differ; TFLite pools keep the same scale and zero point")
    kh, kw = opts["filterHeight"], opts["filterWidth"]
    sh, sw = opts.get("strideH", 1), opts.get("strideW", 1)
    _, ph0, ph1 = same_padding(tin.shape[1], kh, sh, 1, opts.get("padding", "VALID"))
    _, pw0, pw1 = same_padding(tin.shape[2], kw, sw, 1, opts.get("padding", "VALID"))
    lo, hi = activation_range(o, o.op.fused_activation)
    # torch pads symmetrically, by at most half the window; other paddings are explicit
    native = ph0 == ph1 and pw0 == pw1 and 2 * ph0 <= kh and 2 * pw0 <= kw
    pad, explicit = ((ph0, pw0), None) if native else ((0, 0), (pw0, pw1, ph0, ph1))
    # float32 holds the window sums exactly (|sum| <= 255 * kh * kw), and the quotient floors below
    dtype = torch.float32 if 256 * kh * kw < (1 << 23) else torch.float64
    clamp = (lo, hi) != o.qrange(o.tout)
    if kind == "avg":  # count of in-image taps per output position (the same for every sample)
        ones = torch.ones(1, 1, *tin.shape[1:3], dtype=torch.float64)
        ones = F.pad(ones, explicit) if explicit else ones
        count = F.avg_pool2d(ones, (kh, kw), (sh, sw), pad, divisor_override=1)[0, 0, :, :, None]
        uniform = bool((count == count.flatten()[0]).all())
        n = float(count.flatten()[0]) if uniform else count.to(dtype).to(o.device)
        half = float(int(n) // 2) if uniform else torch.div(count, 2, rounding_mode="floor").to(dtype).to(o.device)

    def run(xs):
        x = xs[0].to(dtype).permute(0, 3, 1, 2)  # channels-last NCHW view
        if kind == "max":
            x = F.pad(x, explicit, value=-1e9) if explicit else x
            out = F.max_pool2d(x, (kh, kw), (sh, sw), pad).permute(0, 2, 3, 1)  # implicit padding: -inf
        else:  # sum of the in-image taps, / count with C rounding: sign(acc) * ((|acc| + count/2) // count)
            x = F.pad(x, explicit) if explicit else x
            acc = F.avg_pool2d(x, (kh, kw), (sh, sw), pad, divisor_override=1).permute(0, 2, 3, 1)
            sign = torch.sign(acc)
            out = acc.abs_().add_(half).div_(n).floor_().mul_(sign)
        return o.cast_out(out.clamp_(lo, hi) if clamp else out)

    return run


def _mean_simd_channels(depth: int, threads: int) -> np.ndarray:
    """Channels of optimized_integer_ops::Mean that its SIMD blocks of 16 cover. x86 builds the NEON path
    through NEON_2_SSE: those blocks use vqrdmulh + vrshl (SRDHM, then a half-up shift: ruy's rounding),
    the channels left over in each thread's depth range the scalar gemmlowp MBQM. The depth is split over
    min(depth // 8, threads) threads as evenly as possible (mean.h)."""
    count = max(1, min(max(depth // 8, 1), threads))
    simd, start = np.zeros(depth, bool), 0
    for i in range(count):
        end = start + (depth - start) // (count - i)
        simd[start:start + 16 * ((end - start) // 16)] = True
        start = end
    return simd


def mean(o: Op) -> Kernel:
    tin = o.tin(0)
    (si, zi), (so, zo) = o.qp(tin), o.qp(o.tout)
    qmin, qmax = o.qrange(o.tout)
    axes = sorted({int(a) % len(tin.shape) for a in np.asarray(o.const(o.tin(1)).cpu()).ravel()})
    if 0 in axes:
        raise o.fail("MEAN over the batch dimension cannot be emulated batch-free")
    keep = bool(o.op.options.get("keepDims", False))
    n = int(np.prod([tin.shape[a] for a in axes]))
    rule = o.rules["mean"]
    if rule == "simd16ch_ruy_tail_gemmlowp" and not (keep and len(tin.shape) == 4 and axes == [1, 2]):
        rule = "reference"  # reduce.cc takes the optimized kernel only for 4-D spatial means with keep_dims
    channels = tin.shape[-1] if (len(tin.shape) - 1) not in axes else 1
    span = max(-qmin, qmax) * n  # |raw sum|; sums of q - zp stay within 255 * n
    sum_dtype = torch.float32 if 256 * n <= (1 << 24) else torch.float64  # exact integer sums
    if rule == "simd16ch_ruy_tail_gemmlowp":  # optimized_integer_ops::Mean: raw sum, float32 bias, multiplier
        temp = np.float32(np.float32(np.float32(zi) * si) / so)
        temp = np.float32(temp + np.float32(0.5)) if temp > 0 else np.float32(temp - np.float32(0.5))
        bias = zo - int(np.trunc(temp))
        m, sh = quantize_multiplier(np.float64(np.float32(si / np.float32(np.float32(n) * so))))
        ruy = _mean_simd_channels(channels, o.threads)
        stage = fixed_point_stage(o, m, sh, ruy, bias, qmin, qmax, float(span))
        offset = 0
    elif rule == "fp32":  # XNNPACK: f32(raw sum) * scale + f32(zp_out - f32(zp_in*N) * scale), half even
        # scale = f32(f32(s_in/s_out) * f32(1/N)). The input zero point is not subtracted from the integer sum: it
        # is part of the float bias, so the float32 rounding of that bias decides near-ties (a 16x16 SE mean of
        # MobileNetV3-Small landed on -126.5 exactly where the exact value is -126.50005).
        scale = np.float32(np.float32(si / so) * np.float32(np.float32(1.0) / np.float32(n)))
        bias = np.float32(np.float32(zo) - np.float32(np.float32(zi * n) * scale))
        st, bt = torch.tensor(scale, device=o.device), torch.tensor(bias, device=o.device)

        def stage(total):
            return o.cast_out(total.to(torch.float32).mul_(st).add_(bt).round_().clamp_(qmin, qmax))
        offset = 0
    else:  # reference QuantizedMeanOrSum: multiplier << k / N with k = min(floor(log2 N), 32, 31 + shift)
        m, sh = quantize_multiplier(np.float64(si) / np.float64(so))
        m, sh = int(m[0]), int(sh[0])
        k = min(n.bit_length() - 1, 32, 31 + sh)
        stage = fixed_point_stage(o, np.array([(m << k) // n]), np.array([sh - k]), np.zeros(1, bool), zo,
                                   qmin, qmax, 255.0 * n)
        offset = zi * n

    def run(xs):
        total = xs[0].sum(dim=axes, keepdim=keep, dtype=sum_dtype)
        return stage(total.sub_(offset) if offset else total)

    return run
