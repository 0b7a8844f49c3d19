"""Capture a float model as a torch.fx graph at the example input's shapes.

Plain symbolic tracing fails on shape-dependent Python (timm's dynamic "SAME" padding reads `x.size()` and
branches on it). `ConcreteTracer` runs every traced op on the example values as it records it, so `.shape`,
`.size()`, `.dim()` and `len()` of a traced tensor are plain ints: such code becomes static at the example's
shape (prepare_qat warns later when training feeds another spatial size). Control flow on tensor *values*
stays an error. torch.nn modules stay `call_module` nodes, so conv/BN/activation fusion can see them.

After capture, functional forms of weight layers (F.conv2d / F.linear / F.batch_norm on a module's own
parameters, as timm's Conv2dSame, Linear and BatchNormAct2d call them) become the equivalent modules.
"""

from __future__ import annotations

import contextlib
import io
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx import _symbolic_trace as _fx_trace
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import InputError, UnsupportedLayerError
from .patterns import describe, is_pass_through_module, module_path

__all__ = ["trace", "propagate_shapes", "install_input_checks", "check_input", "ConcreteTracer"]

_CONCRETE_ATTRS = ("ndim", "dtype", "device", "is_cuda")


class _ConcreteProxy(fx.Proxy):
    """A proxy that also holds the op's value at the example input: shape queries answer with ints, except
    the batch size (dim 0), which stays traced, so the model still takes any batch size."""

    def _value(self):
        return self.node.meta.get("xqat_value")

    def _batch(self) -> fx.Proxy:
        return self.tracer.create_proxy("call_method", "size", (self, 0), {})

    def _shape(self) -> tuple:
        dims = tuple(int(d) for d in self._value().shape)
        return (self._batch(), *dims[1:]) if dims and self.node.meta.get("xqat_batched") else dims

    def __getattr__(self, name: str):
        value = self._value()
        if isinstance(value, torch.Tensor):
            if name in _CONCRETE_ATTRS:
                return getattr(value, name)
            if name == "shape":
                return self._shape()
            if name == "size":
                return lambda dim=None: self._shape() if dim is None else self._shape()[dim]
            if name in ("dim", "ndimension"):
                return value.dim
        return super().__getattr__(name)

    def __len__(self) -> int:
        value = self._value()
        if isinstance(value, (tuple, list)):
            return len(value)
        return super().__len__()

    def __iter__(self):
        value = self._value()
        if isinstance(value, (tuple, list)):  # e.g. `a, b = x.chunk(2, 1)`
            return iter([self[i] for i in range(len(value))])
        return super().__iter__()


def _concrete(a):
    """The example value behind a proxy (recursively in containers)."""
    if isinstance(a, fx.Proxy):
        return a.node.meta.get("xqat_value")
    if isinstance(a, fx.Node):
        return a.meta.get("xqat_value")
    if isinstance(a, (list, tuple)):
        return type(a)(_concrete(x) for x in a)
    if isinstance(a, dict):
        return {k: _concrete(v) for k, v in a.items()}
    if isinstance(a, slice):
        return slice(_concrete(a.start), _concrete(a.stop), _concrete(a.step))
    return a


@contextlib.contextmanager
def _unpatched_modules():
    """nn.Module.__call__/__getattr__ as they are outside tracing: a leaf module runs on the example values
    instead of being traced again (fx patches both while it traces)."""
    call, get = nn.Module.__call__, nn.Module.__getattr__
    nn.Module.__call__, nn.Module.__getattr__ = _fx_trace._orig_module_call, _fx_trace._orig_module_getattr
    try:
        yield
    finally:
        nn.Module.__call__, nn.Module.__getattr__ = call, get


