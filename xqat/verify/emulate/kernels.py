"""Per-op integer kernels of the TFLite int8 runtime, in torch (tf-quant-semantics §4.4, §5).

`build(op, model, backend, device)` turns one flatbuffer op into a function of its input tensors.
Everything that depends only on the model (multipliers, tables, weights on the device) is computed
once here. Tensors are batched along dim 0: the interpreter runs batch 1, the kernels run N samples.

Exactness of the convolutions and matrix products (`_chunks`): they run as floating-point
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
overflow int32 are outside what either computes.

Requantization (`_output_stage`): MultiplyByQuantizedMultiplier + zero point + clamp runs as one exact
float64 floor over a clamped window (`rounding.one_floor_requantizer`), the int64 chain otherwise.
Elementwise ops of 8-bit inputs (ADD, MUL, requantizing QUANTIZE, LOGISTIC, TANH) are tables over all
input codes, built once from the integer formulas (`_table_kernel`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import EmulationError
from ...tflite.model import TFLiteModel, TFLiteOp, TFLiteTensor
from . import fixedpoint as fxp
from .libm import expf, tanhf
from .rounding import (
    float64_requantize,
    fp32_requantize,
    mbqm,
    mbqm_ruy,
    mbqm_single,
    one_floor_requantizer,
    quantize_multiplier,
    rdbp,
    round_half_away,
    srdhm,
)
from .rules import RULES, rules_for

__all__ = ["build", "SUPPORTED_OPS", "TORCH_DTYPES", "batched_shape"]

Kernel = Callable[[Sequence[torch.Tensor]], torch.Tensor]

TORCH_DTYPES = {
    "INT8": torch.int8, "UINT8": torch.uint8, "INT16": torch.int16, "INT32": torch.int32,
    "INT64": torch.int64, "FLOAT32": torch.float32,
}
_QRANGE = {"INT8": (-128, 127), "UINT8": (0, 255), "INT16": (-32768, 32767)}


class _Op:
    """What a kernel builder needs: the op, its tensors, its backend's rules and the device."""

    def __init__(self, op: TFLiteOp, model: TFLiteModel, backend: str, device: torch.device, threads: int = 1):
        self.op, self.model, self.device = op, model, device
        self.backend, self.threads = backend, threads
        if backend == "xnnpack" and not _xnnpack_accepts(self):
            backend = "builtin"  # the delegate leaves this node to the builtin kernel
        self.rules = rules_for(backend, op.name)

    def fail(self, why: str) -> EmulationError:
        return EmulationError(f"op #{self.op.index} {self.op.name} (output tensor "
                              f"'{self.model.tensor(self.op.outputs[0]).name}'): {why}")

    def tin(self, i: int) -> TFLiteTensor:
        return self.model.tensor(self.op.inputs[i])

    @property
    def tout(self) -> TFLiteTensor:
        return self.model.tensor(self.op.outputs[0])

    def has_input(self, i: int) -> bool:
        return len(self.op.inputs) > i and self.op.inputs[i] >= 0

    def qp(self, t: TFLiteTensor) -> tuple[np.float32, int]:
        """Per-tensor (scale, zero point) of an activation tensor."""
        if t.dtype not in _QRANGE:
            raise self.fail(f"tensor '{t.name}' is {t.dtype}; only int8/uint8 activations are emulated")
        if t.scales.size != 1 or t.zero_points.size != 1:
            raise self.fail(f"tensor '{t.name}' has {t.scales.size} scales; activations must be per-tensor")
        return np.float32(t.scales[0]), int(t.zero_points[0])

    def qrange(self, t: TFLiteTensor) -> tuple[int, int]:
        return _QRANGE[t.dtype]

    def const(self, t: TFLiteTensor, dtype=torch.int64) -> torch.Tensor:
        if t.data is None:
            raise self.fail(f"input '{t.name}' must be a constant tensor in the file")
        return torch.as_tensor(np.array(t.data)).to(device=self.device, dtype=dtype)

    def cast_out(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(TORCH_DTYPES[self.tout.dtype])


def _simd_body(t: TFLiteTensor, block: int, device: torch.device) -> torch.Tensor:
    """Mask over the flat elements of one interpreter call: True where a SIMD block of `block` elements
    covers it, False in the scalar tail (the last numel % block elements)."""
    n = int(np.prod(t.shape))
    return torch.arange(n, device=device) < block * (n // block)


def wrap_int16(x: torch.Tensor) -> torch.Tensor:
    """Two's-complement wrap to int16 (what 16-bit SIMD packing does to out-of-range results)."""
    return ((x + (1 << 15)) & 0xFFFF) - (1 << 15)


def _simd_split(body_mask: torch.Tensor, body: Callable, tail: Callable) -> Callable:
    """Elementwise kernel whose SIMD body and scalar tail round differently (optimized x86 kernels)."""
    if bool(body_mask.all()):
        return body
    if not bool(body_mask.any()):
        return tail

    def fn(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, body_mask.numel())  # one row per interpreter call
        return torch.where(body_mask, body(flat), tail(flat)).reshape(x.shape)

    return fn


def _codes(t: TFLiteTensor) -> torch.Tensor:
    """The 256 codes of an 8-bit tensor, listed in the order of their bit patterns (code & 255)."""
    u = torch.arange(256, dtype=torch.int64)
    return torch.where(u >= 128, u - 256, u) if t.dtype == "INT8" else u


def _bit_pattern(x: torch.Tensor) -> torch.Tensor:
    """8-bit codes -> their bit patterns 0..255 as int32 (the index into a `_table_kernel` table)."""
    return (x.view(torch.uint8) if x.dtype == torch.int8 else x).to(torch.int32)


def _table_kernel(o: _Op, tail: Callable[..., torch.Tensor], body: Callable[..., torch.Tensor] | None = None,
                  block: int = 16) -> Kernel:
    """An elementwise op of one or two 8-bit inputs as a lookup table over every input code (256 or 65536
    entries), built once from the exact integer formula; each element is then one gather.

    `tail(*codes)` maps int64 input codes to output codes; with `body`, the SIMD blocks of `block`
    elements of each call use `body` and the last numel % block elements `tail` (optimized x86 kernels)."""
    ins = [o.tin(i) for i in range(len(o.op.inputs))]
    mask = _simd_body(o.tout, block, torch.device("cpu")) if body is not None else None
    if mask is not None and bool(mask.all()):
        tail, mask = body, None
    elif mask is not None and not bool(mask.any()):
        mask = None
    if len(ins) > 2 or any(t.dtype not in ("INT8", "UINT8") for t in ins):  # e.g. int16: the formula itself
        dev_mask = None if mask is None else mask.to(o.device)

        def direct(xs):
            xs = torch.broadcast_tensors(*[x.to(torch.int64) for x in xs])
            if dev_mask is None:
                return o.cast_out(tail(*xs))
            flat = [x.reshape(-1, dev_mask.numel()) for x in xs]  # one row per interpreter call
            return o.cast_out(torch.where(dev_mask, body(*flat), tail(*flat))).reshape(xs[0].shape)

        return direct
    grid = [g.reshape(-1) for g in torch.meshgrid(*[_codes(t) for t in ins], indexing="ij")]
    tables = [tail(*grid)] + ([body(*grid)] if mask is not None else [])
    table = o.cast_out(torch.cat(tables)).to(o.device)
    size = grid[0].numel()
    offset = None if mask is None else (mask.to(torch.int32) * size).reshape(o.tout.shape[1:]).to(o.device)

    def run(xs):
        idx = _bit_pattern(xs[0])
        if len(xs) == 2:
            idx = idx.mul_(256) + _bit_pattern(xs[1])
        if offset is not None:
            idx = idx + offset
        return torch.index_select(table, 0, idx.reshape(-1)).reshape(idx.shape)

    return run


def _xnnpack_accepts(o: _Op) -> bool:
    """The XNNPACK delegate's scale checks for quantized nodes (ratios outside them stay builtin)."""
    name = o.op.name
    quantized = [o.tin(i) for i in range(len(o.op.inputs)) if o.has_input(i)] + [o.tout]
    float_io = any(t.dtype not in _QRANGE for t in quantized if t.data is None)
    if float_io and name not in ("QUANTIZE", "DEQUANTIZE"):
        return False
    so = np.float32(o.tout.scales[0]) if o.tout.scales.size else None
    if name == "ADD":
        return all(2.0 ** -10 <= np.float32(o.tin(i).scales[0] / so) < 256.0 for i in (0, 1))
    if name == "MUL":
        prod = np.float32(np.float32(o.tin(0).scales[0] * o.tin(1).scales[0]) / so)
        return 2.0 ** -16 <= prod < 256.0
    if name == "QUANTIZE" and o.tin(0).dtype != "FLOAT32":
        if o.tin(0).dtype != o.tout.dtype:
            return False
        ratio = np.float32(o.tin(0).scales[0] / so)
        return 2.0 ** -8 <= ratio <= 128.0
    return True


def batched_shape(model_shape: Sequence[int]) -> tuple[int, ...]:
    """A model shape with the batch dimension left free (dim 0 -> -1); scalars stay scalars."""
    return (-1, *model_shape[1:]) if len(model_shape) else ()


# ---------------------------------------------------------------------------------------------
# Requantization, activation clamps


def _activation_range(o: _Op, act: str) -> tuple[int, int]:
    """Integer clamp of a fused activation (§4.4): TFLite rounds f/s half away, XNNPACK lrintf(f/s + zp)."""
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
    """Per-channel (int32 multiplier, shift) of a conv/FC output stage (§5.1): s_in * s_w / s_out in double,
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


def _fixed_point_stage(o: _Op, mult: np.ndarray, shift: np.ndarray, ruy: np.ndarray, zp: int, lo: int,
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


def _output_stage(o: _Op, rule: str, s_in, s_w, s_out, act_lo: int, act_hi: int, acc_bound: np.ndarray,
                  fc_multiplier: str = "double") -> Callable[[torch.Tensor], torch.Tensor]:
    """Requantize accumulators (exact integers held in a float tensor, channels last, |acc| <= acc_bound
    per channel) to the output tensor: scale, + zp, clamp (§5.3)."""
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
    return _fixed_point_stage(o, mult, shift, _ruy_channels(rule, len(np.atleast_1d(s_w))), zp, act_lo,
                              act_hi, acc_bound)


# ---------------------------------------------------------------------------------------------
# Convolutions# ---------------------------------------------------------------------------------------------
# Convolutions


def _same_padding(size: int, k: int, stride: int, dilation: int, padding: str) -> tuple[int, int, int]:
    """TFLite ComputePaddingHeightWidth: (out, pad_before, pad_after)."""
    eff = (k - 1) * dilation + 1
    if padding == "SAME":
        out = (size + stride - 1) // stride
    elif padding == "VALID":
        out = (size + stride - eff) // stride
    else:
        raise ValueError(padding)
    total = max((out - 1) * stride + eff - size, 0)
    return out, total // 2, total - total // 2


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


def _conv_like(o: _Op, depthwise: bool) -> Kernel:
    opts = o.op.options
    tin, tw = o.tin(0), o.tin(1)
    s_in, zp_in = o.qp(tin)
    s_out, _ = o.qp(o.tout)
    if tw.dtype != "INT8" or tw.data is None:
        raise o.fail(f"filter '{tw.name}' must be a constant int8 tensor (got {tw.dtype})")
    if np.any(tw.zero_points != 0):
        raise o.fail(f"filter '{tw.name}' has nonzero zero points; int8 filters are symmetric")
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
    _, ph0, ph1 = _same_padding(tin.shape[1], kh, sh, dh, opts.get("padding", "VALID"))
    _, pw0, pw1 = _same_padding(tin.shape[2], kw, sw, dw, opts.get("padding", "VALID"))
    conv_pad = (ph0, pw0) if zp_in == 0 and ph0 == ph1 and pw0 == pw1 else (0, 0)
    int8_pad = (0, 0, pw0, pw1, ph0, ph1) if conv_pad == (0, 0) and (ph0 or ph1 or pw0 or pw1) else None
    lo, hi = _activation_range(o, o.op.fused_activation)
    stage = _output_stage(o, o.rules["depthwise" if depthwise else "conv"], s_in, s_w, s_out, lo, hi,
                          acc_bound)
    conv = dict(stride=(sh, sw), padding=conv_pad, dilation=(dh, dw), groups=groups)

    def run(xs):
        # out-of-image taps are real 0 (§5.3 notes): the code zp_in, padded while still integer
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


def _fully_connected(o: _Op) -> Kernel:
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
    lo, hi = _activation_range(o, o.op.fused_activation)
    fc_mult = "double" if per_channel else o.rules["fc_multiplier"]
    stage = _output_stage(o, o.rules["fully_connected"], s_in, s_w, s_out, lo, hi, acc_bound, fc_mult)
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


# ---------------------------------------------------------------------------------------------
# Elementwise binary ops


def _add(o: _Op) -> Kernel:
    t1, t2 = o.tin(0), o.tin(1)
    (s1, z1), (s2, z2), (so, zo) = o.qp(t1), o.qp(t2), o.qp(o.tout)
    lo, hi = _activation_range(o, o.op.fused_activation)
    rule = o.rules["add"]
    if rule == "xnnpack":  # qs8 vadd: one fixed-point multiply-add, arithmetic shift (§5.3)
        sa, sb = np.float32(s1 / so), np.float32(s2 / so)
        mx = max(sa, sb)
        shift = 20 - int(np.floor(np.log2(np.float64(mx))))
        if not 0 < shift <= 31:
            raise o.fail(f"input/output scale ratio {mx} is outside what XNNPACK's ADD accepts")
        am = int(np.rint(np.float32(sa * np.float32(2.0 ** shift))))
        bm = int(np.rint(np.float32(sb * np.float32(2.0 ** shift))))
        bias = (1 << (shift - 1)) - am * z1 - bm * z2
        return _table_kernel(o, lambda a, b: ((bias + am * a + bm * b) >> shift).add(zo).clamp(lo, hi))
    left_shift = 20
    twice_max = 2.0 * float(max(s1, s2))
    m1, sh1 = quantize_multiplier(float(s1) / twice_max)
    m2, sh2 = quantize_multiplier(float(s2) / twice_max)
    mo, sho = quantize_multiplier(twice_max / ((1 << left_shift) * float(so)))
    m1, sh1, m2, sh2, mo, sho = (int(v[0]) for v in (m1, sh1, m2, sh2, mo, sho))
    simd = rule == "simd16_int16wrap"  # builtin: single-rounding input scaling (§5.3), int16 packing
    in_scale = mbqm_single if simd else mbqm

    def out(a, b):
        raw = in_scale((a - z1) << left_shift, m1, sh1) + in_scale((b - z2) << left_shift, m2, sh2)
        return mbqm(raw, mo, sho) + zo

    if simd:  # 16-lane blocks pack the results to int16 (wrapping), the scalar tail does not
        return _table_kernel(o, lambda a, b: out(a, b).clamp(lo, hi),
                             lambda a, b: wrap_int16(out(a, b)).clamp(lo, hi))
    return _table_kernel(o, lambda a, b: out(a, b).clamp(lo, hi))


def _mul(o: _Op) -> Kernel:
    t1, t2 = o.tin(0), o.tin(1)
    (s1, z1), (s2, z2), (so, zo) = o.qp(t1), o.qp(t2), o.qp(o.tout)
    lo, hi = _activation_range(o, o.op.fused_activation)
    rule = o.rules["mul"]
    if rule == "fp32":
        sc = torch.tensor(np.float32(np.float32(s1 * s2) / so))
        return _table_kernel(o, lambda a, b: fp32_requantize((a - z1) * (b - z2), sc, zo, lo, hi))
    m, sh = quantize_multiplier(np.float64(s1) * np.float64(s2) / np.float64(so))
    m, sh = int(m[0]), int(sh[0])
    if sh > 0 and o.rules is RULES["builtin"]:
        ratio = float(s1) * float(s2) / float(so)
        raise o.fail(f"s1*s2/s_out = {ratio:.4g} >= 1: the optimized x86 MUL kernel "
                     "overflows in its SIMD lanes for such (saturating) outputs and is not emulated; use "
                     "backend='reference', or give the output a range that covers the product")
    return _table_kernel(o, lambda a, b: (mbqm((a - z1) * (b - z2), m, sh) + zo).clamp(lo, hi))


# ---------------------------------------------------------------------------------------------
# Pooling and reductions


def _pool(o: _Op, kind: str) -> Kernel:
    opts = o.op.options
    tin = o.tin(0)
    (si, zi), (so, zo) = o.qp(tin), o.qp(o.tout)
    if (si, zi) != (so, zo):
        raise o.fail("input and output quantization differ; TFLite pools keep the same scale and zero point")
    kh, kw = opts["filterHeight"], opts["filterWidth"]
    sh, sw = opts.get("strideH", 1), opts.get("strideW", 1)
    _, ph0, ph1 = _same_padding(tin.shape[1], kh, sh, 1, opts.get("padding", "VALID"))
    _, pw0, pw1 = _same_padding(tin.shape[2], kw, sw, 1, opts.get("padding", "VALID"))
    lo, hi = _activation_range(o, o.op.fused_activation)
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


def _mean(o: _Op) -> Kernel:
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
        stage = _fixed_point_stage(o, m, sh, ruy, bias, qmin, qmax, float(span))
        offset = 0
    elif rule == "fp32":  # XNNPACK: f32(sum - zp*N) * f32(f32(s_in/s_out) * f32(1/N)) + zp_out, half even
        scale = np.float32(np.float32(si / so) * np.float32(np.float32(1.0) / np.float32(n)))
        st, zt = torch.tensor(scale, device=o.device), torch.tensor(np.float32(zo), device=o.device)

        def stage(total):  # the output zero point is added in float32 before rounding (unlike conv)
            return o.cast_out(total.to(torch.float32).mul_(st).add_(zt).round_().clamp_(qmin, qmax))
        offset = zi * n
    else:  # reference QuantizedMeanOrSum: multiplier << k / N with k = min(floor(log2 N), 32, 31 + shift)
        m, sh = quantize_multiplier(np.float64(si) / np.float64(so))
        m, sh = int(m[0]), int(sh[0])
        k = min(n.bit_length() - 1, 32, 31 + sh)
        stage = _fixed_point_stage(o, np.array([(m << k) // n]), np.array([sh - k]), np.zeros(1, bool), zo,
                                   qmin, qmax, 255.0 * n)
        offset = zi * n

    def run(xs):
        total = xs[0].sum(dim=axes, keepdim=keep, dtype=sum_dtype)
        return stage(total.sub_(offset) if offset else total)

    return run


# ---------------------------------------------------------------------------------------------
# Data movement


def _concatenation(o: _Op) -> Kernel:
    q = o.qp(o.tout)
    for i in range(len(o.op.inputs)):
        if o.qp(o.tin(i)) != q:
            raise o.fail(f"input '{o.tin(i).name}' has other quantization than the output; TFLite requires "
                         "equal scales and zero points for int8 CONCATENATION")
    rank = len(o.tout.shape)
    axis = int(o.op.options.get("axis", 0)) % rank
    if axis == 0:
        raise o.fail("concatenation along the batch dimension cannot be emulated batch-free")
    lo, hi = _activation_range(o, o.op.fused_activation)
    clamp = (lo, hi) != o.qrange(o.tout)

    def run(xs):
        out = torch.cat([x.to(TORCH_DTYPES[o.tout.dtype]) for x in xs], dim=axis)
        return out.clamp_(lo, hi) if clamp else out

    return run


def _reshape(o: _Op) -> Kernel:
    shape = batched_shape(o.tout.shape)
    if o.tin(0).is_quantized and o.qp(o.tin(0)) != o.qp(o.tout):
        raise o.fail("input and output quantization differ; RESHAPE does not requantize")
    return lambda xs: xs[0].reshape(shape)


def _pad(o: _Op) -> Kernel:
    tin = o.tin(0)
    _, zo = o.qp(o.tout)
    if o.qp(tin) != o.qp(o.tout):
        raise o.fail("input and output quantization differ; PAD does not requantize")
    pads = np.asarray(o.tin(1).data if o.tin(1).data is not None else [], np.int64).reshape(-1, 2)
    if pads.shape[0] != len(tin.shape):
        raise o.fail(f"paddings tensor '{o.tin(1).name}' must be a constant of shape ({len(tin.shape)}, 2)")
    if pads[0].any():
        raise o.fail("padding the batch dimension cannot be emulated batch-free")
    value = zo
    if o.op.name == "PADV2" and o.has_input(2):
        value = int(o.const(o.tin(2)).reshape(-1)[0])
    flat = [int(v) for pair in pads[::-1] for v in pair]  # torch wants last dim first

    def run(xs):
        return F.pad(xs[0], flat, value=value)

    return run


# ---------------------------------------------------------------------------------------------
# Quantize / dequantize


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
        fn = _simd_split(body, mul_even, ddiv_away)
    else:
        raise EmulationError(f"unknown quantize rule {rule!r}")
    return lambda x: (fn(x.to(torch.float32)).to(torch.int64) + int(zero_point)).clamp(qmin, qmax)


def _quantize(o: _Op) -> Kernel:
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
    if rule == "xnnpack" and tin.dtype == tout.dtype:  # qs8/qu8 convert: 8 fractional bits (§5.3)
        mult = int(np.rint(np.float32(np.float32(256.0) * np.float32(si / so))))
        return _table_kernel(o, lambda x: ((((x - zi) * mult + 128) >> 8) + zo).clamp(qmin, qmax))
    m, sh = quantize_multiplier(np.float64(si) / np.float64(so))
    m, sh = int(m[0]), int(sh[0])
    gemmlowp = lambda x: (mbqm(x - zi, m, sh) + zo).clamp(qmin, qmax)  # noqa: E731
    if rule == "simd16_ruy_tail_gemmlowp":  # optimized x86: 16-lane blocks like ruy, scalar tail gemmlowp
        return _table_kernel(o, gemmlowp, lambda x: (mbqm_ruy(x - zi, m, sh) + zo).clamp(qmin, qmax))
    return _table_kernel(o, gemmlowp)  # reference, and XNNPACK's int8<->uint8 fallback


def _dequantize(o: _Op) -> Kernel:
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
    fn = _simd_split(_simd_body(tin, 8, o.device), lambda x: x.to(torch.float32) * st + offset,
                     lambda x: ((x.to(torch.float64) - zi) * s64).to(torch.float32))
    return lambda xs: fn(xs[0])


# ---------------------------------------------------------------------------------------------
# Fixed-range activations: LOGISTIC, TANH (tables) and SOFTMAX


def _lut_op(o: _Op, fn: str) -> Kernel:
    tin, tout = o.tin(0), o.tout
    (si, zi), (so, zo) = o.qp(tin), o.qp(tout)
    qmin, qmax = o.qrange(tin)
    codes = np.arange(qmin, qmax + 1)
    x = (np.float32(si) * (codes - zi).astype(np.float32)).astype(np.float32)
    one = np.float32(1)
    if o.rules["lut"] == "xnnpack":  # XNNPACK: the function in double (C exp/tanh), rounded to float32
        f64 = (lambda v: 1.0 / (1.0 + math.exp(-v))) if fn == "logistic" else math.tanh
        y = np.array([f64(float(v)) for v in x], np.float32)
    else:  # TFLite LUTPopulate: float32 arithmetic with C expf/tanhf
        y = (one / (one + expf(-x))).astype(np.float32) if fn == "logistic" else tanhf(x)
    r = (y * np.float32(one / so)).astype(np.float32)
    if o.rules["lut"] == "xnnpack":  # lrintf: half even
        q = np.rint(r).astype(np.int64) + zo
    else:  # TfLiteRound: half away from zero
        q = (np.sign(r) * np.floor(np.abs(r.astype(np.float64)) + 0.5)).astype(np.int64) + zo
    table = torch.as_tensor(np.clip(q, *o.qrange(tout)))
    return _table_kernel(o, lambda x: table[x - qmin])


def _softmax(o: _Op) -> Kernel:
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


# ---------------------------------------------------------------------------------------------

_BUILDERS: dict[str, Callable[[_Op], Kernel]] = {
    "CONV_2D": lambda o: _conv_like(o, depthwise=False),
    "DEPTHWISE_CONV_2D": lambda o: _conv_like(o, depthwise=True),
    "FULLY_CONNECTED": _fully_connected,
    "ADD": _add,
    "MUL": _mul,
    "AVERAGE_POOL_2D": lambda o: _pool(o, "avg"),
    "MAX_POOL_2D": lambda o: _pool(o, "max"),
    "MEAN": _mean,
    "CONCATENATION": _concatenation,
    "RESHAPE": _reshape,
    "PAD": _pad,
    "PADV2": _pad,
    "QUANTIZE": _quantize,
    "DEQUANTIZE": _dequantize,
    "LOGISTIC": lambda o: _lut_op(o, "logistic"),
    "TANH": lambda o: _lut_op(o, "tanh"),
    "SOFTMAX": _softmax,
}
SUPPORTED_OPS = frozenset(_BUILDERS)


def build(op: TFLiteOp, model: TFLiteModel, backend: str, device: torch.device, threads: int = 1) -> Kernel:
    """The kernel of one op on one backend; unsupported ops raise EmulationError naming the op."""
    if op.name not in _BUILDERS:
        raise EmulationError(
            f"op #{op.index} {op.name} (output tensor '{model.tensor(op.outputs[0]).name}') is not supported "
            f"by the integer emulator; supported ops: {', '.join(sorted(SUPPORTED_OPS))}")
    return _BUILDERS[op.name](_Op(op, model, backend, torch.device(device), threads))
