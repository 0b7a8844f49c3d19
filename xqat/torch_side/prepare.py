"""`prepare_qat`: capture a float model with torch.fx at the example's shapes, fuse conv/BN/activation
groups, and put one activation fake-quant point at each tensor the int8 TFLite graph will have.

Placement rules (docs/numerics.md):
- one point after each fused group (Conv[+BN][+ReLU/ReLU6], Linear[+ReLU], Add[+ReLU]), none inside;
- on each model input; after ops that requantize (global mean, mul, hardswish, ...) with a range of their own;
- same-scale ops (concat, max/avg pool, reshape/flatten/slice/transpose, pad, resize) share one range with
  their inputs, so the converter inserts no requantize; concat ranges are observed at the concat output;
- ops that are identities in eval or fold away at the example's shape get no point (they alias their input);
- sigmoid/tanh/softmax outputs use TFLite's fixed ranges.
Each op kind's rule is one handler in `handlers.py`; what a node computes is decided in `patterns.py`.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import fx, nn

from ..errors import InputError, NotQATModelError, UnsupportedLayerError
from .capture import check_input, install_input_checks, propagate_shapes, trace
from .config import QATConfig
from .handlers import HANDLERS, decompose
from .modules import QConv2d
from .patterns import OpKind, classify, describe, is_tensor, module_path, tensor_inputs
from .placement import POINTS, QUANTIZERS, Plan, Role, install_points
from .quantizers import QuantPoint

__all__ = ["prepare_qat", "freeze_ranges", "freeze_bn", "is_qat_model", "quant_points", "qat_config", "PointInfo",
           "require_qat_model", "point_module", "point_key", "POINTS", "QUANTIZERS", "check_input"]


def _is_skipped(gm: fx.GraphModule, node: fx.Node, skip: list[str]) -> bool:
    """A node is skipped by its fx name, its module path, or a module path that contains it."""
    path = module_path(gm, node)
    return node.name in skip or any(path == s or path.startswith(s + ".") for s in skip)


def prepare_qat(model: nn.Module, example_inputs, config: QATConfig | None = None) -> fx.GraphModule:
    """A QAT copy of `model` whose fake-quant points are exactly the int8 TFLite model's tensors.

    The result is an `nn.Module` (a torch.fx GraphModule): train it with your own loop, call `.eval()`
    for the deterministic simulation, save it with `state_dict()`, and hand it to the exporter.
    `example_inputs` (a tensor or a tuple of tensors) is run once, in eval mode, to learn shapes: the model
    is captured at that shape (shape-dependent Python becomes static). The result refuses inputs of another
    rank, channel count (dim 1) or dtype with an `InputError`, and warns on another spatial size.
    Every unsupported op is reported at once, each with a fix. This builds the "tf" numerics; `xqat.prepare_qat`
    then applies `config.numerics` (exact numerics live above torch_side, docs/architecture.md).
    """
    config = config or QATConfig()
    was_training = model.training
    name = type(model).__name__
    float_model = copy.deepcopy(model)
    inputs = _example_tensors(float_model, example_inputs, name)
    gm = trace(float_model, inputs)
    gm.graph.eliminate_dead_code()
    gm.eval()
    propagate_shapes(gm, inputs, name)

    if config.edgetpu:
        from ..edgetpu.layers import edgetpu_layer_problems

        problems = edgetpu_layer_problems(gm)
        if problems:
            raise UnsupportedLayerError("QATConfig(edgetpu=True): layers that can never run on the EdgeTPU:\n  "
                                        + "\n  ".join(problems))
    plan = _plan(gm, config)
    if decompose(plan):  # SiLU, grouped convs: rewritten into the ops TFLite runs; classify those again
        propagate_shapes(gm, inputs, name)
        plan = _plan(gm, config)
    for node in list(gm.graph.nodes):
        if node.op == "placeholder":
            if is_tensor(node):
                plan.add_point(node, OpKind.SAME_SCALE)
            continue
        if node.op not in ("call_module", "call_function", "call_method") or node in plan.consumed:
            continue
        kind, detail = plan.kinds[node]
        if node in plan.skipped:
            _keep_float(plan, node, kind)
            continue
        for src in _inputs(plan, node, kind):
            plan.input_slot(src)
        HANDLERS[kind](plan, node, detail)
    if plan.problems:
        raise plan.error()

    gm.delete_all_unused_submodules()  # BN and activation modules absorbed by fusion
    install_points(plan)
    install_input_checks(gm, inputs)
    gm.graph.lint()
    gm.recompile()
    getattr(gm, QUANTIZERS).xqat_config = config  # a plain Module attribute: survives deepcopy and pickling
    gm.train(was_training)
    return gm


def _plan(gm: fx.GraphModule, config: QATConfig) -> Plan:
    calls = [n for n in gm.graph.nodes if n.op in ("call_module", "call_function", "call_method")]
    return Plan(gm, config, kinds={n: classify(gm, n) for n in calls},
                skipped={n for n in calls if _is_skipped(gm, n, config.skip)})


def _inputs(plan: Plan, node: fx.Node, kind: OpKind) -> list[fx.Node]:
    """The activations an op reads (constant operands are quantized by the converter, not at a point)."""
    if kind in (OpKind.NON_TENSOR, OpKind.UNSUPPORTED, OpKind.CONSTANT):
        return []
    return [n for n in tensor_inputs(node) if n.op != "get_attr" and plan.kind(n) is not OpKind.CONSTANT]


def _keep_float(plan: Plan, node: fx.Node, kind: OpKind) -> None:
    """A skipped op is not simulated: it runs in float in training and its output gets a range of its own, so
    the converter can quantize it with TFLite's int8 kernel for it (LeakyReLU -> int8 LEAKY_RELU, seen in the
    .tflite); an op without such a kernel makes the conversion fail."""
    gm = plan.gm
    warnings.warn(f"xqat: '{module_path(gm, node)}' ({describe(gm, node)}) is skipped: it trains in float and its "
                  "output gets its own range; the exported model stays full-integer only if TFLite has an int8 "
                  "kernel for it (the export report checks), and the EdgeTPU may not map it", stacklevel=3)
    if kind is not OpKind.NON_TENSOR and is_tensor(node):
        plan.add_point(node, OpKind.SAME_SCALE)


def _example_tensors(model: nn.Module, example_inputs, model_name: str) -> tuple:
    """`example_inputs` as a tuple, one per model input; tensors must be float with a batch dimension."""
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p.name for p in params if p.default is p.empty]
    if not len(required) <= len(inputs) <= len(params):
        raise InputError(f"prepare_qat: {model_name}.forward takes the inputs "
                         f"{[p.name for p in params]}, but {len(inputs)} example input(s) were given")
    for p, x in zip(params, inputs):
        if isinstance(x, np.ndarray):
            raise InputError(f"prepare_qat: example input '{p.name}' is a numpy array; pass a torch tensor "
                             "shaped like a training batch, e.g. torch.from_numpy(x).float()")
        if isinstance(x, torch.Tensor) and (not x.is_floating_point() or x.dim() == 0):
            raise InputError(f"prepare_qat: example input '{p.name}' is a {x.dim()}-D {x.dtype} tensor; QAT "
                             "models take float inputs with a batch dimension (N, C, H, W for images): pass e.g. "
                             "x.float() or x.unsqueeze(0)")
    return inputs


# -- model-level controls ------------------------------------------------------------------------
def is_qat_model(model: nn.Module) -> bool:
    """True for models made by `prepare_qat`."""
    return isinstance(getattr(model, POINTS, None), nn.ModuleDict) and hasattr(model, QUANTIZERS)


@dataclass(frozen=True)
class PointInfo:
    """A fake-quant point in graph order: its key in `xqat_points`, the op path it follows, its group."""

    key: str
    label: str
    group: str
    role: Role  # own: observes its group's range; tied: uses it; pass: already on the grid; fixed


def quant_points(model: nn.Module) -> list[PointInfo]:
    """The activation fake-quant points of a QAT model, in graph (execution) order."""
    require_qat_model(model, "list its quantization points")
    out = []
    for n in model.graph.nodes:
        if n.op == "call_module" and str(n.target).startswith(POINTS + "."):
            qp = model.get_submodule(n.target)
            out.append(PointInfo(str(n.target)[len(POINTS) + 1:], qp.label, qp.group, Role(qp.role)))
    return out


def require_qat_model(model: nn.Module, purpose: str) -> None:
    """Raise NotQATModelError unless `model` was made by `prepare_qat`; `purpose` says what needed it."""
    if not is_qat_model(model):
        raise NotQATModelError(f"{type(model).__name__} was not made by xqat.prepare_qat, so it cannot be used to "
                               f"{purpose}: call qat = xqat.prepare_qat(model, example_inputs), train or calibrate "
                               "qat, and pass qat")


def point_module(model: nn.Module, key: str) -> QuantPoint:
    """The QuantPoint stored under `key` (a `PointInfo.key`) of a QAT model."""
    return getattr(model, POINTS)[key]


def point_key(node: fx.Node) -> str | None:
    """The QuantPoint key an fx node calls, or None if it is not a fake-quant point."""
    target = str(node.target)
    return target[len(POINTS) + 1:] if node.op == "call_module" and target.startswith(POINTS + ".") else None


def qat_config(model: nn.Module) -> QATConfig:
    """The QATConfig a `prepare_qat` model was made with."""
    require_qat_model(model, "read its QATConfig")
    return getattr(model, QUANTIZERS).xqat_config


def freeze_ranges(model: nn.Module) -> nn.Module:
    """Stop updating every activation range (EMA and learning); quantization continues with them."""
    for q in getattr(model, QUANTIZERS, {}).values():
        q.freeze()
    return model


def freeze_bn(model: nn.Module) -> nn.Module:
    """Freeze the BN statistics of every folded conv now (see QATConfig.freeze_bn_delay)."""
    for m in model.modules():
        if isinstance(m, QConv2d):
            m.freeze_bn()
    return model
