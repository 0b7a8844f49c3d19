"""Baselines for comparison: the same float model as a float32 .tflite, or post-training quantized (PTQ)
by the TFLite converter with a representative dataset, through the same ONNX -> onnx2tf route (offline)."""

from __future__ import annotations

import io
import shutil
import tempfile
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from ..errors import ExportError
from .onnx2tf_adapter import onnx_to_keras
from .onnx_fold import fold_constants
from .qdq_plan import analyze_qdq
from .tflite_convert import _concrete_function, _trackable
from .torch_to_onnx import OPSET

__all__ = ["float_tflite"]


def float_tflite(model: nn.Module, example: torch.Tensor, representative: torch.Tensor | None = None) -> bytes:
    """Float .tflite of a float torch model (batch 1, NHWC); with `representative` (NCHW float samples), the
    converter's full-integer PTQ instead: int8 ops and I/O calibrated on those samples."""
    import tensorflow as tf

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (example[:1].float(),), buf, dynamo=False, opset_version=OPSET,
                          input_names=["input"])
    proto = fold_constants(onnx.load_from_string(buf.getvalue()))
    scratch = Path(tempfile.mkdtemp(prefix="xqat-float-"))
    try:
        graph = onnx_to_keras(proto, analyze_qdq(proto), scratch, 1)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([_concrete_function(graph.model, 1)],
                                                                _trackable(graph.model))
    if representative is not None:
        samples = representative.float()
        samples = samples.permute(0, 2, 3, 1) if samples.dim() == 4 else samples

        def dataset():
            for i in range(len(samples)):
                yield [samples[i:i + 1].numpy()]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = dataset
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    try:
        return bytes(converter.convert())
    except Exception as e:
        raise ExportError(f"the TFLite converter failed on the float baseline: {str(e)[:1000]}") from e
