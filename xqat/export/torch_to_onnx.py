"""Stage 1 of the export: a trained QAT model -> the eval-mode folded graph as a Q/DQ ONNX model.

Every activation fake-quant point becomes a per-tensor int8 QuantizeLinear/DequantizeLinear with the
snapped range (0-d scale and zero point); conv weights go through a per-channel (axis 0) symmetric
Q/DQ and Linear weights through a per-tensor one, holding TF's fake-quant codes of the BN-folded
weights; biases stay float (TFLite derives int32 biases from s_in·s_w). export-route.md, steps 1-2.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from torch import nn

from ..errors import ExportError
from ..torch_side.modules import WeightQuantizedModule
from ..torch_side.prepare import QUANTIZERS, is_qat_model, quant_points
from ..torch_side.quantizers import QuantPoint
from .onnx_fold import fold_constants

__all__ = ["SnapRecord", "OnnxExport", "validate_for_export", "snap_ranges", "export_onnx"]

OPSET = 13
_EXPORT_BUFFERS = ("xqat_export_weight", "xqat_export_scale", "xqat_export_bias")


@dataclass(frozen=True)
class SnapRecord:
    """A range rewritten at export so TF's nudge and the TFLite converter give the same grid (§4.3)."""

    group: str
    labels: tuple[str, ...]
    old_range: tuple[float, float]
    new_range: tuple[float, float]
    converter_disagreed: bool  # the learned range would have given the converter another zero point
    scale_moved_ulps: int  # the TF grid itself moved (rare; then the torch model moved with it)

    @property
    def delta(self) -> float:
        """Largest change of either end of the range."""
        return max(abs(self.new_range[0] - self.old_range[0]), abs(self.new_range[1] - self.old_range[1]))


@dataclass
class OnnxExport:
    """The Q/DQ ONNX model plus what the rest of the export needs to name things."""

    model: onnx.ModelProto
    point_tensors: dict[str, str]  # QuantPoint key -> ONNX name of its DequantizeLinear output
    point_labels: dict[str, str]  # QuantPoint key -> torch op label (module path)
    weight_tensors: dict[str, str]  # module path of a QConv2d/QLinear -> ONNX name of its weight (Q input)
    snaps: list[SnapRecord]


def _labels_by_group(model: nn.Module) -> dict[str, tuple[str, ...]]:
    out: dict[str, list[str]] = {}
    for p in quant_points(model):
        out.setdefault(p.group, []).append(p.label)
    return {k: tuple(v) for k, v in out.items()}


def validate_for_export(model: nn.Module) -> None:
    """Refuse, with the layer's name and a fix, what cannot become a faithful full-integer model."""
    if not is_qat_model(model):
        raise ExportError(
            f"{type(model).__name__} was not made by xqat.prepare_qat, so it has no learned ranges to export: "
            "call qat = xqat.prepare_qat(model, example_inputs), train or calibrate qat, then export qat")
    labels = _labels_by_group(model)
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


@torch.no_grad()
def snap_ranges(model: nn.Module) -> list[SnapRecord]:
    """Write the deployable range into every learned quantizer (in place) and report the changes.

    The new range keeps TF's grid (what training simulated) but is written so the converter derives
    the same (scale, zero point); see `snap_range`. Only the representation changes, unless the grid has
    no agreeing representation, in which case its scale moves by a few float32 ulps (reported).
    """
    labels = _labels_by_group(model)
    records = []
    for key, q in getattr(model, QUANTIZERS).items():
        if q.fixed:
            continue
        old = (float(q.min.detach()), float(q.max.detach()))
        zero = old == (0.0, 0.0)  # an all-zero tensor: deployed on another grid (see ActivationQuantizer.snapped)
        r = q.snapped()
        if (r.min, r.max) != old:
            q.min.data.fill_(r.min)
            q.max.data.fill_(r.max)
        if zero or r.converter_disagreed or r.scale_moved_ulps:
            records.append(SnapRecord(key, labels.get(key, ()), old, (r.min, r.max), zero or r.converter_disagreed,
                                      r.scale_moved_ulps))
    return records


