"""xqat: PyTorch quantization-aware training with TensorFlow's numerics, deployed as full-integer TFLite."""

from .errors import (
    ExportError,
    ParityError,
    QATConfigError,
    TFLiteFileError,
    UnsupportedLayerError,
    XQATError,
)
from .torch_side.config import QATConfig
from .torch_side.fake_quant import fake_quant, fake_quant_per_channel
from .torch_side.prepare import freeze_bn, freeze_ranges, is_qat_model, prepare_qat, quant_points
from .torch_side.qparams import TFLiteQParams, nudge, snap_range, tflite_qparams
from .verify.edgetpu import EdgeTPUReport, check_edgetpu

__version__ = "0.1.0"

__all__ = [
    "fake_quant", "fake_quant_per_channel", "nudge", "tflite_qparams", "snap_range", "TFLiteQParams",
    "QATConfig", "prepare_qat", "freeze_ranges", "freeze_bn", "is_qat_model", "quant_points",
    "XQATError", "UnsupportedLayerError", "QATConfigError", "ExportError", "TFLiteFileError", "ParityError",
    "check_edgetpu", "EdgeTPUReport",
]
