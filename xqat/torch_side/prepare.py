"""`prepare_qat`: capture a float model with torch.fx, fuse conv/BN/activation groups, and put one
activation fake-quant point at each tensor the int8 TFLite graph will have.

Placement rules (issue "QAT on the torch side"; export-route.md):
- one point after each fused group (Conv2d[+BN][+ReLU/ReLU6], Linear[+ReLU], Add[+ReLU]), none inside;
- on the model input; after global average pooling (own range) and average pooling (its input's range);
- same-scale ops (concat, max pool, avg pool, reshape/flatten, pad) share one range with their inputs, so
  the converter inserts no requantize; concat ranges are observed at the concat output;
- sigmoid/tanh/softmax outputs use TFLite's fixed ranges.
"""

from __future__ import annotations

import contextlib
import copy
import io
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import InputError, NotQATModelError, UnsupportedLayerError
from .config import QATConfig
from .modules import QAdd, QConv2d, QLinear
from .patterns import OpKind, classify, describe, module_path, tensor_inputs
from .quantizers import FIXED_RANGES, ActivationQuantizer, QuantPoint

__all__ = ["prepare_qat", "freeze_ranges", "freeze_bn", "is_qat_model", "quant_points", "qat_config", "PointInfo",
           "require_qat_model", "point_module", "point_key"]

POINTS = "xqat_points"
QUANTIZERS = "xqat_quantizers"


@dataclass
class _Point:
    """A planned quantization point: after `anchor`, in range group `slot`."""

    anchor: fx.Node
    slot: int
    label: str  # module path of the op whose output it quantizes
    kind: OpKind
    observe: bool = True
    passthrough: bool = False
    fixed: str = ""
    pool_divisor: int = 0  # unpadded average pool: pixels per output (TFLite's rounding is simulated)


