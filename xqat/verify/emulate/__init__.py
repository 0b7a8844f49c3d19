"""Bit-exact integer emulation of the TFLite int8 kernels in torch, batched, per backend.

`emulate(model, inputs)` runs a .tflite file on a batch of integer inputs and returns what the
TFLite interpreter returns for each sample, bit for bit, on the chosen backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ...errors import EmulationError
from ...tflite.model import TFLiteModel
from .graph import Emulator, TensorLike
from .kernels import SUPPORTED_OPS
from .rules import BACKENDS, REFERENCE_LACKS, RULES, XNNPACK_OPS

__all__ = ["emulate", "Emulator", "BACKENDS", "RULES", "SUPPORTED_OPS", "XNNPACK_OPS", "REFERENCE_LACKS"]


def emulate(model: str | Path | bytes | TFLiteModel | Emulator, inputs: TensorLike | Sequence[TensorLike],
            backend: str | None = None, device: str | torch.device | None = None,
            intermediates: bool = False, num_threads: int | None = None):
    """Run a .tflite model (path, bytes, parsed model or `Emulator`) on integer inputs batched along dim 0.

    backend: "xnnpack" (default: what `Interpreter()` runs), "builtin" or "reference"; num_threads: the
    interpreter's (default 1). Returns the list of output tensors; with intermediates=True, (outputs,
    {tflite tensor index: tensor}). An `Emulator` keeps its own settings; asking for others is an error.
    """
    if isinstance(model, Emulator):
        if backend is not None and backend != model.backend:
            raise EmulationError(f"the Emulator was built for backend {model.backend!r}, not {backend!r}; "
                                 "build another Emulator for that backend")
        if device is not None and torch.device(device) != model.device:
            raise EmulationError(f"the Emulator lives on {model.device}, not {device}; build another one")
        if num_threads is not None and num_threads != model.num_threads:
            raise EmulationError(f"the Emulator was built for num_threads={model.num_threads}, not {num_threads}; "
                                 "build another Emulator")
        emu = model
    else:
        emu = Emulator(model, backend or "xnnpack", device or "cpu", num_threads=num_threads or 1)
    return emu.run(inputs, intermediates=intermediates)
