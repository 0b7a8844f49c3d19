"""Functions that `handlers.decompose` writes into a QAT graph: each one is exactly one int8 TFLite op or
a constant operand of one.

Hard sigmoid, relu6(x + 3) / 6, has no TFLite op; it runs as ADD (constant 3, fused RELU6) then MUL (constant
1/6). Both outputs get fixed grids, [0, 6] and [0, 1] (`quantizers.FIXED_RANGES`): code k of the first is
k * 6/255, and times 1/6 it is exactly code k of the second, so the MUL never rounds (docs/numerics.md,
per-backend kernel rules).

Adaptive average pooling with unequal windows (torchvision VGG's AdaptiveAvgPool2d(7) over a 2x2 map) has no
TFLite op; it runs as GATHER along H and W, then AVERAGE_POOL_2D with kernel = stride (`adaptive_pool_axis`):
each window's pixels are gathered into K consecutive rows, repeated K / length times, so the mean over those K
rows is the window's mean exactly (docs/numerics.md, adaptive average pooling).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .qparams import tflite_qparams

__all__ = ["constant_like", "converter_constant", "hardsigmoid_relu6", "hardsigmoid_scale", "rsqrt",
           "adaptive_pool_windows", "adaptive_pool_axis", "gather_rows", "MAX_GATHERED_KERNEL"]

MAX_GATHERED_KERNEL = 16  # the largest K per axis of the gathered form: its tensor is K times the pooled one per axis


def _constant(value: float, like: torch.Tensor) -> torch.Tensor:
    """A 1-element tensor constant: ONNX gets a [1]-shaped constant, which onnx2tf keeps as an array (a 0-d one
    becomes a Python float that its accuracy check of broadcast ADD/MUL cannot handle when two dims are equal)."""
    return torch.full((1,), value, dtype=like.dtype, device=like.device)


def hardsigmoid_relu6(x: torch.Tensor) -> torch.Tensor:
    """relu6(x + 3): TFLite ADD with a constant 3 and a fused RELU6, output on the fixed [0, 6] grid."""
    return F.relu6(x + _constant(3.0, x))


def hardsigmoid_scale(x: torch.Tensor) -> torch.Tensor:
    """x / 6 as TFLite MUL with a constant 1/6 (a MUL: DIV has no int8 kernel on every backend), output on the
    fixed [0, 1] grid."""
    return x * _constant(1.0 / 6.0, x)


def adaptive_pool_windows(n: int, m: int) -> list[tuple[int, int]]:
    """torch's adaptive pooling windows from n to m along one axis: output i averages [start, end)."""
    return [(i * n // m, -(-(i + 1) * n // m)) for i in range(m)]


def adaptive_pool_axis(n: int, m: int) -> tuple[tuple[int, ...] | None, int] | None:
    """How AVERAGE_POOL_2D computes adaptive average pooling from n to m along one axis: (indices, K), the pixels
    to gather (None when n is a multiple of m: the windows are then disjoint, K = n // m each) and the pool's
    kernel = stride K; None when K would exceed MAX_GATHERED_KERNEL.

    Output i averages [floor(i*n/m), ceil((i+1)*n/m)) (torch's windows); K is the lcm of the window lengths, and
    each window's pixels are gathered in order, each one K / length times (a length-1 window twice for K = 2)."""
    if n % m == 0:
        return None, n // m
    windows = adaptive_pool_windows(n, m)
    k = math.lcm(*(end - start for start, end in windows))
    if k > MAX_GATHERED_KERNEL:
        return None
    return tuple(start + j * (end - start) // k for start, end in windows for j in range(k)), k


def gather_rows(x: torch.Tensor, dim: int, index: tuple[int, ...]) -> torch.Tensor:
    """x's slices `index` along `dim`: TFLite GATHER with constant indices (ONNX Gather), the input's grid."""
    return torch.index_select(x, dim, torch.tensor(index, dtype=torch.long, device=x.device))


# -- constants and LayerNorm's pieces (handlers.decompose writes them) -----------------------------------
def constant_like(x: torch.Tensor, value: float) -> torch.Tensor:
    """A scalar operand of ADD/SUB/MUL (x * 0.125, q / sqrt(d)) as a [1]-shaped constant (see `_constant`: onnx2tf
    cannot check a 0-d one against an (N, T, T) tensor). The
    converter quantizes it per tensor over [min(0, c), max(0, c)], where c is code 127 or -128: exact, so the
    simulation uses c itself (docs/numerics.md, converter qparams)."""
    return _constant(float(value), x)


def converter_constant(w: torch.Tensor) -> torch.Tensor:
    """A constant tensor operand of ADD/MUL (a positional embedding, LayerNorm's gamma and beta) on the grid the
    TFLite converter gives a float constant: per tensor over [min(0, min w), max(0, max w)] with its double
    formula (`tflite_qparams`), codes rounded half away from zero; straight-through gradient. The ONNX export
    gets the float values: the converter quantizes them itself, to these codes (docs/numerics.md)."""
    if torch.onnx.is_in_onnx_export():
        return w
    with torch.no_grad():
        lo, hi = min(0.0, float(w.min())), max(0.0, float(w.max()))
        if lo == hi:
            return w
        qp = tflite_qparams(lo, hi)
        scale, zp = float(qp.scale), int(qp.zero_point_signed)
        v = w.double() / scale
        codes = (torch.sign(v) * torch.floor(v.abs() + 0.5) + zp).clamp(-128, 127)
        q = ((codes - zp) * scale).to(w.dtype)
    return w + (q - w).detach()


def rsqrt(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(x) as TFLite's int8 RSQRT (LayerNorm's 1 / std). A zero input code gives RSQRT's largest output
    code; training clamps x to `eps` (the LayerNorm's), which saturates there too and keeps gradients finite."""
    if torch.onnx.is_in_onnx_export():
        return torch.rsqrt(x)
    return torch.rsqrt(x.clamp_min(eps))
