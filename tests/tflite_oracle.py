"""The oracles every TFLite test shares: .tflite files converted from TF graphs by the real TFLite converter,
and the real interpreter (ai-edge-litert) on a named backend, with every op output kept when asked.

One converter helper (`tf_to_tflite`) and one interpreter wrapper (`interpreter`, `run_interpreter`) serve
the emulator, EdgeTPU, qparams and ONNX->TFLite tests, so that they all test against the same oracle."""

from __future__ import annotations

import warnings

import numpy as np
import torch

import xqat
from xqat.tflite.model import read_tflite
from xqat.verify.backends import BACKENDS
from xqat.verify.interpreter import make_interpreter

__all__ = ["BACKENDS", "tf_to_tflite", "interpreter", "run_interpreter", "converter_qparams", "FakeQuantBuilder",
           "pow2_range", "mismatches", "compare_all"]

QUANT_MODES = ("fakequant", "ptq", "float")
PTQ_SAMPLES = 4  # the default representative dataset: this many standard-normal samples, seed 0


# ---------------------------------------------------------------------------------------------
# The converter


def tf_to_tflite(tf, fn, quant: str = "fakequant", io: str | tuple[str | None, str | None] | None = "int8",
                 representative: list[list[np.ndarray]] | None = None, int8_ops_only: bool | None = None,
                 per_tensor_dense: bool = False, select_tf_ops: bool = False) -> bytes:
    """A .tflite from a tf.function (or a Keras model) by the real TFLiteConverter.

    quant: "fakequant" a FakeQuant graph converted without data (xqat's own route); "ptq" a float graph
    calibrated on `representative` (a list of input lists; by default PTQ_SAMPLES standard-normal samples);
    "float" no quantization (and float I/O). io: dtype name of the inputs and outputs, or an (inputs, outputs)
    pair; None keeps the converter's default (float). int8_ops_only (default: with "ptq") restricts the ops to
    TFLITE_BUILTINS_INT8. per_tensor_dense quantizes FULLY_CONNECTED weights per tensor; select_tf_ops allows
    Flex ops."""
    if quant not in QUANT_MODES:
        raise ValueError(f"quant must be one of {QUANT_MODES}; got {quant!r}")
    if hasattr(fn, "get_concrete_function"):
        conv = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], fn)
    else:
        conv = tf.lite.TFLiteConverter.from_keras_model(fn)
    if quant != "float":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
    if quant == "ptq":
        if representative is None:
            representative = _random_samples(fn)
        conv.representative_dataset = lambda: iter(representative)
    if int8_ops_only is None:
        int8_ops_only = quant == "ptq"
    if int8_ops_only:
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    if quant == "float":
        io = None
    io_in, io_out = io if isinstance(io, tuple) else (io, io)
    if io_in is not None:
        conv.inference_input_type = getattr(tf, io_in)
    if io_out is not None:
        conv.inference_output_type = getattr(tf, io_out)
    if per_tensor_dense:
        conv._experimental_disable_per_channel_quantization_for_dense_layers = True
    if select_tf_ops:
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS, tf.lite.OpsSet.SELECT_TF_OPS]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bytes(conv.convert())


def _random_samples(fn) -> list[list[np.ndarray]]:
    """PTQ_SAMPLES standard-normal input lists for `fn`'s input signature (None dimensions -> 1)."""
    shapes = [[1 if d is None else d for d in s.shape] for s in fn.input_signature]
    rng = np.random.default_rng(0)
    return [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(PTQ_SAMPLES)]


def converter_qparams(tf, ranges, num_bits: int = 8, narrow_range: bool = False) -> list[tuple[float, int]]:
    """(scale, int8 zero point) the real TFLite converter stores for FakeQuant(min, max) of each range."""

    @tf.function(input_signature=[tf.TensorSpec([1, 4], tf.float32)])
    def graph(t):
        return {f"r{i:03d}": tf.quantization.fake_quant_with_min_max_vars(
            t, float(a), float(b), num_bits=num_bits, narrow_range=narrow_range, name=f"r{i:03d}")
            for i, (a, b) in enumerate(ranges)}

    model = tf_to_tflite(tf, graph, io=(None, "int8"))
    outs = {d["name"].split(";")[0]: d["quantization"] for d in interpreter(model).get_output_details()}
    return [outs[f"r{i:03d}"] for i in range(len(ranges))]


