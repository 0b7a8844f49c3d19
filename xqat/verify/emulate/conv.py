"""Convolutions and matrix products: CONV_2D (grouped too), DEPTHWISE_CONV_2D, FULLY_CONNECTED, TRANSPOSE_CONV,
BATCH_MATMUL.

Exactness (`_chunks`): they run as floating-point
convolutions/matmuls of the raw input codes |x| <= x_max (128 for int8) with the integer weights, the
input zero point folded into the bias (sum (x - zp) w + b = sum x w + (b - zp sum w); padding uses the
code zp, i.e. a real 0). For output channel c every product and every partial sum, in whatever order
the library adds them, is an integer of magnitude <= (x_max + |zp|) * sum_k |w_ck| + |b_c|. A float
type with a p-bit significand holds every integer up to 2^p exactly, so below 2^p no operation ever
rounds and the result is the exact integer accumulator. On CPU float32 (p = 24) is used, the reduction
cut into input-channel slices that each meet the bound when the whole does not (their sums and the
bias are added in float64, p = 53); float64 is used when a single input channel exceeds it, and always
on CUDA. Transform algorithms (FFT/Winograd) would break the argument, so NNPACK is switched off on CPU
and cuDNN (and with it TF32) on CUDA. The C++ kernels accumulate in int32; models whose accumulators
overflow int32 are outside what either computes. The accumulators then go through `requant.output_stage`.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from .base import Kernel, Op, same_padding
from .requant import activation_range, output_stage

__all__ = ["conv_like", "fully_connected", "transpose_conv", "batch_matmul"]

_F32_EXACT = 2.0 ** 24


def _chunks(w_abs: np.ndarray, bias_abs: np.ndarray, x_max: float, zp_abs: float,
            device: torch.device) -> tuple[torch.dtype, list[slice] | None]:
    """(float dtype, reduction slices) for which every partial sum is provably exact (module docstring).

    w_abs[c, k]: |w| of output channel c summed over the taps of input channel k. The input enters as
    raw codes |x| <= x_max with the zero point folded into the bias (bias - zp * sum w). One float32
    pass needs (x_max + |zp|) * sum_k |w_ck| + |bias_c| <= 2^24 (slices None); otherwise the input channels
    are cut greedily into slices with x_max * sum_slice |w_ck| <= 2^24 each, summed in float64 with the
    bias. float64 throughout when a single channel exceeds that, and always on CUDA.
    """
    if device.type != "cpu":
        return torch.float64, None
    total = ((x_max + zp_abs) * w_abs.sum(axis=1) + bias_abs).max(initial=0.0)
    if total <= _F32_EXACT:
        return torch.float32, None
    per = x_max * w_abs
    if per.max(initial=0.0) > _F32_EXACT:  # one input channel alone is too large
        return torch.float64, None
    slices, start, run = [], 0, np.zeros(w_abs.shape[0])
    for k in range(w_abs.shape[1]):
        if (run + per[:, k]).max() > _F32_EXACT:
            slices.append(slice(start, k))
            start, run = k, np.zeros(w_abs.shape[0])
        run += per[:, k]
    return torch.float32, slices + [slice(start, w_abs.shape[1])]


def _exact_context(device: torch.device):
    """No transform-based convolution algorithms (and no TF32): integer sums must stay exact."""
    if device.type == "cuda":
        return torch.backends.cudnn.flags(enabled=False)
    return torch.backends.nnpack.flags(enabled=False) if hasattr(torch.backends, "nnpack") else nullcontext()


def _check_int8_filter(o: Op, tw) -> None:
    """Conv-like kernels take constant, symmetric int8 filters only."""
    if tw.dtype != "INT8" or tw.data is None:
        raise o.fail(f"filter '{tw.name}' must be a constant int8 tensor (got {tw.dtype})")
    if np.any(tw.zero_points != 0):
        raise o.fail(f"filter '{tw.name}' has nonzero zero points; int8 filters are symmetric")


def conv_like(o: Op, depthwise: bool) -> Kernel:
    opts = o.op.options
    tin, tw = o.tin(0), o.tin(1)
    s_in, zp_in = o.qp(tin)
    s_out, _ = o.qp(o.tout)
    _check_int8_filter(o, tw)
    if depthwise:  # (1, kh, kw, C*M) -> (C*M, 1, kh, kw)
        w = tw.data[0].transpose(2, 0, 1)[:, None].astype(np.float64)
        groups = tin.shape[3]
    else:  # (O, kh, kw, I) -> (O, I, kh, kw)
        w = tw.data.transpose(0, 3, 1, 2).astype(np.float64)
        groups = max(tin.shape[3] // tw.shape[3], 1)
    cout = w.shape[0]
    bias_np = (o.tin(2).data.astype(np.float64) if o.has_input(2) and o.tin(2).data is not None
               else np.zeros(cout))
    # reduction slices: input channels (a grouped conv keeps one slice so groups stay aligned)
    w_abs = np.abs(w).sum(axis=(2, 3)) if groups == 1 else np.abs(w).sum(axis=(1, 2, 3))[:, None]
    x_max = float(max(-o.qrange(tin)[0], o.qrange(tin)[1]))
    dtype, slices = _chunks(w_abs, np.abs(bias_np), x_max, abs(zp_in), o.device)
    acc_bound = 255.0 * w_abs.sum(axis=1) + np.abs(bias_np)  # |sum (x - zp) w + b|
    if slices is not None and groups > 1:
        slices = [slice(None)]  # one float32 pass without the bias, which is added in float64
    bias_np = bias_np - zp_in * w.sum(axis=(1, 2, 3))  # sum (x - zp) w + b = sum x w + (b - zp sum w)
    weights = [torch.as_tensor(np.ascontiguousarray(w[:, sl]), device=o.device).to(dtype)
               for sl in (slices or [slice(None)])]
    bias = torch.as_tensor(bias_np, device=o.device).to(dtype if slices is None else torch.float64)
    s_w = tw.scales if tw.scales.size == cout else np.full(cout, tw.scales[0], np.float32)
    kh, kw = w.shape[2], w.shape[3]
    sh, sw = opts.get("strideH", 1), opts.get("strideW", 1)
    dh, dw = opts.get("dilationHFactor", 1), opts.get("dilationWFactor", 1)
    _, ph0, ph1 = same_padding(tin.shape[1], kh, sh, dh, opts.get("padding", "VALID"))
    _, pw0, pw1 = same_padding(tin.shape[2], kw, sw, dw, opts.get("padding", "VALID"))
    conv_pad = (ph0, pw0) if zp_in == 0 and ph0 == ph1 and pw0 == pw1 else (0, 0)
    int8_pad = (0, 0, pw0, pw1, ph0, ph1) if conv_pad == (0, 0) and (ph0 or ph1 or pw0 or pw1) else None
    lo, hi = activation_range(o, o.op.fused_activation)
    rule = o.rules["depthwise" if depthwise else "grouped_conv" if groups > 1 else "conv"]
    stage = output_stage(o, rule, s_in, s_w, s_out, lo, hi, acc_bound)
    conv = dict(stride=(sh, sw), padding=conv_pad, dilation=(dh, dw), groups=groups)

    def run(xs):
        # out-of-image taps are real 0: the code zp_in, padded while still integer
        x = xs[0] if int8_pad is None else F.pad(xs[0], int8_pad, value=zp_in)
        x = x.to(dtype).permute(0, 3, 1, 2)  # NHWC -> channels-last NCHW view (no copy)
        with _exact_context(x.device):
            if slices is None:  # the bias joins the exact sum inside the convolution
                acc = F.conv2d(x, weights[0], bias, **conv)
            else:
                acc = sum(F.conv2d(x[:, sl], wt, **conv).to(torch.float64) for sl, wt in zip(slices, weights))
                acc = acc.add_(bias[:, None, None])
        return stage(acc.permute(0, 2, 3, 1))  # NHWC view of the channels-last result

    return run


def fully_connected(o: Op) -> Kernel:
    tin, tw = o.tin(0), o.tin(1)
    s_in, zp_in = o.qp(tin)
    s_out, _ = o.qp(o.tout)
    if tw.dtype != "INT8" or tw.data is None:
        raise o.fail(f"weights '{tw.name}' must be a constant int8 tensor (got {tw.dtype})")
    if o.op.options.get("weightsFormat", 0) != 0:
        raise o.fail("shuffled FULLY_CONNECTED weights are not emulated")
    out_ch, depth = tw.data.shape
    per_channel = tw.scales.size > 1
    zp_w = 0 if per_channel else int(tw.zero_points[0])
    w = tw.data.astype(np.float64) - zp_w
    bias_np = (o.tin(2).data.astype(np.float64) if o.has_input(2) and o.tin(2).data is not None
               else np.zeros(out_ch))
    acc_bound = 255.0 * np.abs(w).sum(axis=1) + np.abs(bias_np)
    x_max = float(max(-o.qrange(tin)[0], o.qrange(tin)[1]))
    dtype, slices = _chunks(np.abs(w), np.abs(bias_np), x_max, abs(zp_in), o.device)
    bias_np = bias_np - zp_in * w.sum(axis=1)  # the input zero point folded into the bias
    weights = [torch.as_tensor(np.ascontiguousarray(w[:, sl].T), device=o.device).to(dtype)
               for sl in (slices or [slice(None)])]
    bias = torch.as_tensor(bias_np, device=o.device).to(dtype if slices is None else torch.float64)
    s_w = tw.scales if per_channel else np.full(out_ch, tw.scales[0], np.float32)
    lo, hi = activation_range(o, o.op.fused_activation)
    fc_mult = "double" if per_channel else o.rules["fc_multiplier"]
    stage = output_stage(o, o.rules["fully_connected"], s_in, s_w, s_out, lo, hi, acc_bound, fc_mult)
    keep = o.op.options.get("keepNumDims", False)

    def run(xs):
        x = xs[0]
        rows = x.reshape(-1, depth).to(dtype)
        if slices is None:  # exact (module docstring), bias included
            acc = torch.addmm(bias, rows, weights[0])
        else:
            acc = sum((rows[:, sl] @ wt).to(torch.float64) for sl, wt in zip(slices, weights)).add_(bias)
        out = stage(acc)
        return out.reshape(*x.shape[:-1], out_ch) if keep else out

    return run


def transpose_conv(o: Op) -> Kernel:
    """TRANSPOSE_CONV (inputs: output shape, filter (O, kh, kw, I), input, optional bias): every input tap
    scatters (x - zp) * w into the output window at y * stride - pad + ky, pad from TFLite's padding rule
    applied to the output size; + bias, then the backend's output stage (rules.py, "transpose_conv")."""
    opts = o.op.options
    tw, tin = o.tin(1), o.tin(2)
    s_in, zp_in = o.qp(tin)
    s_out, _ = o.qp(o.tout)
    _check_int8_filter(o, tw)
    w = tw.data.astype(np.float64)  # (O, kh, kw, I)
    cout, kh, kw, _ = w.shape
    bias_np = (o.tin(3).data.astype(np.float64) if o.has_input(3) and o.tin(3).data is not None
               else np.zeros(cout))
    # each output sums (x - zp) * w over at most all taps of one output channel: |x - zp| <= 255
    acc_bound = 255.0 * np.abs(w).reshape(cout, -1).sum(axis=1) + np.abs(bias_np)
    dtype = torch.float32 if o.device.type == "cpu" and acc_bound.max(initial=0) <= _F32_EXACT else torch.float64
    weight = torch.as_tensor(np.ascontiguousarray(w.transpose(3, 0, 1, 2)), device=o.device).to(dtype)
    bias = torch.as_tensor(bias_np, device=o.device).to(dtype)
    sh, sw = opts.get("strideH", 1), opts.get("strideW", 1)
    _, oh, ow, _ = o.tout.shape
    _, ph, _ = same_padding(oh, kh, sh, 1, opts.get("padding", "VALID"))
    _, pw, _ = same_padding(ow, kw, sw, 1, opts.get("padding", "VALID"))
    s_w = tw.scales if tw.scales.size == cout else np.full(cout, tw.scales[0], np.float32)
    lo, hi = activation_range(o, o.op.fused_activation)
    stage = output_stage(o, o.rules["transpose_conv"], s_in, s_w, s_out, lo, hi, acc_bound)

    def run(xs):
        x = xs[2].to(dtype).sub_(zp_in).permute(0, 3, 1, 2)
        with _exact_context(x.device):
            full = F.conv_transpose2d(x, weight, stride=(sh, sw))
        short_h, short_w = max(ph + oh - full.shape[2], 0), max(pw + ow - full.shape[3], 0)
        if short_h or short_w:  # output rows past the last tap get only the bias
            full = F.pad(full, (0, short_w, 0, short_h))
        acc = full[:, :, ph:ph + oh, pw:pw + ow] + bias[:, None, None]
        return stage(acc.permute(0, 2, 3, 1))

    return run


