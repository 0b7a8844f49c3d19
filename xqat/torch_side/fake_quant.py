"""TensorFlow's fake-quant ops in torch, bit for bit: forward and gradient.

`fake_quant` is tf.quantization.fake_quant_with_min_max_vars; `fake_quant_per_channel` is
..._vars_per_channel. Every step is a separately rounded float32 op in TF's order (docs/numerics.md#forward): the
per-tensor op divides by the scale, the per-channel op multiplies by the separately computed
inverse scale, and rounding is floor(t - quant_zero + 0.5). The gradient is
FakeQuantWithMinMaxVarsGradient (docs/numerics.md#gradients): a straight-through estimator inside the nudged range
(bounds included), and the sums of the gradients strictly below/above it for min/max.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from .qparams import _nudge_core, check_num_bits, nudge_with_inverse, quant_bounds
from .traced import compiling

__all__ = ["fake_quant", "fake_quant_per_channel", "use_fused_kernels"]

_INF = float("inf")
# TF's CPU kernels run with denormals flushed to zero, so a denormal x compares like 0. Where a
# nudged bound is 0 the backward mask uses the largest denormal instead: x >= -d  <=>  flush(x) >= 0.
_DENORM_MAX = float(torch.nextafter(torch.tensor(torch.finfo(torch.float32).tiny), torch.tensor(0.0)))


def _grid(min_val: torch.Tensor, max_val: torch.Tensor, num_bits: int, narrow_range: bool):
    """Nudged grid for the forward pass; min == max == 0 becomes a dummy grid that maps all to 0.

    TF special-cases min == max == 0 (docs/numerics.md#edge-cases): output 0, gradient passed to x. Substituting the
    grid nudged=[0, 0], scale=1 gives that output without a branch or a device sync.
    """
    g, inv_scale = nudge_with_inverse(min_val, max_val, num_bits, narrow_range)
    zero = (min_val == 0) & (max_val == 0)
    one = torch.ones_like(g.scale)
    scale = torch.where(zero, one, g.scale)
    inv_scale = torch.where(zero, one, inv_scale)
    nmin = torch.where(zero, torch.zeros_like(g.nudged_min), g.nudged_min)
    nmax = torch.where(zero, torch.zeros_like(g.nudged_max), g.nudged_max)
    quant_zero = torch.floor(-nmin * inv_scale + 0.5)
    return zero, scale, inv_scale, nmin, nmax, quant_zero


def _grid_scalar(mn: float, mx: float, num_bits: int, narrow_range: bool):
    """`_grid` for one per-tensor range in numpy float32 scalars (the same `_nudge_core` formula): the CPU
    path, where ~30 tiny tensor ops per call would cost more than the fake quant of a small tensor."""
    zero = mn == 0.0 and mx == 0.0
    if zero:
        return True, 1.0, 1.0, 0.0, 0.0, 0.0
    qmin, qmax = quant_bounds(num_bits, narrow_range)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        scale, _, nmin, nmax, inv = (np.float32(v) for v in _nudge_core(
            np.float32(mn), np.float32(mx), np.float32(qmin), np.float32(qmax), np.where, np.floor))
        quant_zero = np.floor(-nmin * inv + np.float32(0.5))
    return False, float(scale), float(inv), float(nmin), float(nmax), float(quant_zero)


def _clamp(x, lo, hi):
    """clamp; per-tensor bounds on the CPU as Python floats (exact: they are float32 values), which takes
    torch's scalar kernel, several times faster than broadcasting 0-d tensors."""
    if isinstance(lo, float):
        return torch.clamp(x, lo, hi)
    if lo.dim() == 0 and x.device.type == "cpu" and not compiling():
        return torch.clamp(x, float(lo), float(hi))
    return torch.clamp(x, lo, hi)


def _forward_eager(x, nmin, nmax, step, scale, quant_zero, divide: bool):
    """TF's op order, each step a separately rounded float32 op, in place after the clamp (docs/numerics.md#forward)."""
    out = _clamp(x, nmin, nmax)
    out.sub_(nmin)
    out.div_(step) if divide else out.mul_(step)
    return out.sub_(quant_zero).add_(0.5).floor_().mul_(scale)


def _forward_functional(x, nmin, nmax, step, scale, quant_zero, divide: bool):
    """`_forward_eager` out of place, for torch.compile: Inductor fuses it into one pass and keeps every op
    separately rounded (no FMA contraction on CPU), so the result is the same bit for bit."""
    t = torch.clamp(x, nmin, nmax) - nmin
    t = t / step if divide else t * step
    return torch.floor((t - quant_zero) + 0.5) * scale


def use_fused_kernels(enabled: bool = True) -> None:
    """Deprecated, does nothing: the fast path is `torch.compile(model)` on a `prepare_qat` model, which compiles
    the whole training step (fake quant, range updates, BN fold) without graph breaks and with the same bits."""
    warnings.warn("xqat.use_fused_kernels is deprecated and does nothing: compile the whole QAT model with "
                  "torch.compile(model) instead (same numerics, one fast path)", DeprecationWarning, stacklevel=2)


class _FakeQuantFn(torch.autograd.Function):
    """x, min, max are float32 and already broadcastable; `divide` picks the per-tensor form.

    Eager CPU per-tensor calls compute the grid as Python scalars (a few microseconds instead of ~30 tiny tensor
    ops); every other case, and everything under torch.compile, computes it as tensors: same float32 formula.
    """

    @staticmethod
    def forward(ctx, x, min_val, max_val, num_bits: int, narrow_range: bool, divide: bool, reduce_dims):
        traced = compiling()
        if min_val.dim() == 0 and x.device.type == "cpu" and not traced:
            zero, scale, inv_scale, nmin, nmax, quant_zero = _grid_scalar(
                float(min_val), float(max_val), num_bits, narrow_range)
            out = _forward_eager(x, nmin, nmax, scale if divide else inv_scale, scale, quant_zero, divide)
            lo = -_INF if zero else (-_DENORM_MAX if nmin == 0 else nmin)
            hi = _INF if zero else (_DENORM_MAX if nmax == 0 else nmax)
            ctx.save_for_backward(x)
            ctx.bounds = (lo, hi)
        else:
            zero, scale, inv_scale, nmin, nmax, quant_zero = _grid(min_val, max_val, num_bits, narrow_range)
            forward = _forward_functional if traced else _forward_eager
            out = forward(x, nmin, nmax, scale if divide else inv_scale, scale, quant_zero, divide)
            # Gradient bounds: the zero-range case passes everything (infinite range there), and a
            # bound at 0 admits denormals as TF's flush-to-zero does.
            lo = torch.where(zero, -_INF, torch.where(nmin == 0, -_DENORM_MAX, nmin))
            hi = torch.where(zero, _INF, torch.where(nmax == 0, _DENORM_MAX, nmax))
            ctx.save_for_backward(x, lo, hi)
            ctx.bounds = None
        ctx.reduce_dims = reduce_dims
        ctx.min_shape, ctx.max_shape = min_val.shape, max_val.shape
        return out

    @staticmethod
    def backward(ctx, grad):
        if ctx.bounds is None:
            x, lo, hi = ctx.saved_tensors
        else:
            (x,), (lo, hi) = ctx.saved_tensors, ctx.bounds
        dx = dmin = dmax = None
        if ctx.needs_input_grad[0]:
            dx = grad * (_clamp(x, lo, hi) == x)  # == (lo <= x <= hi), NaN excluded, in 2 passes
        if ctx.needs_input_grad[1]:
            dmin = torch.where(x < lo, grad, 0.0).sum(ctx.reduce_dims).reshape(ctx.min_shape)
        if ctx.needs_input_grad[2]:
            dmax = torch.where(x > hi, grad, 0.0).sum(ctx.reduce_dims).reshape(ctx.max_shape)
        return dx, dmin, dmax, None, None, None, None


def _check_input(x, num_bits, narrow_range, op: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{op}: x must be a floating-point tensor (fake quant takes real values), got {x.dtype}")
    check_num_bits(num_bits)
    if not isinstance(narrow_range, bool):
        raise TypeError(f"{op}: narrow_range must be a bool, got {narrow_range!r}")


def _range_tensor(v, x: torch.Tensor, what: str, op: str) -> torch.Tensor:
    t = v if isinstance(v, torch.Tensor) else torch.as_tensor(v)
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{op}: {what} must be real, got {t.dtype}")
    return t.to(device=x.device, dtype=torch.float32)


def fake_quant(
    x: torch.Tensor, min, max, num_bits: int = 8, narrow_range: bool = False  # noqa: A002
) -> torch.Tensor:
    """tf.quantization.fake_quant_with_min_max_vars: per-tensor fake quant with TF's nudge.

    `min`/`max` are floats or one-element tensors; tensors that require grad receive TF's
    min/max gradient. Non-float32 inputs are computed in float32 and cast back.
    """
    op = "xqat.fake_quant"
    _check_input(x, num_bits, narrow_range, op)
    mn, mx = _range_tensor(min, x, "min", op), _range_tensor(max, x, "max", op)
    for what, t in (("min", mn), ("max", mx)):
        if t.numel() != 1:
            raise ValueError(
                f"{op}: {what} must be a scalar (one element), got shape {tuple(t.shape)}; "
                "use xqat.fake_quant_per_channel for per-channel ranges"
            )
    out = _FakeQuantFn.apply(x.float(), mn.reshape(()), mx.reshape(()), int(num_bits), narrow_range, True, ())
    return out.to(x.dtype)


def fake_quant_per_channel(
    x: torch.Tensor,
    min,  # noqa: A002
    max,  # noqa: A002
    num_bits: int = 8,
    narrow_range: bool = False,
    axis: int = -1,
) -> torch.Tensor:
    """tf.quantization.fake_quant_with_min_max_vars_per_channel, with a choice of channel axis.

    TF's channel is the last dimension (the default); `axis=0` serves torch conv weights (O,I,kh,kw)
    without a transpose. `min`/`max` have shape [C] with C = x.shape[axis].
    """
    op = "xqat.fake_quant_per_channel"
    _check_input(x, num_bits, narrow_range, op)
    if x.dim() == 0:
        raise ValueError(f"{op}: x must have at least one dimension (the channel axis), got a 0-d tensor")
    if not -x.dim() <= axis < x.dim():
        raise ValueError(f"{op}: axis {axis} is out of range for a {x.dim()}-d input of shape {tuple(x.shape)}")
    axis = axis % x.dim()
    channels = x.shape[axis]
    mn, mx = _range_tensor(min, x, "min", op), _range_tensor(max, x, "max", op)
    for what, t in (("min", mn), ("max", mx)):
        if t.dim() != 1 or t.shape[0] != channels:
            raise ValueError(
                f"{op}: {what} must have shape [{channels}] (one value per channel of axis {axis} "
                f"of input shape {tuple(x.shape)}), got {tuple(t.shape)}"
            )
    view = [1] * x.dim()
    view[axis] = channels
    reduce_dims = tuple(d for d in range(x.dim()) if d != axis)
    out = _FakeQuantFn.apply(
        x.float(), mn.reshape(view), mx.reshape(view), int(num_bits), narrow_range, False, reduce_dims
    )
    return out.to(x.dtype)