class _Slots:
    """Union-find over range slots: tied tensors end up in one group with one quantizer."""

    def __init__(self) -> None:
        self.parent: list[int] = []

    def new(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        self.parent[self.find(a)] = self.find(b)


def _error(gm: fx.GraphModule, node: fx.Node, reason: str) -> UnsupportedLayerError:
    path = module_path(gm, node)
    skip = path if node.op == "call_module" else node.name
    return UnsupportedLayerError(
        f"cannot quantize node '{node.name}' (op {describe(gm, node)}) at module path '{path}': {reason}. "
        f"To proceed, change the model, or leave this op in float with QATConfig(skip=[{skip!r}]); "
        "the TFLite model will then not be full-integer (float ops run on the CPU, not the EdgeTPU)."
    )


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        graph = fx.Tracer().trace(model)
    except Exception as e:  # fx raises TraceError, TypeError, NotImplementedError... on dynamic code
        raise UnsupportedLayerError(
            f"torch.fx cannot capture {type(model).__name__}: {type(e).__name__}: {e}. Data-dependent control "
            "flow (if/for on tensor values) cannot be traced: make it static, or move it out of forward()."
        ) from e
    return fx.GraphModule(model, graph, class_name=f"QAT{type(model).__name__}")


def _single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _fused_act(gm, node: fx.Node, kinds: dict) -> tuple[fx.Node | None, str | None]:
    nxt = _single_user(node)
    if nxt is not None and kinds.get(nxt, (None,))[0] in (OpKind.RELU, OpKind.RELU6):
        return nxt, "relu" if kinds[nxt][0] is OpKind.RELU else "relu6"
    return None, None


def prepare_qat(model: nn.Module, example_inputs, config: QATConfig | None = None) -> fx.GraphModule:
    """A QAT copy of `model` whose fake-quant points are exactly the int8 TFLite model's tensors.

    The result is an `nn.Module` (a torch.fx GraphModule): train it with your own loop, call `.eval()`
    for the deterministic simulation, save it with `state_dict()`, and hand it to the exporter.
    `example_inputs` (a tensor or a tuple of tensors) is run once, in eval mode, to learn shapes; the
    result then refuses inputs of another rank, channel count (dim 1) or dtype with an `InputError`.
    """
    config = config or QATConfig()
    was_training = model.training
    gm = _trace(copy.deepcopy(model))
    gm.graph.eliminate_dead_code()
    inputs = _example_tensors(gm, example_inputs, type(model).__name__)
    gm.eval()
    _propagate_shapes(gm, inputs, type(model).__name__)

    if config.edgetpu:
        from ..edgetpu.layers import edgetpu_layer_problems

        problems = edgetpu_layer_problems(gm)
        if problems:
            raise UnsupportedLayerError("QATConfig(edgetpu=True): layers that can never run on the EdgeTPU:\n  "
                                        + "\n  ".join(problems))
    kinds = {n: classify(gm, n) for n in gm.graph.nodes if n.op in ("call_module", "call_function", "call_method")}
    skipped = {n for n in kinds if module_path(gm, n) in config.skip or n.name in config.skip}
    slots, points, slot_of = _Slots(), [], {}

    def add_point(anchor, kind, slot=None, observe=True, passthrough=False, fixed="", pool_divisor=0):
        slot = slots.new() if slot is None else slot
        points.append(_Point(anchor, slot, _label(gm, anchor), kind, observe, passthrough, fixed, pool_divisor))
        slot_of[anchor] = slot
        return slot

    def input_slot(gm, node, src: fx.Node) -> int:
        if src not in slot_of:  # a float (skipped) producer: quantize its output where it is used
            add_point(src, OpKind.SAME_SCALE)
        return slot_of[src]

    consumed: set[fx.Node] = set()
    for node in list(gm.graph.nodes):
        if node.op == "placeholder":
            if _is_tensor_node(node):
                add_point(node, OpKind.SAME_SCALE)
            continue
        if node.op not in ("call_module", "call_function", "call_method") or node in consumed:
            continue
        kind, detail = kinds[node]
        if node in skipped:
            warnings.warn(f"xqat: '{module_path(gm, node)}' ({describe(gm, node)}) stays float: the TFLite model "
                          "will not be full-integer and this op will not run on the EdgeTPU", stacklevel=2)
            if kind is not OpKind.NON_TENSOR:
                add_point(node, OpKind.SAME_SCALE)
            continue
        if kind is OpKind.NON_TENSOR:
            continue
        if kind is OpKind.UNSUPPORTED:
            raise _error(gm, node, detail)
        ins = tensor_inputs(node)
        for src in ins:
            input_slot(gm, node, src)
        if kind is OpKind.CONV:
            end, bn = node, None
            nxt = _single_user(node)
            if nxt is not None and kinds.get(nxt, (None,))[0] is OpKind.BN and nxt not in skipped:
                bn, end = nxt, nxt
            act_node, act = _fused_act(gm, end, kinds)
            if act_node in skipped:
                act_node, act = None, None
            _fuse_conv(gm, node, bn, act_node, act, config)
            consumed.update(n for n in (bn, act_node) if n is not None)
            add_point(node, kind)
        elif kind is OpKind.LINEAR:
            act_node, act = _fused_act(gm, node, kinds)
            _fuse_linear(gm, node, act_node, act, config)
            consumed.update(n for n in (act_node,) if n is not None)
            add_point(node, kind)
        elif kind is OpKind.ADD:
            act_node, act = _fused_act(gm, node, kinds)
            node = _fuse_add(gm, node, act_node, act)
            consumed.update(n for n in (act_node,) if n is not None)
            add_point(node, kind)
        elif kind is OpKind.BN:
            raise _error(gm, node, "BatchNorm2d can only be folded into a Conv2d that feeds it directly (and only it)")
        elif kind in (OpKind.RELU, OpKind.RELU6, OpKind.MEAN):
            add_point(node, kind)
        elif kind is OpKind.FIXED:
            add_point(node, kind, fixed=detail, observe=False)
        elif kind is OpKind.CAT:
            s = add_point(node, kind)
            for src in ins:
                slots.union(slot_of[src], s)
        elif kind is OpKind.AVGPOOL:
            add_point(node, kind, slot=slot_of[ins[0]], observe=False, pool_divisor=_pool_divisor(gm, node))
        elif kind is OpKind.SAME_SCALE:
            add_point(node, kind, slot=slot_of[ins[0]], observe=False, passthrough=True)

    gm.delete_all_unused_submodules()  # BN and activation modules absorbed by fusion
    _install_points(gm, points, slots, config)
    _install_input_checks(gm, inputs)
    gm.graph.lint()
    gm.recompile()
    getattr(gm, QUANTIZERS).xqat_config = config  # a plain Module attribute: survives deepcopy and pickling
    gm.train(was_training)
    return gm


def _example_tensors(gm: fx.GraphModule, example_inputs, model_name: str) -> tuple:
    """`example_inputs` as a tuple, one per model input; tensors must be float with a batch dimension."""
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    required = [n.name for n in placeholders if not n.args]  # no default value
    if not len(required) <= len(inputs) <= len(placeholders):
        raise InputError(f"prepare_qat: {model_name}.forward takes the inputs "
                         f"{[n.name for n in placeholders]}, but {len(inputs)} example input(s) were given")
    for node, x in zip(placeholders, inputs):
        if isinstance(x, np.ndarray):
            raise InputError(f"prepare_qat: example input '{node.name}' is a numpy array; pass a torch tensor "
                             "shaped like a training batch, e.g. torch.from_numpy(x).float()")
        if isinstance(x, torch.Tensor) and (not x.is_floating_point() or x.dim() == 0):
            raise InputError(f"prepare_qat: example input '{node.name}' is a {x.dim()}-D {x.dtype} tensor; QAT "
                             "models take float inputs with a batch dimension (N, C, H, W for images): pass e.g. "
                             "x.float() or x.unsqueeze(0)")
    return inputs


class _ShapeProp(ShapeProp):
    """ShapeProp that remembers the node it is running, so a failure can name the layer."""

    def run_node(self, n: fx.Node):
        self.current = n
        return super().run_node(n)


def _propagate_shapes(gm: fx.GraphModule, inputs: tuple, model_name: str) -> None:
    """Run the example once to record tensor shapes; an example that does not fit names the failing layer
    (ShapeProp's own printed traceback is swallowed; anything else the model prints is passed on)."""
    prop, captured = _ShapeProp(gm), io.StringIO()
    try:
        with torch.no_grad(), contextlib.redirect_stderr(captured):
            prop.propagate(*inputs)
    except Exception as e:
        cause = e.__cause__ if e.__cause__ is not None else e
        node = getattr(prop, "current", None)
        where = f" at '{module_path(gm, node)}' ({describe(gm, node)})" if node is not None else ""
        shapes = ", ".join(f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else repr(x)
                           for x in inputs)
        raise InputError(f"prepare_qat: the example input ({shapes}) does not fit {model_name}{where}: "
                         f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}. Pass an "
                         "example shaped like one training batch (N, C, H, W for images)") from cause
    sys.stderr.write(captured.getvalue())


