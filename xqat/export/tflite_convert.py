"""TF FakeQuant graph -> full-integer TFLite, and the whole ONNX(Q/DQ) -> .tflite step with its tensor map.

Converter settings (docs/numerics.md#converter-settings, #converter-pitfalls):
optimizations=[DEFAULT], no representative dataset, supported_ops left at the default, I/O type per
`io_dtype`. Every ONNX activation DequantizeLinear output and every quantized weight is located in the
.tflite and its (scale, zero point) compared with the ONNX Q/DQ (docs/numerics.md#converter-qparams, #weights).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..errors import ExportError
from ..tflite.model import TFLiteModel, read_tflite
from ..tflite.qtypes import IO_DTYPES
from .atomic import atomic_directory, check_writable
from .onnx2tf_adapter import ActivationRecord, onnx_to_keras
from .onnx_fold import fold_constants
from .onnx_layout import (
    channels_last_flatten,
    channels_last_shuffle,
    sequence_inputs,
    slice_bounds_as_initializers,
    zero_pads_without_value,
)
from .qdq_plan import QDQPlan, analyze_qdq
from .workdir import scratch_dir

__all__ = ["Conversion", "TensorLocations", "convert_qdq_onnx", "keras_to_tflite", "locate_tensors",
           "save_saved_model"]


# --------------------------------------------------------------------------------------------------
# Keras -> TFLite
# --------------------------------------------------------------------------------------------------


def _input_specs(model, batch_size: int | None):
    import tensorflow as tf

    specs = []
    for t in model.inputs:
        shape = list(t.shape)
        if shape and shape[0] is None and batch_size is not None:
            shape[0] = batch_size
        specs.append(tf.TensorSpec(shape, t.dtype, name=t.name.split(":")[0]))
    return specs


def _concrete_function(model, batch_size: int | None):
    import tensorflow as tf

    specs = _input_specs(model, batch_size)
    if len(specs) == 1:
        fn = tf.function(lambda x: model(x))
    else:
        fn = tf.function(lambda *xs: model(list(xs)))
    return fn.get_concrete_function(*specs)


def _trackable(model):
    """What to save alongside the graph. The converter (and SavedModel export) serializes it; for a Keras
    model that is ~20 s of layer serialization on MobileNetV2. Ours holds only constants (the FakeQuant
    layers keep their values as graph constants), so a bare tf.Module does; with variables, the model."""
    import tensorflow as tf

    return model if model.variables else tf.Module()


def keras_to_tflite(model, io_dtype: str = "int8", batch_size: int | None = 1) -> bytes:
    """Convert a Keras model holding FakeQuant ops to a full-integer .tflite (QAT path,
    docs/numerics.md#converter-settings).

    No representative dataset: every range comes from the FakeQuant ops. `supported_ops` stays at the
    default because TFLITE_BUILTINS_INT8 without a dataset fails for QAT graphs in TF 2.21
    (docs/numerics.md#converter-settings).
    """
    import tensorflow as tf

    if io_dtype not in IO_DTYPES:
        raise ExportError(f"io_dtype must be one of {IO_DTYPES}, got {io_dtype!r}")
    fn = _concrete_function(model, batch_size)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn], _trackable(model))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    # A FULLY_CONNECTED kernel that several ops share (an unrolled LSTM's W_hh) reaches the converter without its
    # FakeQuant; it then quantizes it itself: per tensor, max|w| / 127, the grid the weight is already on.
    converter._experimental_disable_per_channel_quantization_for_dense_layers = True
    io_type = {"int8": tf.int8, "uint8": tf.uint8, "float32": tf.float32}[io_dtype]
    converter.inference_input_type = io_type
    converter.inference_output_type = io_type
    try:
        return bytes(converter.convert())
    except Exception as e:  # the converter raises assorted ConverterError / RuntimeError types
        same_scale = re.search(r"'tfl\.(\w+)' op quantization parameters violate the same scale constraint", str(e))
        if same_scale:
            raise ExportError(
                f"the TFLite converter rejects a {same_scale.group(1).upper()} whose input and output quantization "
                "ranges differ: TFLite needs the same scale on both sides of same-scale ops (MaxPool, AvgPool, "
                "Concat, Reshape, Pad); tie those ranges in training (prepare_qat does). Converter said: "
                f"{str(e)[:600]}") from e
        raise ExportError(f"the TFLite converter failed on the FakeQuant graph: {str(e)[:2000]}") from e


def save_saved_model(model, path: str | os.PathLike, batch_size: int | None = 1) -> Path:
    """Write the TF FakeQuant graph as a SavedModel (serving signature with the static input shape)."""
    import tensorflow as tf

    fn = _concrete_function(model, batch_size)
    with atomic_directory(path) as tmp:
        tf.saved_model.save(_trackable(model), str(tmp), signatures=fn)
    return Path(path).expanduser().absolute()


# --------------------------------------------------------------------------------------------------
# ONNX tensor -> TFLite tensor map
# --------------------------------------------------------------------------------------------------


def _layers_of(name: str, model_name: str) -> set[str]:
    """Keras layer names in a TFLite tensor name. The converter names a tensor after the TF ops fused
    into its producer, ';'-joined, each as '<model>/<layer>/<op>...'."""
    out = set()
    for part in name.split(";"):
        bits = part.split("/")
        if len(bits) >= 2 and bits[0] == model_name:
            out.add(bits[1])
    return out


def _layers_of_any(name: str) -> set[str]:
    """Keras layer names in a TFLite tensor name, whatever the model prefix."""
    return {part.split("/")[1] for part in name.split(";") if part.count("/") >= 1}


@dataclass(frozen=True)
class TensorLocations:
    """Where the ONNX quantized tensors went in the .tflite."""

    tensor_map: dict[str, int]  # activation DQ output -> TFLite tensor index
    weight_map: dict[str, int]  # weight initializer -> TFLite tensor index (int8 kernel)
    bias_map: dict[str, int]  # bias initializer -> TFLite tensor index (int32)
    located_by: dict[str, str]  # activation -> "fake_quant" | "producer" | "producer^k" (k-th ancestor layer) | "input"
    fused: dict[str, int]  # activation -> index of the TFLite op that absorbed the tensor (e.g. PAD into CONV)
    unmapped: tuple[str, ...]  # found nowhere (should not happen; the report flags it)


def locate_tensors(tfl: TFLiteModel, plan: QDQPlan, records: dict[str, ActivationRecord],
                   model_name: str, kernel_layers: dict[str, str] | None = None,
                   input_layers: frozenset[str] = frozenset()) -> TensorLocations:
    """Find the TFLite tensor of every activation DQ output and every weight / bias, by graph structure.

    The converter names each tensor after the TF ops fused into its producer. An activation FakeQuant
    either survives in the name of the tensor it quantizes (at the input, or as a kept QUANTIZE), or is
    folded into the op that produces its input: the tensor is then that op's output, named after the
    producer layer (shape must match; through a dropped reshape, the element count). If the producer
    layer only names a tensor of another shape, the tensor was absorbed into that tensor's op (a PAD
    into CONV_2D). Weights are inputs[1] (bias: inputs[2]) of the op whose kernel carries the weight
    FakeQuant's layer name.
    """
    by_layer: dict[str, list[int]] = {}
    for t in tfl.tensors:
        for layer in _layers_of(t.name, model_name):
            by_layer.setdefault(layer, []).append(t.index)
    produced = set(tfl.producers) | set(tfl.inputs)

    def activations_of(layer: str) -> list[int]:
        return [i for i in by_layer.get(layer, []) if i in produced and tfl.tensors[i].data is None]

    tensor_map: dict[str, int] = {}
    how: dict[str, str] = {}
    fused: dict[str, int] = {}
    unmapped: list[str] = []
    for name in plan.activations:
        rec = records.get(name)
        found = _locate_activation(rec, activations_of, tfl) if rec is not None else None
        if found is None and rec is not None and rec.producers[:1] and rec.producers[0] in input_layers:
            found = _model_input(tfl, rec.shape)
        if found is None:
            unmapped.append(name)
        elif found[1] == "fused":
            fused[name] = found[0]
        else:
            tensor_map[name], how[name] = found
    unmapped = _locate_lone_input(tfl, plan, unmapped, tensor_map, how)

    weight_map: dict[str, int] = {}
    bias_map: dict[str, int] = {}
    for w in plan.weights.values():
        layer = (kernel_layers or {}).get(w.layer, w.layer)
        consts = [i for i in by_layer.get(layer, []) if tfl.tensors[i].data is not None]
        users = [op for i in consts for op in tfl.consumers.get(i, []) if len(op.inputs) > 1 and op.inputs[1] == i]
        consts = [i for i in consts if any(op.inputs[1] == i for op in users)]
        # the op reading this weight's input activation (the converter stores identical kernels once, e.g. an
        # LSTM's W_hh at every time step, so a shared kernel's name tells only one of its ops), else by name
        op = _op_reading(tfl, tensor_map.get(w.input_activation), w)
        if op is None and len(consts) == 1 and users:
            op = users[0]
        if op is None:
            unmapped.append(w.name)
            continue
        weight_map[w.name] = op.inputs[1]
        b = 3 if op.name == "TRANSPOSE_CONV" else 2  # TRANSPOSE_CONV: (output shape, filter, input, bias)
        if w.bias is not None and len(op.inputs) > b and op.inputs[b] >= 0:
            bias_map[w.bias] = op.inputs[b]
    return TensorLocations(tensor_map, weight_map, bias_map, how, fused, tuple(unmapped))


def _locate_lone_input(tfl: TFLiteModel, plan: QDQPlan, unmapped: list[str], tensor_map: dict[str, int],
                       how: dict[str, str]) -> list[str]:
    """A model input whose first op the converter fused its reshape into (a no-op flatten into a Linear) keeps no
    layer name ("tfl.quantize"): when it is the one model input left unmapped and one .tflite input is left, that
    input (or, for uint8 / float32 I/O, the QUANTIZE output it feeds) is its int8 tensor."""
    missing = [n for n in unmapped if plan.activations.get(n) is not None
               and plan.activations[n].source in plan.input_names]
    left = [_int8_of_input(tfl, i) for i in tfl.inputs]
    left = [i for i in left if i is not None and i not in tensor_map.values()]
    if len(missing) != 1 or len(left) != 1:
        return unmapped
    tensor_map[missing[0]], how[missing[0]] = left[0], "input"
    return [n for n in unmapped if n != missing[0]]


def _int8_of_input(tfl: TFLiteModel, index: int) -> int | None:
    if tfl.tensors[index].dtype == "INT8":
        return index
    quantize = [op for op in tfl.consumers.get(index, []) if op.name == "QUANTIZE"]
    return quantize[0].outputs[0] if len(quantize) == 1 else None


def _model_input(tfl: TFLiteModel, shape: tuple[int | None, ...]) -> tuple[int, str] | None:
    """The int8 tensor of the one model input of `shape` (the input itself, or what its QUANTIZE makes of
    uint8 / float32 I/O): an input the converter names after nothing (a 3-D sequence input onnx2tf kept as is)."""
    found = []
    for i in tfl.inputs:
        if not _shape_matches(tfl.tensors[i].shape, shape):
            continue
        if tfl.tensors[i].dtype == "INT8":
            found.append(i)
        found += [op.outputs[0] for op in tfl.consumers.get(i, []) if op.name == "QUANTIZE"
                  and tfl.tensors[op.outputs[0]].dtype == "INT8"]
    return (found[0], "input") if len(found) == 1 else None


def _op_reading(tfl: TFLiteModel, input_tensor: int | None, w) -> Any:
    """The one op that reads `input_tensor` with a constant kernel of `w`'s shape, or None.

    The converter stores identical constants once: a weight several ops use (an LSTM's W_hh at every time
    step) carries only one layer's name, so the others are found by the activation they read."""
    if input_tensor is None or w.kind != "fc":
        return None
    shape = tuple(w.codes.shape) if w.gemm_trans_b else tuple(w.codes.shape)[::-1]  # FULLY_CONNECTED: [O, I]
    ops = [op for op in tfl.consumers.get(input_tensor, []) if op.name == "FULLY_CONNECTED" and len(op.inputs) > 1
           and op.inputs[0] == input_tensor and op.inputs[1] >= 0 and tfl.tensors[op.inputs[1]].data is not None
           and tuple(tfl.tensors[op.inputs[1]].shape) == shape]
    if len(ops) > 1:  # one activation feeding two kernels of one shape (a layer's h: next step and next layer)
        codes = w.codes if w.gemm_trans_b else w.codes.T
        ops = [op for op in ops if np.array_equal(tfl.tensors[op.inputs[1]].data.astype(np.int64), codes)]
    return ops[0] if len(ops) == 1 else None


def _locate_activation(rec: ActivationRecord, activations_of, tfl: TFLiteModel) -> tuple[int, str] | None:
    shape = rec.shape
    own = [i for i in activations_of(rec.fq_layer) if _shape_matches(tfl.tensors[i].shape, shape)]
    if len(own) > 1:  # the FakeQuant also names a float copy (for a float consumer): the quantized one
        own = [i for i in own if tfl.tensors[i].dtype in ("INT8", "UINT8")]
    if len(own) > 1:  # FakeQuant kept as a QUANTIZE op: its output, not its input
        own = [i for i in own if tfl.producers.get(i) is not None and tfl.producers[i].name == "QUANTIZE"]
    kept = len(own) == 1 and getattr(tfl.producers.get(own[0]), "name", None) == "QUANTIZE"
    if kept is False and len(own) == 1 and rec.producers \
            and rec.producers[0] not in _layers_of_any(tfl.tensors[own[0]].name):
        # the converter also names a tensor after the FakeQuant ops fused upstream of it (a chain of
        # reshapes): when the layer that made our input names one tensor of our shape, that one is ours
        # (not for a FakeQuant kept as a QUANTIZE: its output is ours, its input the producer's)
        mine = [i for i in activations_of(rec.producers[0]) if _shape_matches(tfl.tensors[i].shape, shape)]
        if len(mine) == 1:
            return mine[0], "producer"
    if len(own) == 1:
        return own[0], "fake_quant"
    for depth, layer in enumerate(rec.producers):
        named = activations_of(layer)
        exact = [i for i in named if _shape_matches(tfl.tensors[i].shape, shape)]
        if depth > 0 and not exact:  # through a dropped reshape / flatten: same data, other shape
            exact = [i for i in named if _same_size(tfl.tensors[i].shape, shape)]
        if len(exact) == 1 and depth == 0:
            through = _binary_read_through_reshape(rec, exact[0], activations_of, tfl)
            return (exact[0], "producer") if through is None else (through, "producer^2")
        if len(exact) == 1:
            return exact[0], f"producer^{depth + 1}"
        if exact:
            return None  # several tensors carry that layer: refuse to guess
        views = [i for i in named if _same_view(tfl.tensors[i].shape, shape)]
        if depth == 0 and len(views) == 1:  # a squeeze the converter dropped (Conv1d runs as CONV_2D)
            return views[0], "producer"
        if depth == 0 and named:  # the producer's op was fused into the op writing another-shaped tensor
            ops = {tfl.producers[i].index for i in named if i in tfl.producers}
            return (ops.pop(), "fused") if len(ops) == 1 else None
    return None


def _binary_read_through_reshape(rec: ActivationRecord, found: int, activations_of, tfl: TFLiteModel) -> int | None:
    """A Linear's (N*T, F) output whose reshape back to (N, T, F) the converter folded into the ADD/SUB/MUL reading
    it (a residual add after attention's head merge): that op's output carries the reshape's name, but ours is
    its input of our size made by a layer before the reshape."""
    op = tfl.producers.get(found)
    if op is None or op.name not in ("ADD", "SUB", "MUL"):
        return None
    earlier = {i for layer in rec.producers[1:] for i in activations_of(layer)}
    mine = [i for i in op.inputs if i in earlier and _same_size(tfl.tensors[i].shape, rec.shape)
            and not _shape_matches(tfl.tensors[i].shape, rec.shape)]
    return mine[0] if len(mine) == 1 else None


def _same_size(tflite_shape: tuple[int, ...], keras_shape: tuple[int | None, ...]) -> bool:
    return None not in keras_shape and int(np.prod(tflite_shape)) == int(np.prod(keras_shape))


def _same_view(tflite_shape: tuple[int, ...], keras_shape: tuple[int | None, ...]) -> bool:
    """The same data with unit dimensions added or removed ([1, 1, W, C] for [1, W, C])."""
    return None not in keras_shape and [d for d in tflite_shape if d != 1] == [d for d in keras_shape if d != 1]


def _shape_matches(tflite_shape: tuple[int, ...], keras_shape: tuple[int | None, ...]) -> bool:
    return len(tflite_shape) == len(keras_shape) and all(k is None or k == d for d, k in zip(tflite_shape, keras_shape))


# --------------------------------------------------------------------------------------------------
# The whole step
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Conversion:
    """Result of `convert_qdq_onnx`: the .tflite bytes and where every ONNX quantized tensor went."""

    tflite: bytes
    model: TFLiteModel
    plan: QDQPlan
    tensor_map: dict[str, int]  # ONNX activation DequantizeLinear output -> TFLite tensor index
    weight_map: dict[str, int]  # ONNX weight initializer -> TFLite tensor index
    bias_map: dict[str, int]  # ONNX bias initializer -> TFLite tensor index (int32)
    located_by: dict[str, str]  # activation -> "fake_quant" | "producer" | "producer^k" | "input": how it was found
    fused: dict[str, int]  # activation whose tensor an op absorbed (PAD into CONV_2D) -> that op's index
    unmapped: tuple[str, ...]  # ONNX quantized tensors with no TFLite tensor found
    io_dtype: str
    onnx2tf_version: str
    seconds: dict[str, float] = field(default_factory=dict)
    weight_columns: dict[str, np.ndarray] = field(default_factory=dict)  # Linear weight -> column order (onnx_layout)
    sequence_layout: bool = False  # 3-D tensors kept in torch's (N, T, F) order (onnx_layout.sequence_inputs)
    model_transposes: frozenset[str] = frozenset()  # activations that an ONNX Transpose of the model computes

    def io_tensor(self, onnx_name: str) -> int:
        """TFLite input/output tensor index of an ONNX graph input or output: the mapped int8 tensor itself
        (int8 I/O) or the one a boundary QUANTIZE / DEQUANTIZE converts it from / to (uint8 / float32 I/O)."""
        m = self.model
        if onnx_name in self.plan.input_names:  # its Q/DQ pair is the first thing the input meets
            mapped = {self.tensor_map[a] for a, q in self.plan.activations.items()
                      if q.source == onnx_name and a in self.tensor_map}
            for idx in m.inputs:
                if idx in mapped or any(op.name == "QUANTIZE" and set(op.outputs) & mapped
                                        for op in m.consumers.get(idx, [])):
                    return idx
        elif onnx_name in self.tensor_map:
            mapped_idx = self.tensor_map[onnx_name]
            for idx in m.outputs:
                op = m.producers.get(idx)
                if idx == mapped_idx or (op is not None and op.name in ("QUANTIZE", "DEQUANTIZE")
                                         and mapped_idx in op.inputs):
                    return idx
        raise ExportError(f"ONNX tensor '{onnx_name}' is not an input or output of the .tflite")

    def float_tensors(self) -> list[int]:
        """Non-constant FLOAT32 tensors: none may be left in a full-integer model with int8/uint8 I/O."""
        return [t.index for t in self.model.tensors if t.dtype == "FLOAT32" and t.data is None]

    def layout_transposes(self) -> list[int]:
        """Inner TRANSPOSE ops that move data between layouts. A transpose that keeps batch and spatial axes
        in place ([0, 1, 2, ...] on a rank >= 4 tensor: a channel shuffle's group swap), or batch and last axis
        (a layout move always moves the channels: [0, 2, 1, 3] is attention's head split), or one whose output is
        the tensor of a torch transpose/permute (attention's keys, (0, 2, 3, 1)), is the model's own op."""
        own = {self.tensor_map[a] for a in self.model_transposes if a in self.tensor_map}
        m = self.model
        out = []
        for i in self.inner_ops("TRANSPOSE"):
            op = m.ops[i]
            if op.outputs[0] in own:
                continue
            perm = m.tensors[op.inputs[1]].data if len(op.inputs) > 1 else None
            if perm is not None and perm.size >= 4 and list(perm.reshape(-1)[:3]) == [0, 1, 2]:
                continue
            flat = perm.reshape(-1) if perm is not None else None
            if flat is not None and flat.size >= 4 and flat[0] == 0 and flat[-1] == flat.size - 1:
                continue
            out.append(i)
        return out

    def inner_ops(self, op_name: str) -> list[int]:
        """Indices of `op_name` ops other than the I/O type conversions at the model's boundary (the
        uint8 <-> int8 QUANTIZE or float DEQUANTIZE that uint8 / float32 I/O adds): with int8 I/O every
        QUANTIZE counts, since it requantizes."""
        m = self.model

        def io_conversion(op) -> bool:
            ins = [i for i in op.inputs if i >= 0]
            if not ins or not op.outputs or m.tensors[ins[0]].dtype == m.tensors[op.outputs[0]].dtype:
                return False
            return ins[0] in m.inputs or op.outputs[0] in m.outputs

        return [op.index for op in m.ops if op.name == op_name and not io_conversion(op)]


def convert_qdq_onnx(onnx_model: onnx.ModelProto | str | os.PathLike, *, io_dtype: str = "int8",
                     batch_size: int | None = 1, saved_model_dir: str | os.PathLike | None = None,
                     workdir: str | os.PathLike | None = None) -> Conversion:
    """ONNX with Q/DQ pairs -> onnx2tf with xqat's handlers -> TF FakeQuant graph -> full-integer .tflite.

    Deterministic (same ONNX, same bytes), offline, and leaves no files behind: onnx2tf's scratch goes
    to a temporary folder (inside `workdir` if given) that is removed afterwards. `batch_size` fixes the
    batch dimension (EdgeTPU needs a static 1); None keeps the ONNX input's. The returned maps say which
    TFLite tensor carries each ONNX quantized tensor.
    """
    if io_dtype not in IO_DTYPES:
        raise ExportError(f"io_dtype must be one of {IO_DTYPES}, got {io_dtype!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or int(batch_size) < 1):
        raise ExportError(f"batch_size must be a positive int or None, got {batch_size!r}")
    if saved_model_dir is not None:  # fail before the slow work
        check_writable(saved_model_dir, what="SavedModel folder", directory=True)
    if workdir is not None and not Path(workdir).is_dir():
        raise ExportError(f"{workdir}: workdir must be an existing folder (onnx2tf's scratch goes there)")
    t0 = time.perf_counter()
    model = channels_last_shuffle(slice_bounds_as_initializers(fold_constants(_load(onnx_model))))
    model = zero_pads_without_value(model)
    sequences = sequence_inputs(model)
    model, weight_columns = channels_last_flatten(model, sequence_layout=bool(sequences))
    plan = analyze_qdq(model)
    with scratch_dir(workdir) as scratch:  # removed on any end but SIGKILL; swept on the next run after that
        t1 = time.perf_counter()
        graph = onnx_to_keras(model, plan, scratch, batch_size, keep_shape_inputs=sequences)
        t2 = time.perf_counter()
        tflite = keras_to_tflite(graph.model, io_dtype, batch_size)
        t3 = time.perf_counter()
        if saved_model_dir:
            save_saved_model(graph.model, saved_model_dir, batch_size)
    tfl = read_tflite(tflite)
    loc = locate_tensors(tfl, plan, graph.activation_records, graph.model.name, graph.kernel_layers,
                         frozenset(getattr(graph.model, "input_names", ())))
    seconds = {"analyze": t1 - t0, "onnx2tf": t2 - t1, "tflite_converter": t3 - t2,
               "total": time.perf_counter() - t0}
    return Conversion(tflite, tfl, plan, loc.tensor_map, loc.weight_map, loc.bias_map, loc.located_by, loc.fused,
                      loc.unmapped, io_dtype, graph.onnx2tf_version, seconds, weight_columns, bool(sequences),
                      _transposed_activations(model, plan))


def _transposed_activations(model: onnx.ModelProto, plan: QDQPlan) -> frozenset[str]:
    """Activations whose Q/DQ reads the output of an ONNX Transpose (a transpose/permute of the torch model)."""
    made_by = {o: n.op_type for n in model.graph.node for o in n.output}
    return frozenset(a for a, q in plan.activations.items() if made_by.get(q.source) == "Transpose")


def _load(onnx_model: Any) -> onnx.ModelProto:
    if isinstance(onnx_model, onnx.ModelProto):
        return onnx_model
    p = Path(onnx_model)
    if not p.is_file():
        raise ExportError(f"{p}: no such ONNX file")
    try:
        return onnx.load(str(p))
    except Exception as e:
        raise ExportError(f"{p}: cannot read the ONNX model ({type(e).__name__}: {e})") from e