def batch_matmul(o: Op) -> Kernel:
    """BATCH_MATMUL of two int8 activations (adj_x / adj_y transpose the last two axes; leading axes
    broadcast): exact sum of (a - za)(b - zb), then the per-tensor output stage (rules.py, "batch_matmul";
    the multiplier is float32(s_a * s_b) / s_out, as GetQuantizedConvolutionMultipler computes it)."""
    ta, tb = o.tin(0), o.tin(1)
    (sa, za), (sb, zb), (so, _) = o.qp(ta), o.qp(tb), o.qp(o.tout)
    adj_x, adj_y = bool(o.op.options.get("adjX", False)), bool(o.op.options.get("adjY", False))
    depth = ta.shape[-2] if adj_x else ta.shape[-1]
    acc_bound = np.array([255.0 * 255.0 * depth])
    dtype = torch.float32 if o.device.type == "cpu" and acc_bound[0] <= _F32_EXACT else torch.float64
    lo, hi = activation_range(o, o.op.fused_activation)
    stage = output_stage(o, o.rules["batch_matmul"], sa, np.array([sb], np.float32), so, lo, hi, acc_bound,
                         "float_product")

    def run(xs):
        a, b = xs[0].to(dtype).sub_(za), xs[1].to(dtype).sub_(zb)  # |a - za|, |b - zb| <= 255: exact products
        a = a.transpose(-1, -2) if adj_x else a
        b = b.transpose(-1, -2) if adj_y else b
        return stage(torch.matmul(a, b).unsqueeze(-1)).squeeze(-1)

    return run