def _install_input_checks(gm: fx.GraphModule, inputs: tuple) -> None:
    """Put `check_input` right after each model input, so a wrong rank, channel count or dtype fails at once
    with the input's name (it lives in the graph, so it survives deepcopy, pickling and DDP)."""
    for ph, x in zip([n for n in gm.graph.nodes if n.op == "placeholder"], inputs):
        if not isinstance(x, torch.Tensor):
            continue
        with gm.graph.inserting_after(ph):
            c = gm.graph.call_function(check_input, (ph, ph.name, tuple(x.shape), x.dtype))
        c.meta = dict(ph.meta)
        ph.replace_all_uses_with(c, delete_user_cb=lambda user, c=c: user is not c)


def check_input(x, name: str, example_shape: tuple[int, ...], dtype: torch.dtype):
    """`x` unchanged if it can be a batch like the example of `prepare_qat` (same rank, same size in dim 1,
    same dtype; batch and spatial sizes may differ), else InputError naming the input and what it needs."""
    if isinstance(x, fx.Proxy):  # fx re-traces the generated code when a pickled QAT model is loaded: keep the node
        return x.tracer.create_proxy("call_function", check_input, (x, name, example_shape, dtype), {})
    if not isinstance(x, torch.Tensor):
        raise InputError(f"QAT model input '{name}' must be a torch.Tensor, got {type(x).__name__}")
    rank = len(example_shape)
    if x.dim() == rank and x.dtype == dtype and (rank < 2 or x.shape[1] == example_shape[1]):
        return x
    need = f"{rank}-D {str(dtype).replace('torch.', '')}" + (f" with {example_shape[1]} in dim 1" if rank > 1 else "")
    shape = tuple(int(d) for d in x.shape)  # ints, also while torch.onnx traces
    raise InputError(f"QAT model input '{name}' has shape {shape} ({str(x.dtype).replace('torch.', '')}); "
                     f"it needs {need} (prepared with example shape {example_shape}; batch and spatial sizes may "
                     "differ)")


