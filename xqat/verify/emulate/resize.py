"""RESIZE_BILINEAR on int8 codes: per-backend fixed-point interpolation weights (rules.py, "resize_bilinear").

Both kernels interpolate the raw codes (input and output share scale and zero point, so no requantization):
the reference and optimized TFLite kernels (the optimized int8 one is the reference) use 10-bit source
coordinates computed in integers and round the 20-bit sum half away from zero; XNNPACK uses float32 source
coordinates, 11-bit weights from lrintf, two lerps and a half-up shift by 22. The per-row and per-column
weights depend only on the shapes, so they are computed once here.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import TORCH_DTYPES, Kernel, Op

__all__ = ["resize_bilinear"]


def _tflite_axis(in_size: int, out_size: int, align_corners: bool, half_pixel: bool):
    """ComputeInterpolationValuesInteger: (low index, high index, weight of low, weight of high), weights
    in 1/1024 (they sum to 1024; with half-pixel centers the first can exceed it at the border)."""
    if align_corners and out_size > 1:
        scale = ((1 << 10) * (in_size - 1) + (out_size - 1) // 2) // (out_size - 1)
    else:
        scale = ((1 << 10) * in_size + out_size // 2) // out_size
    v = np.arange(out_size, dtype=np.int64) * scale
    if half_pixel:
        v = v + scale // 2 - (1 << 9)
    lo = np.maximum(np.trunc(v / 1024).astype(np.int64), 0)  # C division truncates toward zero
    hi = np.minimum(np.trunc((v + 1023) / 1024).astype(np.int64), in_size - 1)
    frac = v - 1024 * lo
    return lo, hi, 1024 - frac, frac


def _xnnpack_axis(in_size: int, out_size: int, align_corners: bool, half_pixel: bool):
    """xnn_indirection_init_resize_bilinear2d_hwc_q11: float32 source coordinate (fmaf with the half-pixel
    offset, clamped to the image), low = trunc, weight of high = lrintf(frac * 2048) in 1/2048."""
    f32 = np.float32
    adjust = int(align_corners and out_size != 1)
    scale = f32(f32(in_size - adjust) / f32(out_size - adjust))
    y = np.arange(out_size).astype(np.float64)
    if align_corners or not half_pixel:
        src = (y * np.float64(scale)).astype(f32)  # exact product, one rounding: float32 multiply
    else:
        offset = f32(f32(0.5) * scale - f32(0.5))
        src = (y * np.float64(scale) + np.float64(offset)).astype(f32)  # fmaf
        src = np.clip(src, f32(0), f32(in_size - 1))
    lo = src.astype(np.int64)
    hi = np.minimum(lo + 1, in_size - 1)
    alpha = np.rint((src - lo.astype(f32)).astype(f32) * f32(2048.0)).astype(np.int64)
    return lo, hi, alpha


def resize_bilinear(o: Op) -> Kernel:
    tin = o.tin(0)
    if o.qp(tin) != o.qp(o.tout):
        raise o.fail("input and output quantization differ; int8 RESIZE_BILINEAR interpolates codes as they are")
    (_, h, w, _), (_, oh, ow, _) = tin.shape, o.tout.shape
    ac = bool(o.op.options.get("alignCorners", False))
    hp = bool(o.op.options.get("halfPixelCenters", False))
    dtype, dev = TORCH_DTYPES[o.tout.dtype], o.device

    def t(a):
        return torch.as_tensor(a, device=dev)

    if o.rules["resize_bilinear"] == "xnnpack":
        (y0, y1, ay), (x0, x1, ax) = _xnnpack_axis(h, oh, ac, hp), _xnnpack_axis(w, ow, ac, hp)
        ay, ax = t(ay)[None, :, None, None], t(ax)[None, None, :, None]

        def xnn(xs):
            x = xs[0].to(torch.int64)
            rows0, rows1 = x[:, t(y0)], x[:, t(y1)]
            tl, tr, bl, br = rows0[:, :, t(x0)], rows0[:, :, t(x1)], rows1[:, :, t(x0)], rows1[:, :, t(x1)]
            top = tl * 2048 + (tr - tl) * ax
            bottom = bl * 2048 + (br - bl) * ax
            acc = top * 2048 + (bottom - top) * ay
            return ((acc + (1 << 21)) >> 22).to(dtype)

        return xnn
    (y0, y1, wy0, wy1), (x0, x1, wx0, wx1) = _tflite_axis(h, oh, ac, hp), _tflite_axis(w, ow, ac, hp)
    wy0, wy1 = t(wy0)[None, :, None, None], t(wy1)[None, :, None, None]
    wx0, wx1 = t(wx0)[None, None, :, None], t(wx1)[None, None, :, None]

    def ref(xs):
        x = xs[0].to(torch.int64)
        rows0, rows1 = x[:, t(y0)], x[:, t(y1)]
        acc = ((rows0[:, :, t(x0)] * wx0 + rows0[:, :, t(x1)] * wx1) * wy0
               + (rows1[:, :, t(x0)] * wx0 + rows1[:, :, t(x1)] * wx1) * wy1)
        half = torch.where(acc > 0, 1 << 19, -(1 << 19))
        return torch.div(acc + half, 1 << 20, rounding_mode="trunc").to(dtype)  # half away from zero

    return ref
