"""xqat: PyTorch quantization-aware training with TensorFlow's numerics, deployed as full-integer TFLite."""

from .checkpoint import load_qat, save_qat
from .edgetpu.check import EdgeTPUReport, check_edgetpu
from .errors import (
    EmulationError,
    ExportError,
    InputError,
    NotQATModelError,
    ParityError,
    QATConfigError,
    TFLiteFileError,
    UnsupportedLayerError,
    XQATError,
)
from .torch_side.config import QATConfig
from .torch_side.fake_quant import fake_quant, fake_quant_per_channel, use_fused_kernels
from .torch_side.prepare import freeze_bn, freeze_ranges, is_qat_model, prepare_qat, qat_config, quant_points
from .torch_side.qparams import TFLiteQParams, nudge, snap_range, tflite_qparams

__version__ = "0.1.0"

# Heavy stages (TensorFlow, onnx2tf, the interpreter) load on first use, so `import xqat` stays light.
_LAZY = {
    "export_tflite": ("xqat.export.api", "export_tflite"),
    "ExportReport": ("xqat.export.report", "ExportReport"),
    "snap_ranges": ("xqat.export.snapping", "snap_ranges"),
    "parity": ("xqat.verify.parity", "parity"),
    "ParityReport": ("xqat.verify.parity", "ParityReport"),
    "evaluate": ("xqat.verify.evaluate", "evaluate"),
    "EvaluationResult": ("xqat.verify.evaluate", "EvaluationResult"),
    "emulate": ("xqat.verify.emulate", "emulate"),
    "Emulator": ("xqat.verify.emulate", "Emulator"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'xqat' has no attribute {name!r}")


__all__ = [
    "fake_quant", "fake_quant_per_channel", "use_fused_kernels",
    "nudge", "tflite_qparams", "snap_range", "TFLiteQParams",
    "QATConfig", "prepare_qat", "freeze_ranges", "freeze_bn", "is_qat_model", "quant_points", "qat_config",
    "XQATError", "UnsupportedLayerError", "QATConfigError", "ExportError", "TFLiteFileError", "ParityError",
    "check_edgetpu", "EdgeTPUReport", "save_qat", "load_qat",
    "export_tflite", "ExportReport", "snap_ranges", "parity", "ParityReport", "evaluate", "EvaluationResult",
    "emulate", "Emulator", "EmulationError",
    "InputError", "NotQATModelError",
]
