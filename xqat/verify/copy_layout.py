"""Where the elements of a copied tensor sit in the .tflite, for layerwise parity.

A point whose torch op only moves elements (a view / flatten / transpose / pad of another point's tensor) has, in
the .tflite, a RESHAPE / TRANSPOSE of that tensor in channels-last layout (or the same tensor: a PAD the converter
folded into the next conv's SAME padding). Its element order then is not torch's, nor the channels-last form of
its own torch shape: a Conv1d's (N, C, W) flattened is W-major in the file, a channel shuffle's (N, 2, C/2, H, W)
view is (N, H, W, 2, C/2). `copy_orders` traces both sides on element indices and says, for each TFLite position,
which torch element is there."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from ..tflite.mapping import TFLiteMapping
from ..tflite.model import TFLiteModel
from ..torch_side.patterns import OpKind, arg, classify, tensor_inputs
from ..torch_side.point_hooks import hook_key
from ..torch_side.prepare import point_key
from .io_match import to_tflite_layout

__all__ = ["copy_orders"]

_RESHAPES = {"view", "reshape", "flatten", "contiguous", "squeeze", "unsqueeze", "view_as", "reshape_as"}
_FUNCTION_RESHAPES = (torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze)


def copy_orders(gm: fx.GraphModule, tfl: TFLiteModel, mapping: TFLiteMapping,
                sequence_layout: bool = False) -> dict[str, np.ndarray]:
    """Point key -> flat indices into its torch tensor (batch 1), in the TFLite tensor's shape, for the copy points
    whose layout the default rule (`io_match.to_tflite_layout`) does not give; the others are left out."""
    tensors = {p.key: p.tensor for p in mapping.points if p.tensor is not None}
    producer = {op.outputs[0]: op for op in tfl.ops if op.outputs}
    shapes = {}
    sources: dict[str, tuple[str, list[fx.Node]]] = {}
    for node in gm.graph.nodes:
        key = point_key(node)
        if key is None or key not in tensors:
            continue
        shapes[key] = tuple(node.meta["tensor_meta"].shape) if "tensor_meta" in node.meta else None
        src = _copy_source(gm, node.args[0])
        if src is not None:
            sources[key] = src
    orders: dict[str, np.ndarray] = {}

    def default(key: str) -> np.ndarray:
        ids = np.arange(int(np.prod(shapes[key]))).reshape(shapes[key])
        return to_tflite_layout(ids, tfl.tensor(tensors[key]).shape, sequence_layout)

    for key, (q, chain) in sources.items():  # graph order: a source's own order is known before its copies
        if q not in tensors or shapes.get(q) is None or shapes.get(key) is None:
            continue
        tp, tq = tensors[key], tensors[q]
        q_ids = orders.get(q)
        q_ids = default(q) if q_ids is None else q_ids
        if tp == tq:
            moved = q_ids
        elif tp in producer and producer[tp].inputs and producer[tp].inputs[0] == tq:
            op = producer[tp]
            if op.name == "RESHAPE":
                moved = q_ids.reshape(tfl.tensor(tp).shape)
            elif op.name == "TRANSPOSE" and tfl.tensor(op.inputs[1]).data is not None:
                moved = q_ids.transpose(np.asarray(tfl.tensor(op.inputs[1]).data, np.int64).reshape(-1))
            else:
                continue
        else:
            continue
        src = _trace(gm, chain, shapes[q])
        if src is None or tuple(src.shape) != (1, *shapes[key][1:]):
            continue
        flat = src.reshape(-1).numpy()
        inv = np.full(int(np.prod(shapes[q])), -1, np.int64)
        where = flat >= 0
        inv[flat[where]] = np.nonzero(where)[0]
        ids = inv[moved]
        if (ids < 0).any() or tuple(ids.shape[1:]) != tuple(tfl.tensor(tp).shape[1:]):
            continue
        if not np.array_equal(ids, default(key)):
            orders[key] = ids
    return orders


def _copy_source(gm: fx.GraphModule, anchor: fx.Node) -> tuple[str, list[fx.Node]] | None:
    """(source point key, the element-moving nodes from it to `anchor`, outermost first), or None."""
    chain: list[fx.Node] = []
    n = anchor
    while True:
        key = point_key(n) or hook_key(n)
        if key is not None:
            return (key, chain) if chain else None
        if not n.op.startswith("call_") or not tensor_inputs(n):
            return None
        if classify(gm, n)[0] not in (OpKind.SAME_SCALE, OpKind.PASS_THROUGH):
            return None
        chain.append(n)
        n = tensor_inputs(n)[0]


def _trace(gm: fx.GraphModule, chain: list[fx.Node], q_shape) -> torch.Tensor | None:
    """The chain's ops applied to the source's element indices (batch 1); -1 marks padding; None if an op is not
    a pure element move xqat knows."""
    t = torch.arange(int(np.prod(q_shape))).reshape(1, *q_shape[1:])
    for n in reversed(chain):
        name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "")
        module = gm.get_submodule(n.target) if n.op == "call_module" else None
        meta = n.meta.get("tensor_meta")
        if (n.op == "call_method" and n.target in _RESHAPES) or n.target in _FUNCTION_RESHAPES or \
                isinstance(module, (nn.Flatten, nn.Unflatten)):
            if meta is None:
                return None
            t = t.reshape(1, *tuple(meta.shape)[1:])
        elif name == "transpose":
            t = t.transpose(int(arg(n, 1, "dim0")), int(arg(n, 2, "dim1")))
        elif name == "permute":
            dims = n.args[1:] if n.op == "call_method" else (arg(n, 1, "dims"),)
            dims = list(dims[0]) if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else list(dims)
            t = t.permute(*[int(d) for d in dims])
        elif n.target is F.pad:
            t = F.pad(t, list(arg(n, 1, "pad")), value=-1)
        elif classify(gm, n)[0] is OpKind.PASS_THROUGH and (module is not None or name in ("dropout", "dropout2d")):
            continue
        else:
            return None
    return t