class ConcreteTracer(fx.Tracer):
    """fx.Tracer whose proxies carry the example's values (see the module docstring)."""

    def __init__(self, example_inputs: tuple = ()) -> None:  # no inputs: fx re-tracing a pickled module
        super().__init__()
        self.example_inputs = example_inputs
        self._placeholders = 0

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return super().is_leaf_module(m, module_qualified_name) or is_pass_through_module(m)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ConcreteProxy(node, self)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, *a, **k):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, *a, **k)
        proxy.node.meta["xqat_value"] = self._run(kind, target, args, kwargs)  # only its shape is read
        proxy.node.meta["xqat_batched"] = kind == "placeholder" or any(
            n.meta.get("xqat_batched", False) for n in proxy.node.all_input_nodes)
        return proxy

    @torch.no_grad()
    def _run(self, kind, target, args, kwargs):
        if kind == "placeholder":
            i = self._placeholders
            self._placeholders += 1
            return self.example_inputs[i] if i < len(self.example_inputs) else None
        if kind == "get_attr":
            obj = self.root
            with _unpatched_modules():
                for part in str(target).split("."):
                    obj = getattr(obj, part)
            return obj
        if kind == "output":
            return None
        args, kwargs = _concrete(args), _concrete(kwargs)
        try:
            if kind == "call_function":
                return target(*args, **kwargs)
            if kind == "call_method":
                return getattr(args[0], target)(*args[1:], **kwargs)
            if kind == "call_module":
                with _unpatched_modules():
                    return self.root.get_submodule(target)(*args, **kwargs)
        except Exception:  # noqa: BLE001 -- the value is a convenience; the graph is still right
            return None
        return None


def trace(model: nn.Module, example_inputs: tuple) -> fx.GraphModule:
    """`model` as a GraphModule, traced at the example inputs' shapes, with functional weight layers as modules."""
    training = model.training
    model.eval()
    try:
        graph = ConcreteTracer(example_inputs).trace(model)
    except Exception as e:  # fx raises TraceError, TypeError, NotImplementedError... on dynamic code
        raise UnsupportedLayerError(
            f"torch.fx cannot capture {type(model).__name__}: {type(e).__name__}: {e}. Data-dependent control "
            "flow (if/for on tensor values) cannot be traced: make it static, or move it out of forward()."
        ) from e
    finally:
        model.train(training)
    for n in graph.nodes:
        if n.op == "call_function" and n.target is F.batch_norm and isinstance(n.args[0], fx.Node):
            x = n.args[0].meta.get("xqat_value")
            n.meta["xqat_in_rank"] = x.dim() if isinstance(x, torch.Tensor) else 0
    for n in graph.nodes:
        n.meta.pop("xqat_value", None)
        n.meta.pop("xqat_batched", None)  # example values served tracing only: keep no tensors in the graph
    gm = fx.GraphModule(model, graph, class_name=f"QAT{type(model).__name__}")
    _functional_to_modules(gm)
    return gm


# -- functional weight layers -> modules ---------------------------------------------------------------
def _get_attr(node) -> str | None:
    return str(node.target) if isinstance(node, fx.Node) and node.op == "get_attr" else None


def _arg(node: fx.Node, i: int, name: str, default=None):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _owner(path: str) -> tuple[str, str]:
    parent, _, leaf = path.rpartition(".")
    return parent, leaf


def _new_module_path(gm: fx.GraphModule, parent: str, base: str) -> str:
    owner = gm.get_submodule(parent) if parent else gm
    name, i = base, 0
    while hasattr(owner, name):
        i += 1
        name = f"{base}_{i}"
    return f"{parent}.{name}" if parent else name


def _module_for(gm: fx.GraphModule, node: fx.Node) -> tuple[str, nn.Module] | None:
    """(owner path, module) computing what a functional weight-layer call computes, sharing its parameters."""
    if node.op != "call_function":
        return None
    t = node.target
    if t is F.conv2d or t is torch.conv2d:
        w = _get_attr(_arg(node, 1, "weight"))
        b = _arg(node, 2, "bias")
        if w is None or (b is not None and _get_attr(b) is None):
            return None
        weight = gm.get_parameter(w)
        padding = _arg(node, 4, "padding", 0)
        if isinstance(padding, str):
            return None
        groups = _arg(node, 6, "groups", 1)
        conv = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
                         stride=_arg(node, 3, "stride", 1), padding=padding, dilation=_arg(node, 5, "dilation", 1),
                         groups=groups, bias=b is not None)
        conv.weight = weight
        if b is not None:
            conv.bias = gm.get_parameter(_get_attr(b))
        return _owner(w)[0], conv
    if t is F.linear:
        w = _get_attr(_arg(node, 1, "weight"))
        b = _arg(node, 2, "bias")
        if w is None or (b is not None and _get_attr(b) is None):
            return None
        weight = gm.get_parameter(w)
        lin = nn.Linear(weight.shape[1], weight.shape[0], bias=b is not None)
        lin.weight = weight
        if b is not None:
            lin.bias = gm.get_parameter(_get_attr(b))
        return _owner(w)[0], lin
    if t is F.batch_norm:
        names = [_get_attr(_arg(node, i, k)) for i, k in ((1, "running_mean"), (2, "running_var"),
                                                             (3, "weight"), (4, "bias"))]
        if any(n is None for n in names) or node.meta.get("xqat_in_rank") != 4:
            return None
        mean = gm.get_buffer(names[0])
        bn = nn.BatchNorm2d(mean.shape[0], eps=_arg(node, 7, "eps", 1e-5), momentum=_arg(node, 6, "momentum", 0.1))
        bn.running_mean, bn.running_var = mean, gm.get_buffer(names[1])
        bn.weight, bn.bias = gm.get_parameter(names[2]), gm.get_parameter(names[3])
        return _owner(names[0])[0], bn
    return None


