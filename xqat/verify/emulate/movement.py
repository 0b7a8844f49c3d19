"""Data movement: ops that copy codes without requantizing (CONCATENATION, RESHAPE, PAD)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .base import TORCH_DTYPES, Kernel, Op, batched_shape
from .requant import activation_range

__all__ = ["concatenation", "reshape", "pad"]


def concatenation(o: Op) -> Kernel:
    q = o.qp(o.tout)
    for i in range(len(o.op.inputs)):
        if o.qp(o.tin(i)) != q:
            raise o.fail(f"input '{o.tin(i).name}' has other quantization than the output; TFLite requires "
                         "equal scales and zero points for int8 CONCATENATION")
    rank = len(o.tout.shape)
    axis = int(o.op.options.get("axis", 0)) % rank
    if axis == 0:
        raise o.fail("concatenation along the batch dimension cannot be emulated batch-free")
    lo, hi = activation_range(o, o.op.fused_activation)
    clamp = (lo, hi) != o.qrange(o.tout)

    def run(xs):
        out = torch.cat([x.to(TORCH_DTYPES[o.tout.dtype]) for x in xs], dim=axis)
        return out.clamp_(lo, hi) if clamp else out

    return run


def reshape(o: Op) -> Kernel:
    shape = batched_shape(o.tout.shape)
    if o.tin(0).is_quantized and o.qp(o.tin(0)) != o.qp(o.tout):
        raise o.fail("input and output quantization differ; RESHAPE does not requantize")
    return lambda xs: xs[0].reshape(shape)


def pad(o: Op) -> Kernel:
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
