"""TFLite's 8-bit quantized types: the I/O types an export may choose, their code ranges, and the shift
between uint8 and int8 zero points (the same grid, codes moved by 128)."""

from __future__ import annotations

__all__ = ["IO_DTYPES", "QRANGE", "TENSOR_TYPE_QRANGE", "UINT8_ZERO_POINT_SHIFT", "int8_zero_point"]

IO_DTYPES = ("int8", "uint8", "float32")  # model input/output types of a full-integer .tflite
QRANGE = {"int8": (-128, 127), "uint8": (0, 255)}  # code range of each 8-bit type
# the same ranges keyed by the flatbuffer's TensorType names (plus int16, TFLite's 16-bit activations)
TENSOR_TYPE_QRANGE = {"INT8": QRANGE["int8"], "UINT8": QRANGE["uint8"], "INT16": (-32768, 32767)}
UINT8_ZERO_POINT_SHIFT = 128  # int8 zero point = uint8 (unsigned code space) zero point - 128


def int8_zero_point(unsigned_zero_point: int) -> int:
    """The int8 zero point of a grid whose zero point is given in the unsigned code space [0, 255]."""
    return int(unsigned_zero_point) - UINT8_ZERO_POINT_SHIFT
