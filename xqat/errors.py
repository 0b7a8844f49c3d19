"""Typed errors. Each says what is wrong, where (layer, tensor or file) and what to do; the CLI prints
the message of any XQATError without a traceback."""

from __future__ import annotations

__all__ = [
    "XQATError",
    "UnsupportedLayerError",
    "NotQATModelError",
    "QATConfigError",
    "ExportError",
    "OnnxToTfVersionError",
    "TFLiteFileError",
    "ParityError",
    "EmulationError",
    "InputError",
]


class XQATError(Exception):
    """Base class of every error xqat raises on purpose (bad input, unsupported model...)."""


class UnsupportedLayerError(XQATError):
    """prepare_qat met a node it cannot capture or quantize; the message names node, op and module path."""


class NotQATModelError(XQATError, TypeError):
    """A function that needs a `prepare_qat` model (export, parity, checkpoints, point lists) got another model."""


class QATConfigError(XQATError, ValueError):
    """A QATConfig value is invalid."""


class ExportError(XQATError):
    """The export chain (ONNX -> onnx2tf -> TF -> TFLite) cannot proceed; the message names the layer."""


class OnnxToTfVersionError(ExportError):
    """onnx2tf's internals differ from what xqat's conversion handlers were written for."""


class TFLiteFileError(XQATError):
    """A .tflite file is missing, corrupt, or does not fit the model it is compared with."""


class ParityError(XQATError):
    """Torch model and TFLite model cannot be compared (shapes, tensor counts, mapping)."""


class EmulationError(XQATError):
    """The integer emulator cannot run a model (unsupported op or quantization) or got unfit inputs."""


class InputError(XQATError, ValueError):
    """Inputs do not fit a QAT model (rank, channels/features, dtype); the message names the input and its needs."""
