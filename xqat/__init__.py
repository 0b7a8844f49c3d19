"""xqat: PyTorch quantization-aware training with TensorFlow's numerics, deployed as full-integer TFLite."""

from .torch_side.fake_quant import fake_quant, fake_quant_per_channel
from .torch_side.qparams import TFLiteQParams, nudge, tflite_qparams

__version__ = "0.1.0"

__all__ = ["fake_quant", "fake_quant_per_channel", "nudge", "tflite_qparams", "TFLiteQParams"]
