"""The model's inputs and outputs on both sides: torch inputs checked against the mapping, each interpreter
input/output matched to its mapping point by TFLite tensor index, and torch (NCHW / NCT) vs TFLite
(NHWC / NTC) layouts. Shared by parity, teacher-forced parity and evaluate.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..errors import InputError, ParityError, TFLiteFileError
from ..tflite.mapping import TFLiteMapping
from ..tflite.model import TFLiteModel

__all__ = ["as_input_list", "io_tensor", "read_model_bytes", "to_tflite_layout", "to_torch_layout"]

_IO_CASTS = ("QUANTIZE", "DEQUANTIZE")  # float/uint8 I/O: one cast between the I/O tensor and the point tensor


def as_input_list(inputs, mapping: TFLiteMapping, where: str) -> list[torch.Tensor]:
    """`inputs` (one tensor, or a tuple/list with one tensor per model input, batch along dim 0) as a list of
    float tensors checked against the input shapes stored at export (batch may differ)."""
    if isinstance(inputs, (tuple, list)) and inputs and all(isinstance(t, (torch.Tensor, np.ndarray))
                                                            for t in inputs):
        xs = [torch.as_tensor(np.asarray(t)) if isinstance(t, np.ndarray) else t for t in inputs]
    else:
        xs = [inputs if isinstance(inputs, torch.Tensor) else torch.as_tensor(np.asarray(inputs))]
    xs = [x.detach().float().cpu() for x in xs]
    shapes = mapping.input_shapes
    if len(xs) != len(shapes):
        raise InputError(f"{where} has {len(shapes)} inputs ({', '.join(mapping.input_points)}); got {len(xs)} "
                         "tensors: pass a tuple with one batch per input, in the model's input order")
    for k, (x, expected) in enumerate(zip(xs, shapes)):
        if x.dim() != len(expected) or tuple(x.shape[1:]) != tuple(expected[1:]):
            raise ParityError(f"inputs of shape {tuple(x.shape)} do not fit {where} input {k} "
                              f"('{mapping.input_points[k]}'), exported for {list(expected)} (batch may differ)")
    if len({len(x) for x in xs}) > 1:
        raise InputError(f"the input batches have different sizes {[len(x) for x in xs]}; give every input "
                         "the same number of samples")
    return xs


def io_tensor(tfl: TFLiteModel, point_tensor: int, io: Sequence[int], where: str) -> int:
    """The model input (or output) tensor among `io` that carries the point stored at `point_tensor`: the tensor
    itself (int8 I/O) or the one a single QUANTIZE/DEQUANTIZE connects to it (float or uint8 I/O)."""
    if point_tensor in io:
        return point_tensor
    for op in tfl.ops:
        if op.name in _IO_CASTS and ((op.inputs[0] in io and op.outputs[0] == point_tensor)
                                     or (op.inputs[0] == point_tensor and op.outputs[0] in io)):
            return op.outputs[0] if op.outputs[0] in io else op.inputs[0]
    raise ParityError(f"{where}: no model input/output carries the mapped tensor {point_tensor} "
                      f"('{tfl.tensor(point_tensor).name}'); re-export the model with xqat")


def _squeezed(shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(d) for d in shape if d != 1)


def to_tflite_layout(a: np.ndarray, tfl_shape: Sequence[int], sequence_layout: bool = False) -> np.ndarray:
    """A torch-layout batch in the layout of a TFLite tensor of shape `tfl_shape` (batch may differ): channels
    last ((N, C, H, W) -> NHWC, (N, C, T) -> (N, T, C), as onnx2tf converts convolutions) whenever that fits the
    TFLite shape up to unit dimensions (so equal C and T count as channels-last); otherwise torch's element
    order, reshaped to the TFLite shape when only the element count agrees. 2-D and 1-D tensors are unchanged,
    and 3-D ones too in a model exported in the sequence layout (`TFLiteMapping.sequence_layout`)."""
    want = tuple(int(d) for d in tfl_shape[1:])
    if a.ndim == 4 or (a.ndim == 3 and not sequence_layout):
        last = np.moveaxis(a, 1, -1)
        if _squeezed(last.shape[1:]) == _squeezed(want):
            a = last
    if a.shape[1:] != want and int(np.prod(a.shape[1:])) == int(np.prod(want)):
        a = a.reshape(len(a), *want)
    return np.ascontiguousarray(a)


def to_torch_layout(a: np.ndarray, torch_shape: Sequence[int], sequence_layout: bool = False) -> np.ndarray:
    """The inverse of `to_tflite_layout`: a TFLite-layout batch in the layout of a torch tensor `torch_shape`."""
    torch_shape = tuple(int(d) for d in torch_shape)
    if len(torch_shape) == 4 or (len(torch_shape) == 3 and not sequence_layout):
        last = (torch_shape[0], *torch_shape[2:], torch_shape[1])  # the channels-last form of torch_shape
        if _squeezed(a.shape[1:]) == _squeezed(last[1:]):
            a = np.moveaxis(a.reshape(last), -1, 1)
    if a.shape != torch_shape and a.size == int(np.prod(torch_shape)):
        a = a.reshape(torch_shape)
    return np.ascontiguousarray(a)


def read_model_bytes(path) -> bytes:
    """The bytes of a .tflite file; TFLiteFileError naming it if it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TFLiteFileError(f"cannot read {path}: {e.strerror}") from e