def _pool_divisor(gm: fx.GraphModule, node: fx.Node) -> int:
    """Pixels per output of an average pool without padding (0 if padded, ceil-mode or divisor override:
    then the simulation keeps TF's fake-quant rounding)."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        k, pad, ceil, div = m.kernel_size, m.padding, m.ceil_mode, m.divisor_override
    else:
        def arg(i, name, default):
            return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)

        k, pad, ceil, div = arg(1, "kernel_size", None), arg(3, "padding", 0), arg(4, "ceil_mode", False), \
            arg(6, "divisor_override", None)
    kh, kw = (k, k) if isinstance(k, int) else tuple(k)
    padded = any(pad) if isinstance(pad, (tuple, list)) else bool(pad)
    return 0 if (padded or ceil or div) else int(kh * kw)


def _is_tensor_node(node: fx.Node) -> bool:
    return "tensor_meta" in node.meta and hasattr(node.meta["tensor_meta"], "shape")


def _label(gm: fx.GraphModule, node: fx.Node) -> str:
    """Stable, readable name of the op a point follows: module path, or enclosing path + function name."""
    if node.op == "placeholder":
        return f"input:{node.name}"
    if node.op == "call_module" and "xqat_functional" not in node.meta:
        return str(node.target)
    return node.meta.setdefault("xqat_label", _functional_name(gm, node))


def _functional_name(gm: fx.GraphModule, node: fx.Node) -> str:
    """`<enclosing module path>.<op name>`, numbered within that path in graph order (add, add_1, ...)."""
    path = module_path(gm, node)
    op = node.meta.get("xqat_functional") or getattr(node.target, "__name__", str(node.target)).strip("_")
    base = op if path == "<top>" else f"{path}.{op}"
    taken = gm.meta.setdefault("xqat_labels", set())
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


def _replace_module(gm: fx.GraphModule, target: str, new: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, new)


def _drop(gm: fx.GraphModule, keep: fx.Node, *nodes: fx.Node | None) -> None:
    for n in nodes:
        if n is not None:
            n.replace_all_uses_with(keep)
            gm.graph.erase_node(n)


def _fuse_conv(gm, conv_node, bn_node, act_node, act, cfg: QATConfig) -> None:
    conv = gm.get_submodule(conv_node.target)
    bn = gm.get_submodule(bn_node.target) if bn_node is not None else None
    _replace_module(gm, conv_node.target, QConv2d(conv, bn, act, cfg.quant_delay, cfg.freeze_bn_delay,
                                                  cfg.bn_stats, cfg.weight_bits, cfg.sync_bn))
    for n in (act_node, bn_node):  # erase users first
        _drop(gm, conv_node, n)
    if bn_node is not None:  # the BN now lives inside the QConv2d only
        parent, _, name = str(bn_node.target).rpartition(".")
        delattr(gm.get_submodule(parent) if parent else gm, name)


def _fuse_linear(gm, node, act_node, act, cfg: QATConfig) -> None:
    _replace_module(gm, node.target, QLinear(gm.get_submodule(node.target), act, cfg.quant_delay, cfg.weight_bits))
    _drop(gm, node, act_node)


def _fuse_add(gm, node, act_node, act) -> fx.Node:
    node.meta["xqat_functional"] = "add"
    target = _label(gm, node)
    gm.add_submodule(target, QAdd(act))
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(target, tuple(node.args[:2]))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    _drop(gm, new, act_node)
    return new


def _install_points(gm: fx.GraphModule, points: list[_Point], slots: _Slots, cfg: QATConfig) -> None:
    """One ActivationQuantizer per range group (registered once, in `xqat_quantizers`), and a QuantPoint
    call after each anchor. The group's observer is its last concat if it has one, else its first point."""
    groups: dict[int, list[_Point]] = {}
    for p in points:
        groups.setdefault(slots.find(p.slot), []).append(p)
    quantizers, qpoints = nn.ModuleDict(), nn.ModuleDict()
    for members in groups.values():
        fixed = next((p.fixed for p in members if p.fixed), "")
        cats = [p for p in members if p.kind is OpKind.CAT]
        owner = cats[-1] if cats else members[0]
        key = owner.anchor.name
        quantizers[key] = ActivationQuantizer(
            cfg.activation_bits, cfg.ema, cfg.ema_decay, cfg.quant_delay, cfg.learn_ranges,
            cfg.range_warmup_steps, FIXED_RANGES[fixed] if fixed else None, cfg.sync_ranges)
        for p in members:
            observe = p is owner and not fixed
            passthrough = p.passthrough and p is not owner
            qpoints[p.anchor.name] = QuantPoint(quantizers[key], observe, passthrough, group=key, label=p.label,
                                                pool_divisor=p.pool_divisor if p is not owner else 0)
    gm.add_module(QUANTIZERS, quantizers)
    gm.add_module(POINTS, qpoints)
    for p in points:
        with gm.graph.inserting_after(p.anchor):
            q = gm.graph.call_module(f"{POINTS}.{p.anchor.name}", (p.anchor,))
        q.meta = dict(p.anchor.meta)
        p.anchor.replace_all_uses_with(q, delete_user_cb=lambda user, q=q: user is not q)


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
    role: str  # "own": observes its group's range; "tied": uses it; "pass": already on the grid; "fixed"


def quant_points(model: nn.Module) -> list[PointInfo]:
    """The activation fake-quant points of a QAT model, in graph (execution) order."""
    if not is_qat_model(model):
        raise UnsupportedLayerError(f"{type(model).__name__} was not made by xqat.prepare_qat")
    out = []
    for n in model.graph.nodes:
        if n.op == "call_module" and str(n.target).startswith(POINTS + "."):
            qp = model.get_submodule(n.target)
            out.append(PointInfo(str(n.target)[len(POINTS) + 1:], qp.label, qp.group, qp.role))
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
    if not is_qat_model(model):
        raise UnsupportedLayerError(f"{type(model).__name__} was not made by xqat.prepare_qat")
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
