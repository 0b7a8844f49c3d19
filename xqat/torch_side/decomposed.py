"""Functions that `handlers.decompose` writes into a QAT graph: each one is exactly one int8 TFLite op.

Hard sigmoid, relu6(x + 3) / 6, has no TFLite op; it runs as ADD (constant 3, fused RELU6) then MUL (constant
1/6). Both outputs get fixed grids, [0, 6] and [0, 1] (`quantizers.FIXED_RANGES`): code k of the first is
k * 6/255, and times 1/6 it is exactly code k of the second, so the MUL never rounds (docs/numerics.md,
per-backend kernel rules).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["hardsigmoid_relu6", "hardsigmoid_scale"]


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