@contextlib.contextmanager
def _export_mode(model: nn.Module) -> Iterator[None]:
    """Switch every QuantPoint and weight module to Q/DQ emission with precomputed constants; restore after."""
    mods = [m for m in model.modules() if isinstance(m, (QuantPoint, WeightQuantizedModule))]
    training = model.training
    model.eval()
    try:
        for m in mods:
            if isinstance(m, WeightQuantizedModule):  # weight/bias as buffers, so the tracer keeps W -> Q -> DQ as ops
                w, scales, b = m.export_weights()
                m.register_buffer(_EXPORT_BUFFERS[0], w)  # persistent: non-persistent ones become constants
                m.register_buffer(_EXPORT_BUFFERS[2], b)
                m.xqat_export_scale = scales  # a plain tensor: a Constant in the ONNX graph
            m.exporting = True
        yield
    finally:
        for m in mods:
            m.exporting = False
            for name in _EXPORT_BUFFERS:
                m._buffers.pop(name, None)
                m.__dict__.pop(name, None)
        model.train(training)


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
    """Validate, snap ranges (in place), and write the folded eval graph as a Q/DQ ONNX model (opset 13)."""
    validate_for_export(model)
    snaps = snap_ranges(model)
    points = quant_points(model)
    buf = io.BytesIO()
    with _export_mode(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        n_in = len(example_inputs)
        torch.onnx.export(model, tuple(example_inputs), buf, dynamo=False, opset_version=OPSET,
                          input_names=["input"] if n_in == 1 else [f"input_{i}" for i in range(n_in)],
                          do_constant_folding=True)
    proto = fold_constants(onnx.load_from_string(buf.getvalue()))
    dqs = _activation_dq_nodes(proto.graph)
    if len(dqs) != len(points):
        raise ExportError(f"internal: the ONNX graph has {len(dqs)} activation Q/DQ pairs for {len(points)} "
                          "fake-quant points; please report this with the model definition")
    point_tensors = {p.key: dq.output[0] for p, dq in zip(points, dqs)}
    _check_point_qparams(model, proto, points, dqs)
    return OnnxExport(proto, point_tensors, {p.key: p.label for p in points}, _weight_tensors(model, proto), snaps)


def _check_point_qparams(model, proto, points, dqs) -> None:
    """The order-based mapping is verified: each DQ must carry its QuantPoint's snapped scale/zero point."""
    consts = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    for n in proto.graph.node:
        if n.op_type == "Constant":
            consts[n.output[0]] = onnx.numpy_helper.to_array(n.attribute[0].t)
    for p, dq in zip(points, dqs):
        r = model.get_submodule(f"xqat_points.{p.key}").quantizer.snapped()
        scale, zp = float(consts[dq.input[1]]), int(consts[dq.input[2]])
        if scale != r.scale or zp != r.zero_point - 128:
            raise ExportError(f"internal: ONNX Q/DQ for '{p.label}' carries ({scale}, {zp}), expected "
                              f"({r.scale}, {r.zero_point - 128}); please report this with the model definition")


def _weight_tensors(model: nn.Module, proto: onnx.ModelProto) -> dict[str, str]:
    """Module path of each weight-quantized module -> the ONNX name of its weight fed to QuantizeLinear.

    Weight Q nodes appear in execution order, as the modules do in the fx graph; each pairing is then
    verified by content (the initializer must equal the module's exported weight bit for bit)."""
    consts = {i.name: i for i in proto.graph.initializer}
    weight_q = [n for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in consts]
    mods = [str(n.target) for n in model.graph.nodes
            if n.op == "call_module" and isinstance(model.get_submodule(n.target), WeightQuantizedModule)]
    if len(mods) != len(weight_q):
        raise ExportError(f"internal: {len(weight_q)} weight Q/DQ pairs in the ONNX graph for {len(mods)} "
                          "weight-quantized layers; please report this with the model definition")
    out = {}
    for name, q in zip(mods, weight_q):
        expected = model.get_submodule(name).export_weights()[0].numpy()
        got = onnx.numpy_helper.to_array(consts[q.input[0]])
        if got.shape != expected.shape or not np.array_equal(got, expected):
            raise ExportError(f"internal: the ONNX weight '{q.input[0]}' is not the weight of '{name}'; please "
                              "report this with the model definition")
        out[name] = q.input[0]
    return out
