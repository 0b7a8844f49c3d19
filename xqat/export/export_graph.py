"""The export pass: a converted copy of a QAT GraphModule that computes exactly what the int8 graph holds,
in ops torch.onnx traces to Q/DQ ONNX.

Each `QuantPoint` becomes a per-tensor int8 QuantizeLinear/DequantizeLinear with its group's snapped grid;
each `WeightQuantizedModule` becomes `functional(x, DQ(Q(w)), b)` + its fused activation, the weight on TF's
grid (BN folded) with symmetric int8 scales, per channel on `weight_axis` or per tensor, biases float (TFLite
derives int32 biases from s_in * s_w). Every other module is kept: in eval() it is already the float op the
TFLite graph holds. The user's model is not changed (docs/numerics.md, converter qparams & snapping).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..tflite.qtypes import QRANGE, int8_zero_point
from ..torch_side.decomposed import constant_like
from ..torch_side.modules import QLinear, WeightQuantizedModule, _activate
from ..torch_side.point_hooks import detach_point_hooks
from ..torch_side.prepare import POINTS, point_module, quant_points
from .snapping import SnapRecord, planned_snaps

__all__ = ["ActivationQDQ", "WeightQDQ", "ExportGraph", "build_export_graph"]

_QMIN, _QMAX = QRANGE["int8"]


class ActivationQDQ(nn.Module):
    """One activation fake-quant point as a per-tensor int8 QuantizeLinear -> DequantizeLinear."""

    def __init__(self, scale: float, zero_point: int) -> None:
        super().__init__()
        self.scale, self.zero_point = float(scale), int(zero_point)  # float32 scale, int8 zero point

    def extra_repr(self) -> str:
        return f"scale={self.scale!r}, zero_point={self.zero_point}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.tensor(self.scale, dtype=torch.float32)
        zero_point = torch.tensor(self.zero_point, dtype=torch.int32)
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, _QMIN, _QMAX)


class WeightQDQ(nn.Module):
    """A weight-quantized layer as deployed: `functional(x, DQ(Q(weight)), bias)` + fused activation.

    The weight is already on TF's grid, so ONNX's rounding recovers TF's codes exactly; it is a persistent
    buffer so the tracer keeps weight -> Q -> DQ as ops (a constant would be folded away)."""

    def __init__(self, layer: WeightQuantizedModule) -> None:
        super().__init__()
        weight, scales, bias = layer.export_weights()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.scales = scales  # a plain tensor: a Constant in the ONNX graph
        self.per_channel = bool(layer.weight_quant.per_channel)
        self.axis, self.act = int(layer.weight_axis), layer.act
        self._functional: Callable = layer.functional
        self.linear = isinstance(layer, QLinear)

    def extra_repr(self) -> str:
        return f"{'per-channel axis ' + str(self.axis) if self.per_channel else 'per-tensor'}, act={self.act}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.per_channel:
            zeros = torch.zeros(self.scales.shape, dtype=torch.int32)
            w = torch.fake_quantize_per_channel_affine(self.weight, self.scales, zeros, self.axis, _QMIN, _QMAX)
        else:
            w = torch.fake_quantize_per_tensor_affine(self.weight, self.scales.reshape(()),
                                                      torch.tensor(0, dtype=torch.int32), _QMIN, _QMAX)
        if self.linear and x.dim() > 2:  # (N, T, ..., F): Gemm on the (N*T*..., F) view -> FULLY_CONNECTED
            y = self._functional(x.reshape(-1, x.shape[-1]), w, self.bias)  # (a 3-D MatMul has no int8 FC form)
            return _activate(y.reshape(*x.shape[:-1], y.shape[-1]), self.act)
        return _activate(self._functional(x, w, self.bias), self.act)


def _tf_gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU written as TF's tf.nn.gelu computes it, which the TFLite converter fuses into one GELU op (exact or
    tanh form); torch's own ONNX decomposition multiplies in another order, which it leaves as float ops."""
    half, one = constant_like(x, 0.5), constant_like(x, 1.0)  # [1]-shaped: see decomposed.constant_like
    if approximate == "tanh":
        inner = constant_like(x, 0.7978845608028654) * (x + constant_like(x, 0.044715) * torch.pow(x, 3))
        return half * x * (one + torch.tanh(inner))
    return half * x * (one + torch.erf(x / constant_like(x, 1.4142135623730951)))


def _gelus_as_tf_writes_them(gm: fx.GraphModule) -> None:
    """Every nn.GELU / F.gelu of the export copy becomes `_tf_gelu`."""
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.GELU):
            approximate = gm.get_submodule(node.target).approximate
        elif node.op == "call_function" and node.target is F.gelu:
            approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        else:
            continue
        node.op, node.target = "call_function", _tf_gelu
        node.args, node.kwargs = (node.args[0], approximate), {}
    gm.recompile()


@dataclass
class ExportGraph:
    """The converted copy and what it was built with."""

    module: fx.GraphModule  # eval mode; trace it with torch.onnx
    points: dict[str, ActivationQDQ]  # QuantPoint key -> its Q/DQ, in graph order
    labels: dict[str, str]  # QuantPoint key -> torch op label (module path)
    weights: dict[str, WeightQDQ]  # module path of a weight-quantized layer -> its Q/DQ op, in graph order
    snaps: list[SnapRecord]  # every range whose deployed form differs from the model's stored one


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


@torch.no_grad()
def build_export_graph(model: fx.GraphModule) -> ExportGraph:
    """A deep copy of a (validated) QAT model converted for export; `model` itself is left as it is."""
    snaps = planned_snaps(model)
    gm = copy.deepcopy(model).eval()
    detach_point_hooks(gm)  # exact numerics' hooks: the deployed graph is the "tf" one with Q/DQ points
    points: dict[str, ActivationQDQ] = {}
    labels: dict[str, str] = {}
    for info in quant_points(gm):
        r = point_module(gm, info.key).quantizer.snapped()
        points[info.key] = ActivationQDQ(r.scale, int8_zero_point(r.zero_point))
        labels[info.key] = info.label
    weights: dict[str, WeightQDQ] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), WeightQuantizedModule):
            weights[str(node.target)] = WeightQDQ(gm.get_submodule(node.target))
    for key, qdq in points.items():
        getattr(gm, POINTS)[key] = qdq
    for path, op in weights.items():
        _set_submodule(gm, path, op)
    _gelus_as_tf_writes_them(gm)
    return ExportGraph(gm, points, labels, weights, snaps)
