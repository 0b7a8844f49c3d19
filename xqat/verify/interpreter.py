"""The TFLite interpreter (ai-edge-litert) on a named backend, and TFLite's float->int8 input rule per
backend. docs/numerics.md#backends: the default resolver applies XNNPACK; "builtin" is the optimized
kernels without delegates; "reference" the reference kernels."""

from __future__ import annotations

import numpy as np

from .backends import BACKENDS, check_backend

__all__ = ["BACKENDS", "make_interpreter", "quantize_input", "QUANTIZE_RULES"]

# How TFLite's own QUANTIZE op turns float32 into codes on each backend (docs/numerics.md#quantize, QUANTIZE f32->i8).
QUANTIZE_RULES = {
    "reference": "q = round_half_away_from_zero(float32(x / scale)) + zero_point, clamped (reference kernel)",
    "builtin": "q = round_half_to_even(float32(x * float32(1 / scale))) + zero_point in 8-lane blocks, the last "
               "numel % 8 elements round_half_away(double(x) / scale), clamped (optimized kernel)",
    "xnnpack": "q = round_half_to_even(float32(x * float32(1 / scale))) + zero_point, clamped (XNNPACK)",
}


def make_interpreter(model: bytes, backend: str = "xnnpack", preserve_all_tensors: bool = False,
                     num_threads: int = 1):
    """An allocated ai_edge_litert Interpreter on `backend`."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    check_backend(backend)
    resolver = {"xnnpack": OpResolverType.AUTO, "builtin": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
                "reference": OpResolverType.BUILTIN_REF}[backend]
    it = Interpreter(model_content=model, experimental_op_resolver_type=resolver,
                     experimental_preserve_all_tensors=preserve_all_tensors, num_threads=num_threads)
    it.allocate_tensors()
    return it


def quantize_input(x: np.ndarray, scale: float, zero_point: int, dtype, backend: str) -> np.ndarray:
    """Float32 -> integer codes exactly as TFLite's QUANTIZE op on `backend` (QUANTIZE_RULES): the emulator's
    kernel, so parity and emulation share one implementation. `x` is a batch along axis 0, one call per row."""
    import torch

    from .emulate.kernels import float_quantizer
    from .emulate.rules import rules_for

    x = np.asarray(x, np.float32)
    info = np.iinfo(dtype)
    per_call = int(np.prod(x.shape[1:])) if x.ndim > 1 else x.size
    fn = float_quantizer(rules_for(backend, "QUANTIZE")["quantize"], scale, zero_point, info.min, info.max, per_call)
    return fn(torch.from_numpy(x)).numpy().astype(dtype)
