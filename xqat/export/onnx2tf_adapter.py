"""ONNX Q/DQ -> TF FakeQuant graph through onnx2tf, with xqat's own handlers.

The only module that knows onnx2tf's internals. Stock onnx2tf drops every QuantizeLinear->DequantizeLinear
pair; for one conversion at a time we replace its handlers:

* activation Q->DQ -> ``fake_quant_with_min_max_vars(x, min, max, 8, narrow_range=False)`` with the
  ``ActivationQ`` range (see qdq_plan.py), so TF's nudge and the TFLite converter reproduce the ONNX grid;
* Conv / Gemm weight Q->DQ -> per-channel (Conv) or per-tensor (Gemm) narrow-range FakeQuant applied
  to the kernel *after* onnx2tf moved it to TF layout, kept as an op in the graph.

The plan comes from ``qdq_plan.analyze_qdq`` (pure ONNX); this module only installs handlers and checks
the onnx2tf version.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..errors import ExportError, OnnxToTfVersionError
from ..tflite.qtypes import QRANGE
from .onnx_layout import NCHW_VIEW, NHWC_VIEW
from .qdq_plan import QDQPlan

__all__ = [
    "ONNX2TF_VERSION",
    "ActivationRecord",
    "KerasGraph",
    "check_onnx2tf",
    "installed_handlers",
    "onnx_to_keras",
]

ONNX2TF_VERSION = "1.28.8"  # the handlers below are written against this release's internals

_KERNEL_OPS = ("Conv", "ConvTranspose")  # onnx2tf handlers that fetch their kernel via get_weights_constant_or_variable
_LOCK = threading.Lock()  # handlers are module globals of onnx2tf: one conversion at a time
_CONVERT_ARGS = ("input_onnx_file_path", "output_folder_path", "not_use_onnxsim", "batch_size",
                 "param_replacement_file", "disable_model_save", "verbosity", "keep_shape_absolutely_input_names")


def _import_onnx2tf():
    """Import onnx2tf without letting its import-time side effects (env vars, global RNG seeds) leak."""
    env = {k: os.environ.get(k) for k in ("TF_USE_LEGACY_KERAS", "CUDA_VISIBLE_DEVICES")}
    rng_py, rng_np = random.getstate(), np.random.get_state()
    try:
        import onnx2tf
        import onnx2tf.onnx2tf as impl
        import onnx2tf.ops.Conv as conv
        import onnx2tf.ops.ConvTranspose as conv_t
        import onnx2tf.ops.DequantizeLinear as dq
        import onnx2tf.ops.Gemm as gemm
        import onnx2tf.ops.MaxPool as max_pool
        import onnx2tf.ops.QuantizeLinear as q
        import onnx2tf.ops.Transpose as transpose
    except ImportError as e:
        raise OnnxToTfVersionError(f"cannot import onnx2tf ({e}); install onnx2tf=={ONNX2TF_VERSION} "
                                   "(pinned in pyproject.toml)") from e
    finally:
        _restore_env(env)
        random.setstate(rng_py)
        np.random.set_state(rng_np)
    return onnx2tf, impl, {"QuantizeLinear": q, "DequantizeLinear": dq, "Conv": conv, "ConvTranspose": conv_t,
                           "Gemm": gemm, "MaxPool": max_pool, "Transpose": transpose}


def _restore_env(env: dict[str, str | None]) -> None:
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def check_onnx2tf() -> str:
    """Fail with OnnxToTfVersionError unless onnx2tf is the release the handlers were written for and
    still has every internal they replace. Returns the version."""
    onnx2tf, impl, ops = _import_onnx2tf()
    version = getattr(onnx2tf, "__version__", "unknown")
    if version != ONNX2TF_VERSION:
        raise OnnxToTfVersionError(
            f"onnx2tf {version} is installed, but xqat's Q/DQ handlers are written for onnx2tf "
            f"{ONNX2TF_VERSION}'s internals; install onnx2tf=={ONNX2TF_VERSION} (pinned in pyproject.toml)")
    missing = [f"onnx2tf.ops.{k}.make_node" for k, m in ops.items() if not callable(getattr(m, "make_node", None))]
    for k in _KERNEL_OPS:
        if not callable(getattr(ops[k], "get_weights_constant_or_variable", None)):
            missing.append(f"onnx2tf.ops.{k}.get_weights_constant_or_variable")
    if not callable(getattr(impl, "download_test_image_data", None)):
        missing.append("onnx2tf.onnx2tf.download_test_image_data")
    params = inspect.signature(impl.convert).parameters
    missing += [f"onnx2tf.convert({a}=...)" for a in _CONVERT_ARGS if a not in params]
    try:
        from tf_keras.src import backend as kb

        if not (hasattr(kb, "PER_GRAPH_OBJECT_NAME_UIDS") and hasattr(kb, "OBSERVED_NAMES")):
            missing.append("tf_keras.src.backend.PER_GRAPH_OBJECT_NAME_UIDS/OBSERVED_NAMES")
    except ImportError:
        missing.append("tf_keras.src.backend")
    if missing:
        raise OnnxToTfVersionError(f"onnx2tf {version}: internals that xqat's handlers replace are missing: "
                                   f"{', '.join(missing)}; reinstall onnx2tf=={ONNX2TF_VERSION}")
    return version


@functools.cache
def _layer_classes():
    """Keras layers that emit the FakeQuant ops (built lazily: importing xqat must not import TF)."""
    import tensorflow as tf
    import tf_keras

    class FakeQuantActivation(tf_keras.layers.Layer):
        """FakeQuantWithMinMaxVars(x, min, max, 8 bits, narrow_range=False): one activation Q->DQ."""

        def __init__(self, fq_min: float, fq_max: float, **kw):
            super().__init__(**kw)
            self.fq_min, self.fq_max = float(fq_min), float(fq_max)

        def call(self, x):
            return tf.quantization.fake_quant_with_min_max_vars(
                x, min=self.fq_min, max=self.fq_max, num_bits=8, narrow_range=False)

    class FakeQuantConstant(tf_keras.layers.Layer):
        """FakeQuant of a constant kernel, emitted inside the traced graph so the converter takes the
        weight scales from min/max; an eager call would fold at once and the converter would re-derive
        max|w|/127 scales (docs/numerics.md#onnx2tf-handlers). The input only anchors the layer in the model."""

        def __init__(self, values: np.ndarray, fq_min: np.ndarray, fq_max: np.ndarray, per_channel: bool, **kw):
            super().__init__(**kw)
            self.values = np.ascontiguousarray(values, np.float32)
            self.fq_min, self.fq_max = np.asarray(fq_min, np.float32), np.asarray(fq_max, np.float32)
            self.per_channel = per_channel

        def call(self, anchor):
            w = tf.constant(self.values)
            if self.per_channel:  # channel is the last axis of the kernel
                return tf.quantization.fake_quant_with_min_max_vars_per_channel(
                    w, min=tf.constant(self.fq_min), max=tf.constant(self.fq_max), num_bits=8, narrow_range=True)
            return tf.quantization.fake_quant_with_min_max_vars(
                w, min=float(self.fq_min[0]), max=float(self.fq_max[0]), num_bits=8, narrow_range=True)

    return FakeQuantActivation, FakeQuantConstant


@dataclass(frozen=True)
class ActivationRecord:
    """Where the FakeQuant of one activation sits in the Keras model (for the TFLite tensor map)."""

    fq_layer: str  # our FakeQuant layer's name
    producers: tuple[str, ...]  # the layer whose output it reads, then that layer's single-input ancestors
    shape: tuple[int | None, ...]  # static shape of the quantized tensor in the TF graph (NHWC)


def _producer_chain(x, depth: int = 4) -> tuple[str, ...]:
    """Layer that made KerasTensor `x`, then up through single-input layers (for ops the converter drops)."""
    chain: list[str] = []
    while depth > 0 and getattr(x, "_keras_history", None) is not None:
        layer, node_index, _ = x._keras_history
        chain.append(layer.name)
        nodes = getattr(layer, "_inbound_nodes", [])
        ins = list(getattr(nodes[node_index], "keras_inputs", [])) if node_index < len(nodes) else []
        if len(ins) != 1:
            break
        x, depth = ins[0], depth - 1
    return tuple(chain)


class _Handlers:
    """xqat's replacements for onnx2tf's QuantizeLinear, DequantizeLinear, Conv and Gemm handlers."""

    def __init__(self, plan: QDQPlan, originals: dict[str, Any], version: str):
        self.plan = plan
        self.version = version
        self.orig = originals
        self.act_by_sanitized = _sanitized_index(plan.activations)
        self.w_by_sanitized = _sanitized_index(plan.weights)
        self.q_by_sanitized = {_sanitize(k): v for k, v in plan.q_outputs.items()}
        self.activation_records: dict[str, ActivationRecord] = {}
        self.kernel_layers: dict[str, str] = {}  # weight FakeQuant layer -> the layer naming its kernel instead
        self.weights_done: set[str] = set()
        self._conv = None  # (WeightQ, anchor) while onnx2tf's Conv handler runs
        self.plain: set[str] = set()  # inputs kept in torch's (N, T, F) layout, see `_keep_plain`

    # QuantizeLinear: activations become a float pass-through (the FakeQuant goes on the DQ output)
    def quantize_linear(self, *, graph_node, tf_layers_dict, **kw):
        self.orig["QuantizeLinear"](graph_node=graph_node, tf_layers_dict=tf_layers_dict, **kw)
        self._keep_plain(graph_node, tf_layers_dict)
        out = graph_node.outputs[0].name
        if out in self.q_by_sanitized:
            tf_layers_dict[out]["tf_node"] = tf_layers_dict[graph_node.inputs[0].name]["tf_node"]

    def _keep_plain(self, graph_node, tf_layers_dict) -> None:
        """In a model kept in torch's (N, T, F) layout (sequence inputs, no Conv1d), a Q/DQ whose TF tensor has the
        ONNX shape is in ONNX layout: onnx2tf judges a tensor whose dims after the batch are all equal (a square
        (1, 8, 8) sequence) as transposed anyway, and would TRANSPOSE it back before a reshape."""
        out = graph_node.outputs[0]
        tf_node = tf_layers_dict[out.name].get("tf_node")
        if self.plain and out.shape is not None and tf_node is not None and \
                list(tf_node.shape)[1:] == list(out.shape)[1:]:
            tf_layers_dict[out.name]["before_op_output_shape_trans"] = False

    def dequantize_linear(self, *, graph_node, tf_layers_dict, **kw):
        self.orig["DequantizeLinear"](graph_node=graph_node, tf_layers_dict=tf_layers_dict, **kw)
        self._keep_plain(graph_node, tf_layers_dict)
        act = self.act_by_sanitized.get(graph_node.outputs[0].name)
        if act is None:
            return  # a weight: the Conv / Gemm handler puts its FakeQuant right in front of the kernel
        x = tf_layers_dict[graph_node.inputs[0].name]["tf_node"]  # Q's float input (pass-through above)
        history = getattr(x, "_keras_history", None)
        if history is None:
            raise ExportError(f"activation '{act.source}' (quantized as '{act.name}') is a constant in the "
                              "TF graph; quantized constants are only supported as Conv/Gemm weights")
        fq_act, _ = _layer_classes()
        y = fq_act(act.fq_min, act.fq_max, name=act.layer)(x)
        tf_layers_dict[graph_node.outputs[0].name]["tf_node"] = y
        self.activation_records[act.name] = ActivationRecord(act.layer, _producer_chain(x), tuple(y.shape))

    def conv(self, *, graph_node, tf_layers_dict, **kw):
        self._kernel_op("Conv", graph_node, tf_layers_dict, kw)

    def conv_transpose(self, *, graph_node, tf_layers_dict, **kw):
        self._kernel_op("ConvTranspose", graph_node, tf_layers_dict, kw)

    def _kernel_op(self, op: str, graph_node, tf_layers_dict, kw) -> None:
        """onnx2tf's Conv / ConvTranspose handler, with our FakeQuant kernel handed to it by `get_weights`."""
        w = self.w_by_sanitized.get(graph_node.inputs[1].name)
        if w is None:
            if self.plan.is_float:  # a float model (baselines): onnx2tf's own handler
                return self.orig[op](graph_node=graph_node, tf_layers_dict=tf_layers_dict, **kw)
            raise ExportError(f"{op} '{graph_node.name}': weight '{graph_node.inputs[1].name}' is not quantized")
        if w.codes.ndim == 3:
            return self._conv1d(w, graph_node, tf_layers_dict)
        self._conv = [w, tf_layers_dict[graph_node.inputs[0].name]["tf_node"], False]
        try:
            self.orig[op](graph_node=graph_node, tf_layers_dict=tf_layers_dict, **kw)
            if w.kind == "tconv":  # the unannotated kernel is named after the conv2d_transpose layer
                chain = _producer_chain(tf_layers_dict[graph_node.outputs[0].name]["tf_node"])
                self.kernel_layers[w.layer] = next((c for c in chain if "conv2d_transpose" in c), w.layer)
            if not self._conv[2]:
                raise OnnxToTfVersionError(f"{op} '{graph_node.name}': onnx2tf never fetched the kernel through "
                                           f"get_weights_constant_or_variable; its {op} handler changed")
        finally:
            self._conv = None
        self.weights_done.add(w.dq_output)

    def _conv1d(self, w, graph_node, tf_layers_dict) -> None:
        """Conv1d as TFLite runs it: CONV_2D (or DEPTHWISE_CONV_2D) on a [N, 1, W, C] view. TF's own conv1d
        reshapes a 3-D kernel, and the converter cannot move a per-channel quantized axis through that
        reshape; so the FakeQuant sits on the 4-D kernel [1, k, I, O] the 2-D op reads."""
        import tensorflow as tf

        attrs = graph_node.attrs
        if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
            raise ExportError(f"Conv '{graph_node.name}': 1-D convolution with auto_pad; export with explicit pads")
        x = tf_layers_dict[graph_node.inputs[0].name]["tf_node"]  # NWC
        pads = list(attrs.get("pads", [0, 0]))
        stride, dilation = int(attrs.get("strides", [1])[0]), int(attrs.get("dilations", [1])[0])
        kernel = np.transpose(w.dequantized, (2, 1, 0))[None]  # ONNX [O, I, k] -> [1, k, I, O]
        _, fq_const = _layer_classes()
        y = tf.expand_dims(x, 1)
        padding = [[0, 0], [0, 0], [pads[0], pads[1]], [0, 0]]
        if w.kind == "depthwise" or int(attrs.get("group", 1)) != 1:
            raise ExportError(f"Conv '{graph_node.name}': grouped or depthwise 1-D convolution is not supported; "
                              "use a Conv2d with a (1, k) kernel on an [N, C, 1, W] input")
        fq = fq_const(kernel, w.fq_min, w.fq_max, True, name=w.layer)(x)
        y = tf.nn.conv2d(y, fq, strides=[1, stride], padding=padding, dilations=[1, dilation])
        if len(graph_node.inputs) > 2:
            y = tf.nn.bias_add(y, np.asarray(graph_node.inputs[2].values, np.float32))
        out = graph_node.outputs[0]
        tf_layers_dict[out.name] = {"optype": graph_node.op, "shape": out.shape, "dtype": out.dtype, "nhwc": True,
                                    "tf_node": tf.squeeze(y, 1)}
        self.weights_done.add(w.dq_output)

    def get_weights(self, const_or_var, kernel_size):
        kernel = self.orig["get_weights"](const_or_var=const_or_var, kernel_size=kernel_size)
        if self._conv is None or self._conv[2]:
            return kernel
        w, anchor, _ = self._conv
        # ONNX [O, I, kh, kw] -> TF [kh, kw, I, O]; ConvTranspose [I, O, kh, kw] -> conv2d_transpose's [kh, kw, O, I]
        hwio = np.transpose(w.dequantized, (2, 3, 1, 0))
        got = np.asarray(kernel)
        if got.shape != hwio.shape or not np.array_equal(got, hwio):
            raise OnnxToTfVersionError(
                f"weight '{w.name}': onnx2tf's kernel (shape {list(got.shape)}) is not the ONNX dequantized "
                f"weight in [kh, kw, I, O] layout {list(hwio.shape)}; its Conv handler changed")
        _, fq_const = _layer_classes()
        self._conv[2] = True  # per-channel on the last axis (O; for depthwise [kh, kw, 1, C]: C)
        if w.kind != "tconv":
            return fq_const(hwio, w.fq_min, w.fq_max, True, name=w.layer)(anchor)
        # TRANSPOSE_CONV: TF's FakeQuant quantizes per channel on the last axis only, and the converter cannot move
        # a quantized axis through a transpose. The weight is already on its grid with max |code| 127 per
        # channel, so the converter's own max|w|/127 per-channel scales are the torch ones; the report checks them.
        import tensorflow as tf

        return tf.constant(hwio)

    def gemm(self, *, graph_node, tf_layers_dict, **kw):
        name = graph_node.inputs[1].name
        w = self.w_by_sanitized.get(name)
        if w is None:
            if self.plan.is_float:
                return self.orig["Gemm"](graph_node=graph_node, tf_layers_dict=tf_layers_dict, **kw)
            raise ExportError(f"Gemm '{graph_node.name}': weight '{name}' is not quantized")
        entry = tf_layers_dict[name]
        got = np.asarray(entry["tf_node"])
        deq = w.dequantized
        if got.shape != deq.shape or not np.array_equal(got, deq):
            raise OnnxToTfVersionError(f"Gemm weight '{w.name}': onnx2tf's dequantized value differs from the "
                                       "ONNX one; its DequantizeLinear handler changed")
        kernel = deq.T if w.gemm_trans_b else deq  # [in, out]: matmul(x, kernel) with transB=0
        _, fq_const = _layer_classes()
        anchor = tf_layers_dict[graph_node.inputs[0].name]["tf_node"]
        saved_node, saved_trans = entry["tf_node"], graph_node.attrs.get("transB")
        entry["tf_node"] = fq_const(kernel, w.fq_min[:1], w.fq_max[:1], False, name=w.layer)(anchor)
        graph_node.attrs["transB"] = 0
        try:
            self.orig["Gemm"](graph_node=graph_node, tf_layers_dict=tf_layers_dict, **kw)
        finally:
            entry["tf_node"] = saved_node
            if saved_trans is None:
                graph_node.attrs.pop("transB", None)
            else:
                graph_node.attrs["transB"] = saved_trans
        self.weights_done.add(w.dq_output)

    def max_pool(self, *, graph_node, tf_layers_dict, **kw):
        """onnx2tf's MaxPool. Explicit padding fills with the lowest float (PADV2 in int8, which the EdgeTPU
        compiler has no evidence of mapping); where the input's grid starts at 0 (a ReLU before it) its zero
        point is the lowest code, so padding with 0 (PAD, which fills with the zero point) is the same max."""
        act = self.act_by_sanitized.get(graph_node.inputs[0].name)
        from_zero = act is not None and act.zero_point_int8 == QRANGE["int8"][0]
        kw = {**kw, "output_integer_quantized_tflite": from_zero}
        self.orig["MaxPool"](graph_node=graph_node, tf_layers_dict=tf_layers_dict, **kw)

    def transpose(self, *, graph_node, tf_layers_dict, **kw):
        """onnx2tf's Transpose, except the views onnx_layout.py inserts: in TF the data is channels-last
        already, so the tensor passes through, marked as plain (NHWC_VIEW) or as onnx2tf's channels-last
        form again (NCHW_VIEW)."""
        if not graph_node.name.endswith((NCHW_VIEW, NHWC_VIEW)):
            return self.orig["Transpose"](graph_node=graph_node, tf_layers_dict=tf_layers_dict, **kw)
        out = graph_node.outputs[0]
        nhwc = graph_node.name.endswith(NCHW_VIEW)  # NHWC_VIEW: the ONNX tensor is now what TF holds
        tf_layers_dict[out.name] = {"optype": "Transpose", "shape": out.shape, "dtype": out.dtype, "nhwc": nhwc,
                                    "before_op_output_shape_trans": nhwc,
                                    "tf_node": tf_layers_dict[graph_node.inputs[0].name]["tf_node"]}

    def check_complete(self) -> None:
        lost = [a for a in self.plan.activations if a not in self.activation_records]
        lost += [w.name for k, w in self.plan.weights.items() if k not in self.weights_done]
        if lost:
            raise OnnxToTfVersionError(f"onnx2tf did not route {lost[:5]} through xqat's handlers; its op "
                                       "dispatch changed (expected onnx2tf.ops.<OpType>.make_node)")


def _sanitize(name: str) -> str:
    return name.replace(":", "__")  # what onnx2tf.convert's `sanitizing` does to tensor names


def _sanitized_index(items: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in items.items():
        s = _sanitize(k)
        if s in out:
            raise ExportError(f"ONNX tensors '{k}' and another one collide after onnx2tf replaces ':' by '__'; "
                              "rename them")
        out[s] = v
    return out


def _calibration_stand_in() -> np.ndarray:
    """Replaces onnx2tf's download of calibration_image_sample_data_20x128x128x3_float32.npy: onnx2tf only
    runs its internal shape checks on it, so deterministic stand-in images do; nothing touches the network."""
    return np.random.default_rng(20240601).random((20, 128, 128, 3), dtype=np.float32)


@contextlib.contextmanager
def _keras_names_reset() -> Iterator[None]:
    """Fresh Keras auto-name counters for the conversion (so names, hence .tflite bytes, do not depend on
    what ran before in the process), then the caller's counters back."""
    from tensorflow.python.keras import backend as legacy_kb  # onnx2tf builds grouped convs with it
    from tf_keras.src import backend as kb

    saved = [(m, dict(m.PER_GRAPH_OBJECT_NAME_UIDS), set(m.OBSERVED_NAMES)) for m in (kb, legacy_kb)
             if hasattr(m, "PER_GRAPH_OBJECT_NAME_UIDS")]
    for m, _, _ in saved:
        m.PER_GRAPH_OBJECT_NAME_UIDS.clear()
        m.OBSERVED_NAMES.clear()
    try:
        yield
    finally:
        for m, uids, names in saved:
            m.PER_GRAPH_OBJECT_NAME_UIDS.clear()
            m.PER_GRAPH_OBJECT_NAME_UIDS.update(uids)
            m.OBSERVED_NAMES.clear()
            m.OBSERVED_NAMES.update(names)


@contextlib.contextmanager
def installed_handlers(plan: QDQPlan) -> Iterator[_Handlers]:
    """Install xqat's handlers into onnx2tf for one conversion; everything is restored on exit, also on
    error: the four op handlers, Conv's kernel getter, the calibration download, env vars onnx2tf sets
    (CUDA_VISIBLE_DEVICES), the global RNG states it reseeds and Keras' name counters."""
    with _LOCK:
        version = check_onnx2tf()
        _, impl, ops = _import_onnx2tf()
        originals = {k: m.make_node for k, m in ops.items()}
        originals.update({f"get_weights_{k}": ops[k].get_weights_constant_or_variable for k in _KERNEL_OPS})
        originals["get_weights"] = originals["get_weights_Conv"]
        originals["download"] = impl.download_test_image_data
        handlers = _Handlers(plan, originals, version)
        env = {k: os.environ.get(k) for k in ("TF_USE_LEGACY_KERAS", "CUDA_VISIBLE_DEVICES")}
        rng_py, rng_np = random.getstate(), np.random.get_state()
        try:
            ops["QuantizeLinear"].make_node = handlers.quantize_linear
            ops["DequantizeLinear"].make_node = handlers.dequantize_linear
            ops["Conv"].make_node = handlers.conv
            ops["Gemm"].make_node = handlers.gemm
            ops["ConvTranspose"].make_node = handlers.conv_transpose
            ops["Transpose"].make_node = handlers.transpose
            ops["MaxPool"].make_node = handlers.max_pool
            for k in _KERNEL_OPS:
                ops[k].get_weights_constant_or_variable = handlers.get_weights
            impl.download_test_image_data = _calibration_stand_in
            with _keras_names_reset():
                yield handlers
        finally:
            for k, m in ops.items():
                m.make_node = originals[k]
            for k in _KERNEL_OPS:
                ops[k].get_weights_constant_or_variable = originals[f"get_weights_{k}"]
            impl.download_test_image_data = originals["download"]
            _restore_env(env)
            random.setstate(rng_py)
            np.random.set_state(rng_np)


@dataclass
class KerasGraph:
    """onnx2tf's Keras model with xqat's FakeQuant ops, and where each activation FakeQuant sits."""

    model: Any  # tf_keras.Model
    activation_records: dict[str, ActivationRecord]
    kernel_layers: dict[str, str]  # weight layer (WeightQ.layer) -> Keras layer whose name its TFLite kernel carries
    onnx2tf_version: str


def onnx_to_keras(model: onnx.ModelProto, plan: QDQPlan, workdir: Path, batch_size: int | None,
                  keep_shape_inputs: list[str] | None = None) -> KerasGraph:
    """Run onnx2tf (no onnxsim, no file output) with xqat's handlers; all scratch files stay in `workdir`.
    `keep_shape_inputs`: inputs onnx2tf must not transpose to channels-last (3-D sequences)."""
    onnx_path = workdir / "model.onnx"  # onnx2tf rewrites its input file in place (op names)
    onnx.save(model, onnx_path)
    no_replacements = workdir / "no_replacements.json"  # also stops onnx2tf's auto-JSON search on errors
    no_replacements.write_text(json.dumps({"operations": []}))
    with installed_handlers(plan) as handlers:
        handlers.plain.update(keep_shape_inputs or [])
        _, impl, _ = _import_onnx2tf()
        try:
            keras_model = impl.convert(
                input_onnx_file_path=str(onnx_path), output_folder_path=str(workdir / "onnx2tf"),
                not_use_onnxsim=True, batch_size=batch_size, param_replacement_file=str(no_replacements),
                disable_model_save=True, verbosity="error",
                keep_shape_absolutely_input_names=list(keep_shape_inputs or []) or None)
        except SystemExit as e:  # onnx2tf calls sys.exit(1) on some input errors
            raise ExportError(f"onnx2tf rejected the model (exit status {e.code}); see its message above") from e
        except ExportError:
            raise
        except Exception as e:
            node = getattr(e, "onnx_op_name", None)  # onnx2tf tags the node it failed on
            op = next((n.op_type for n in model.graph.node if n.name == node), None)
            what = f"ONNX node '{node}' ({op})" if node else "the model"
            hint = (f"onnx2tf has no handler for op type '{op}'" if isinstance(e, ModuleNotFoundError) else
                    f"{type(e).__name__}: {str(e)[:500]}")
            raise ExportError(f"onnx2tf could not convert {what}: {hint}; replace the layer by one of the "
                              "supported ops (Conv, Gemm, Relu, Clip, Add, Concat, pools, ...)") from e
        handlers.check_complete()
    return KerasGraph(keras_model, dict(handlers.activation_records), dict(handlers.kernel_layers), handlers.version)
