"""What every kernel builder shares: the op with its tensors and backend rules (`Op`), dtypes, and
elementwise ops of 8-bit inputs as lookup tables over every input code (`table_kernel`), built once from
the exact integer formula; SIMD-block vs scalar-tail masks of the optimized x86 kernels."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from ...errors import EmulationError
from ...tflite.model import TFLiteModel, TFLiteOp, TFLiteTensor
from ...tflite.qtypes import TENSOR_TYPE_QRANGE
from .rules import rules_for

__all__ = ["Kernel", "Op", "QRANGE", "TORCH_DTYPES", "batched_shape", "same_padding", "simd_body", "simd_split",
           "table_kernel", "wrap_int16"]

Kernel = Callable[[Sequence[torch.Tensor]], torch.Tensor]

TORCH_DTYPES = {
    "INT8": torch.int8, "UINT8": torch.uint8, "INT16": torch.int16, "INT32": torch.int32,
    "INT64": torch.int64, "FLOAT32": torch.float32,
}
QRANGE = TENSOR_TYPE_QRANGE


class Op:
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
        if t.dtype not in QRANGE:
            raise self.fail(f"tensor '{t.name}' is {t.dtype}; only int8/uint8 activations are emulated")
        if t.scales.size != 1 or t.zero_points.size != 1:
            raise self.fail(f"tensor '{t.name}' has {t.scales.size} scales; activations must be per-tensor")
        return np.float32(t.scales[0]), int(t.zero_points[0])

    def qrange(self, t: TFLiteTensor) -> tuple[int, int]:
        return QRANGE[t.dtype]

    def const(self, t: TFLiteTensor, dtype=torch.int64) -> torch.Tensor:
        if t.data is None:
            raise self.fail(f"input '{t.name}' must be a constant tensor in the file")
        return torch.as_tensor(np.array(t.data)).to(device=self.device, dtype=dtype)

    def cast_out(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(TORCH_DTYPES[self.tout.dtype])


def simd_body(t: TFLiteTensor, block: int, device: torch.device) -> torch.Tensor:
    """Mask over the flat elements of one interpreter call: True where a SIMD block of `block` elements
    covers it, False in the scalar tail (the last numel % block elements)."""
    n = int(np.prod(t.shape))
    return torch.arange(n, device=device) < block * (n // block)


def wrap_int16(x: torch.Tensor) -> torch.Tensor:
    """Two's-complement wrap to int16 (what 16-bit SIMD packing does to out-of-range results)."""
    return ((x + (1 << 15)) & 0xFFFF) - (1 << 15)


def simd_split(body_mask: torch.Tensor, body: Callable, tail: Callable) -> Callable:
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
    """8-bit codes -> their bit patterns 0..255 as int32 (the index into a `table_kernel` table)."""
    return (x.view(torch.uint8) if x.dtype == torch.int8 else x).to(torch.int32)


def table_kernel(o: Op, tail: Callable[..., torch.Tensor], body: Callable[..., torch.Tensor] | None = None,
                  block: int = 16, body_mask: torch.Tensor | None = None) -> Kernel:
    """An elementwise op of one or two 8-bit inputs as a lookup table over every input code (256 or 65536
    entries), built once from the exact integer formula; each element is then one gather.

    `tail(*codes)` maps int64 input codes to output codes; with `body`, the SIMD blocks of `block`
    elements of each call use `body` and the last numel % block elements `tail` (optimized x86 kernels),
    or, given `body_mask` (flat over the output of one call), `body` where it is True."""
    ins = [o.tin(i) for i in range(len(o.op.inputs))]
    mask = None
    if body is not None:
        mask = simd_body(o.tout, block, torch.device("cpu")) if body_mask is None else body_mask.cpu()
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


def _xnnpack_accepts(o: Op) -> bool:
    """The XNNPACK delegate's scale checks for quantized nodes (ratios outside them stay builtin)."""
    name = o.op.name
    quantized = [o.tin(i) for i in range(len(o.op.inputs)) if o.has_input(i)] + [o.tout]
    float_io = any(t.dtype not in QRANGE for t in quantized if t.data is None)
    if float_io and name not in ("QUANTIZE", "DEQUANTIZE"):
        return False
    so = np.float32(o.tout.scales[0]) if o.tout.scales.size else None
    if name in ("ADD", "SUB"):
        return all(2.0 ** -10 <= np.float32(o.tin(i).scales[0] / so) < 256.0 for i in (0, 1))
    if name == "BATCH_MATMUL":  # the second operand must be symmetric (zero point 0), like a weight matrix
        return int(o.tin(1).zero_points[0]) == 0
    if name == "LEAKY_RELU":
        pos = np.float32(o.tin(0).scales[0] / so)
        neg = np.float32(pos * np.float32(o.op.options.get("alpha", 0.2)))
        return 2.0 ** -8 <= pos <= 128.0 and -127.99609375 <= neg <= 128.0 and abs(neg) >= 2.0 ** -8
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

def same_padding(size: int, k: int, stride: int, dilation: int, padding: str) -> tuple[int, int, int]:
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