# ---------------------------------------------------------------------------------------------
# The interpreter


def interpreter(model: bytes, backend: str = "xnnpack", preserve: bool = False, num_threads: int | None = None):
    """xqat's own interpreter on `backend`, allocated; num_threads None is the interpreter's default."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make_interpreter(model, backend, preserve_all_tensors=preserve, num_threads=num_threads)


def run_interpreter(model: bytes, backend: str, inputs: list[np.ndarray], preserve: bool = True,
                    num_threads: int | None = None) -> dict[int, np.ndarray]:
    """{tensor index: stacked values over the batch} for every op output (model outputs only if not
    preserve), one sample at a time. With preserve, the XNNPACK delegate runs each node as its own partition."""
    m = read_tflite(model)
    it = interpreter(model, backend, preserve, num_threads)
    wanted = [t for op in m.ops for t in op.outputs] if preserve else list(m.outputs)
    out = {t: [] for t in wanted}
    for n in range(inputs[0].shape[0]):
        for idx, x in zip(m.inputs, inputs):
            it.set_tensor(idx, x[n:n + 1])
        it.invoke()
        for t in wanted:
            out[t].append(it.get_tensor(t).copy())
    return {t: np.concatenate(v) for t, v in out.items()}


# ---------------------------------------------------------------------------------------------
# The emulator against the interpreter


def mismatches(got: torch.Tensor, want: np.ndarray) -> int:
    """Elements that differ; float32 tensors are compared bit for bit."""
    got = got.cpu().numpy().reshape(want.shape)
    if got.dtype == np.float32:
        return int((got.view(np.int32) != want.view(np.int32)).sum())
    return int((got.astype(np.int64) != want.astype(np.int64)).sum())


def compare_all(model: bytes, inputs: list[np.ndarray], backend: str) -> tuple[int, int]:
    """(mismatched elements, compared elements) of xqat.emulate over every op output of every sample."""
    m = read_tflite(model)
    want = run_interpreter(model, backend, inputs)
    _, got = xqat.emulate(model, [torch.as_tensor(x) for x in inputs], backend=backend, intermediates=True)
    bad = total = 0
    for op in m.ops:
        t = op.outputs[0]
        bad += mismatches(got[t], want[t])
        total += want[t].size
    return bad, total


# ---------------------------------------------------------------------------------------------
# FakeQuant graphs in TF


def pow2_range(zp_unsigned: int, k: int) -> tuple[float, float]:
    """FakeQuant range with scale exactly 2^-k and the given (uint8) zero point."""
    s = 2.0 ** -k
    return -zp_unsigned * s, (255 - zp_unsigned) * s


class FakeQuantBuilder:
    """FakeQuant ops of the real TF on activations and weights, and `tf_to_tflite` on the result."""

    def __init__(self, tf):
        self.tf = tf

    def fq(self, x, r, narrow=False):
        return self.tf.quantization.fake_quant_with_min_max_vars(x, r[0], r[1], narrow_range=narrow)

    def wfq(self, w, per_channel=True):
        tf = self.tf
        if per_channel:
            m = np.abs(w).reshape(-1, w.shape[-1]).max(0).astype(np.float32)
            return tf.quantization.fake_quant_with_min_max_vars_per_channel(w, -m, m, narrow_range=True)
        m = float(np.abs(w).max())
        return self.fq(w, (-m, m), narrow=True)

    def convert(self, fn, io: str | None = "int8", representative=None) -> bytes:
        """int8 TFLite from a tf.function; fake-quant graphs need no data, float graphs calibrate on
        `representative` (a list of input lists, as the converter's representative dataset)."""
        quant = "fakequant" if representative is None else "ptq"
        return tf_to_tflite(self.tf, fn, quant, io, representative=representative)

    def spec(self, *shapes):
        return [self.tf.TensorSpec(s, self.tf.float32) for s in shapes]