def _functional_to_modules(gm: fx.GraphModule) -> None:
    """F.conv2d / F.linear / F.batch_norm calls on module parameters -> call_module of nn.Conv2d / Linear /
    BatchNorm2d sharing those parameters, so they fuse and quantize exactly like the modules."""
    changed = False
    for node in list(gm.graph.nodes):
        found = _module_for(gm, node)
        if found is None:
            continue
        parent, module = found
        kind = {nn.Conv2d: "conv", nn.Linear: "linear", nn.BatchNorm2d: "bn"}[type(module)]
        path = _new_module_path(gm, parent, kind)
        owner = gm.get_submodule(parent) if parent else gm
        owner.add_module(path.rpartition(".")[2], module)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(path, (node.args[0],))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.graph.eliminate_dead_code()  # the get_attr nodes of the parameters
        gm.recompile()


# -- shapes --------------------------------------------------------------------------------------------
class _ShapeProp(ShapeProp):
    """ShapeProp that remembers the node it is running, so a failure can name the layer."""

    def run_node(self, n: fx.Node):
        self.current = n
        return super().run_node(n)


def propagate_shapes(gm: fx.GraphModule, inputs: tuple, model_name: str) -> None:
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


# -- input checks ----------------------------------------------------------------------------------------
def install_input_checks(gm: fx.GraphModule, inputs: tuple) -> None:
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
    same dtype; batch and spatial sizes may differ), else InputError naming the input and what it needs.

    Another spatial size than the example's gets a warning: prepare_qat decided at the example's shape which
    ops fold away in TFLite and made shape-dependent Python (e.g. "SAME" padding) static at that shape."""
    if isinstance(x, fx.Proxy):  # fx re-traces the generated code when a pickled QAT model is loaded: keep the node
        return x.tracer.create_proxy("call_function", check_input, (x, name, example_shape, dtype), {})
    if not isinstance(x, torch.Tensor):
        raise InputError(f"QAT model input '{name}' must be a torch.Tensor, got {type(x).__name__}")
    rank = len(example_shape)
    if x.dim() == rank and x.dtype == dtype and (rank < 2 or x.shape[1] == example_shape[1]):
        if rank > 2 and tuple(x.shape[2:]) != tuple(example_shape[2:]) and not torch.jit.is_tracing():
            warnings.warn(
                f"xqat: QAT model input '{name}' has spatial size {tuple(int(d) for d in x.shape[2:])}, but "
                f"prepare_qat captured the model at {tuple(example_shape[2:])}: shape-dependent code (padding, "
                "ops that fold away at that size) stays as captured. Prepare with an example of the size you "
                "train and deploy", UserWarning, stacklevel=2)
        return x
    need = f"{rank}-D {str(dtype).replace('torch.', '')}" + (f" with {example_shape[1]} in dim 1" if rank > 1 else "")
    shape = tuple(int(d) for d in x.shape)  # ints, also while torch.onnx traces
    raise InputError(f"QAT model input '{name}' has shape {shape} ({str(x.dtype).replace('torch.', '')}); "
                     f"it needs {need} (prepared with example shape {example_shape}; batch and spatial sizes may "
                     "differ)")
