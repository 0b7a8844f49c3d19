"""xqat: PyTorch quantization-aware training with TensorFlow's numerics, deployed as full-integer TFLite."""

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

__version__ = "0.1.0"

# Everything but the errors loads on first use: `import xqat` (and the CLI's start, where Ctrl-C must end
# cleanly) costs no torch import; TensorFlow, onnx2tf and the interpreter load only when a stage needs them.
_LAZY = {
    "load_qat": ("xqat.checkpoint", "load_qat"),
    "save_qat": ("xqat.checkpoint", "save_qat"),
    "EdgeTPUReport": ("xqat.edgetpu.check", "EdgeTPUReport"),
    "check_edgetpu": ("xqat.edgetpu.check", "check_edgetpu"),
    "QATConfig": ("xqat.torch_side.config", "QATConfig"),
    "fake_quant": ("xqat.torch_side.fake_quant", "fake_quant"),
    "fake_quant_per_channel": ("xqat.torch_side.fake_quant", "fake_quant_per_channel"),
    "use_fused_kernels": ("xqat.torch_side.fake_quant", "use_fused_kernels"),
    "freeze_bn": ("xqat.torch_side.prepare", "freeze_bn"),
    "freeze_ranges": ("xqat.torch_side.prepare", "freeze_ranges"),
    "is_qat_model": ("xqat.torch_side.prepare", "is_qat_model"),
    "prepare_qat": ("xqat.verify.exact", "prepare_qat"),  # torch_side's, then QATConfig.numerics applied
    "set_numerics": ("xqat.verify.exact", "set_numerics"),
    "numerics": ("xqat.verify.exact", "numerics"),
    "qat_config": ("xqat.torch_side.prepare", "qat_config"),
    "quant_points": ("xqat.torch_side.prepare", "quant_points"),
    "TFLiteQParams": ("xqat.torch_side.qparams", "TFLiteQParams"),
    "nudge": ("xqat.torch_side.qparams", "nudge"),
    "snap_range": ("xqat.torch_side.qparams", "snap_range"),
    "tflite_qparams": ("xqat.torch_side.qparams", "tflite_qparams"),
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


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "fake_quant", "fake_quant_per_channel", "use_fused_kernels",
    "nudge", "tflite_qparams", "snap_range", "TFLiteQParams",
    "QATConfig", "prepare_qat", "set_numerics", "numerics",
    "freeze_ranges", "freeze_bn", "is_qat_model", "quant_points", "qat_config",
    "XQATError", "UnsupportedLayerError", "QATConfigError", "ExportError", "TFLiteFileError", "ParityError",
    "check_edgetpu", "EdgeTPUReport", "save_qat", "load_qat",
    "export_tflite", "ExportReport", "snap_ranges", "parity", "ParityReport", "evaluate", "EvaluationResult",
    "emulate", "Emulator", "EmulationError",
    "InputError", "NotQATModelError",
]
