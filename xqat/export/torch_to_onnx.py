"""Stage 1 of the export: a trained QAT model -> its export graph (export_graph.py) -> a Q/DQ ONNX model.

Every activation fake-quant point becomes a per-tensor int8 QuantizeLinear/DequantizeLinear with the
snapped grid (0-d scale and zero point); conv weights go through a per-channel (axis 0) symmetric
Q/DQ and Linear weights through a per-tensor one, holding TF's fake-quant codes of the BN-folded
weights; biases stay float (TFLite derives int32 biases from s_in·s_w). The point -> ONNX tensor mapping
is by execution order and verified (qparams for activations, content for weights).
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from torch import nn

from ..errors import ExportError
from ..torch_side.modules import WeightQuantizedModule
from ..torch_side.prepare import QUANTIZERS, require_qat_model
from .export_graph import ExportGraph, build_export_graph
from .onnx_fold import fold_constants, onnx_constants
from .snapping import SnapRecord, labels_by_group

__all__ = ["OPSET", "OnnxExport", "validate_for_export", "export_onnx"]

# The ONNX opset of the Q/DQ model: per-axis QuantizeLinear needs >= 13; 14 writes Hardswish as one HardSwish op
# (13: HardSigmoid + Mul, float ops that onnx2tf builds with no range between), which becomes int8 HARD_SWISH.
OPSET = 14


@dataclass
class OnnxExport:
    """The Q/DQ ONNX model plus what the rest of the export needs to name things."""

    model: onnx.ModelProto
    point_tensors: dict[str, str]  # QuantPoint key -> ONNX name of its DequantizeLinear output
    point_labels: dict[str, str]  # QuantPoint key -> torch op label (module path)
    point_qparams: dict[str, tuple[float, int]]  # QuantPoint key -> deployed (float32 scale, int8 zero point)
    weight_tensors: dict[str, str]  # module path of a QConv2d/QLinear -> ONNX name of its weight (Q input)
    snaps: list[SnapRecord]  # every learned range whose deployed form differs from the model's stored one


def validate_for_export(model: nn.Module) -> None:
    """Refuse, with the layer's name and a fix, what cannot become a faithful full-integer model."""
    require_qat_model(model, "export it (it has no learned ranges)")
    labels = labels_by_group(model)
    for key, q in getattr(model, QUANTIZERS).items():
        where = ", ".join(labels.get(key, (key,)))
        if q.num_bits != 8:
            raise ExportError(f"activation range of {where} uses {q.num_bits} bits; TFLite integer kernels are 8-bit: "
                              "prepare with QATConfig(activation_bits=8)")
        if q.fixed:
            continue
        if int(q.step) == 0:
            raise ExportError(
                f"activation range of {where} is still at its initial value (never observed): run some training "
                "or calibration batches through the QAT model in train() mode before exporting")
        lo, hi = float(q.min.detach()), float(q.max.detach())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ExportError(f"activation range of {where} is not finite ([{lo}, {hi}]): training diverged; "
                              "restore a good checkpoint")
    for name, m in model.named_modules():
        if isinstance(m, WeightQuantizedModule):
            if m.weight_quant.num_bits != 8:
                raise ExportError(f"weights of '{name}' use {m.weight_quant.num_bits} bits; prepare with "
                                  "QATConfig(weight_bits=8) to export")
            w, b = m.folded()
            for what, t in (("weight", w), ("bias", b)):
                if t is not None and not bool(torch.isfinite(t).all()):
                    raise ExportError(f"the folded {what} of '{name}' has NaN/Inf (BN variance or weights diverged); "
                                      "restore a good checkpoint")


def _activation_dq_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """DequantizeLinear nodes fed by a QuantizeLinear of a computed (non-constant) tensor, in node order."""
    consts = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    producer = {o: n for n in graph.node for o in n.output}
    out = []
    for n in graph.node:
        if n.op_type != "DequantizeLinear":
            continue
        q = producer.get(n.input[0])
        if q is not None and q.op_type == "QuantizeLinear" and q.input[0] not in consts:
            out.append(n)
    return out


def export_onnx(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> OnnxExport:
    """Validate, convert a copy of the model (export_graph.py) and trace it as a Q/DQ ONNX model (OPSET).
    The model itself is not changed: its ranges are snapped in the copy only."""
    validate_for_export(model)
    graph = build_export_graph(model)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        n_in = len(example_inputs)
        torch.onnx.export(graph.module, tuple(example_inputs), buf, dynamo=False, opset_version=OPSET,
                          input_names=["input"] if n_in == 1 else [f"input_{i}" for i in range(n_in)],
                          do_constant_folding=True)
    proto = fold_constants(onnx.load_from_string(buf.getvalue()))
    dqs = _activation_dq_nodes(proto.graph)
    if len(dqs) != len(graph.points):
        raise ExportError(f"internal: the ONNX graph has {len(dqs)} activation Q/DQ pairs for {len(graph.points)} "
                          "fake-quant points; please report this with the model definition")
    point_tensors = {key: dq.output[0] for key, dq in zip(graph.points, dqs)}
    _check_point_qparams(graph, proto, dqs)
    qparams = {k: (p.scale, p.zero_point) for k, p in graph.points.items()}
    return OnnxExport(proto, point_tensors, dict(graph.labels), qparams, _weight_tensors(graph, proto), graph.snaps)


def _check_point_qparams(graph: ExportGraph, proto: onnx.ModelProto, dqs: list[onnx.NodeProto]) -> None:
    """The order-based mapping is verified: each DQ must carry its QuantPoint's snapped scale/zero point."""
    consts = onnx_constants(proto)
    for (key, p), dq in zip(graph.points.items(), dqs):
        scale, zp = float(consts[dq.input[1]]), int(consts[dq.input[2]])
        if scale != p.scale or zp != p.zero_point:
            raise ExportError(f"internal: ONNX Q/DQ for '{graph.labels[key]}' carries ({scale}, {zp}), expected "
                              f"({p.scale}, {p.zero_point}); please report this with the model definition")


def _weight_tensors(graph: ExportGraph, proto: onnx.ModelProto) -> dict[str, str]:
    """Module path of each weight-quantized module -> the ONNX name of its weight fed to QuantizeLinear.

    Weight Q nodes appear in execution order, as the modules do in the fx graph; each pairing is then
    verified by content (the initializer must equal the module's exported weight bit for bit)."""
    consts = {i.name: i for i in proto.graph.initializer}
    weight_q = [n for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in consts]
    mods = list(graph.weights)
    if len(mods) != len(weight_q):
        raise ExportError(f"internal: {len(weight_q)} weight Q/DQ pairs in the ONNX graph for {len(mods)} "
                          "weight-quantized layers; please report this with the model definition")
    out = {}
    for name, q in zip(mods, weight_q):
        expected = graph.weights[name].weight.numpy()
        got = onnx.numpy_helper.to_array(consts[q.input[0]])
        if got.shape != expected.shape or not np.array_equal(got, expected):
            raise ExportError(f"internal: the ONNX weight '{q.input[0]}' is not the weight of '{name}'; please "
                              "report this with the model definition")
        out[name] = q.input[0]
    return out
