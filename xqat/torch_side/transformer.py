"""Graph rewrites for transformer layers, run by `handlers.decompose` before planning (docs/sequence-models.md).

- LayerNorm over the last dim: TFLite has no int8 LayerNorm, so it runs as the int8 ops its formula needs,
  each with its own range: MEAN, SUB (x - mean), MUL (square), MEAN (variance), RSQRT, MUL, MUL gamma, ADD beta.
- nn.MultiheadAttention (self-attention, batch_first): its fused function written out as the ops it computes,
  in-projection (a Linear holding the module's own in_proj parameters), head split, q * 1/sqrt(d_head),
  q @ k^T, softmax, @ v, head merge, out_proj.
- ADD/SUB/MUL with a number or a parameter operand (x * 0.125, q / sqrt(d), x + positional embedding): the
  constant becomes the converter's int8 constant (decomposed.constant_like / converter_constant).
"""

from __future__ import annotations

import math
import operator

import torch
from torch import fx, nn

from .decomposed import constant_like, converter_constant, rsqrt
from .patterns import arg, shape

__all__ = ["constant_operands", "split_layer_norm", "split_multihead_attention"]


def split_multihead_attention(gm: fx.GraphModule, node: fx.Node) -> None:
    """nn.MultiheadAttention as the ops it computes (see the module docstring); its dropout on the attention
    weights becomes an nn.Dropout (an identity in eval)."""
    mha: nn.MultiheadAttention = gm.get_submodule(node.target)
    x, path, g = node.args[0], str(node.target), gm.graph
    _, t, e = shape(x)
    h, dh = mha.num_heads, mha.head_dim
    in_proj = nn.Linear(e, 3 * e, bias=mha.in_proj_bias is not None)
    in_proj.weight = mha.in_proj_weight  # the same Parameter objects: trained in place
    if mha.in_proj_bias is not None:
        in_proj.bias = mha.in_proj_bias
    mha.add_module("in_proj", in_proj)
    mha.add_module("attn_drop", nn.Dropout(mha.dropout))
    with g.inserting_before(node):
        qkv = g.call_method("chunk", (g.call_module(f"{path}.in_proj", (x,)), 3, -1))
        q, k, v = (g.call_method("reshape", (g.call_function(operator.getitem, (qkv, i)), (-1, t, h, dh)))
                   for i in range(3))
        q = g.call_method("transpose", (q, 1, 2))
        q = g.call_function(operator.mul, (q, g.call_function(constant_like, (q, 1.0 / math.sqrt(dh)))))
        scores = g.call_function(operator.matmul, (q, g.call_method("permute", (k, 0, 2, 3, 1))))
        probs = g.call_module(f"{path}.attn_drop", (g.call_function(torch.softmax, (scores, -1)),))
        heads = g.call_function(operator.matmul, (probs, g.call_method("transpose", (v, 1, 2))))
        merged = g.call_method("reshape", (g.call_method("transpose", (heads, 1, 2)), (-1, t, e)))
        out = g.call_module(f"{path}.out_proj", (merged,))
    for n in g.nodes:
        if n.op in ("call_function", "call_method", "call_module") and not n.meta:
            n.meta = {"nn_module_stack": node.meta.get("nn_module_stack", {})}
    for user in list(node.users):
        user.replace_all_uses_with(out)
        g.erase_node(user)
    g.erase_node(node)


def constant_operands(gm: fx.GraphModule, node: fx.Node) -> None:
    """x op c -> x op constant: a number becomes a [1]-shaped constant, a parameter the converter's grid of it;
    x / c becomes x * (1/c)."""
    if node.target in (operator.truediv, torch.div, torch.true_divide, "div", "truediv"):
        node.target = operator.mul if node.op == "call_function" else "mul"
        node.args = (node.args[0], 1.0 / node.args[1])
    args = list(node.args[:2])
    x = next(a for a in args if isinstance(a, fx.Node) and a.op != "get_attr")
    with gm.graph.inserting_before(node):
        for i, a in enumerate(args):
            if isinstance(a, fx.Node) and a.op == "get_attr":
                args[i] = gm.graph.call_function(converter_constant, (a,))
            elif not isinstance(a, fx.Node):
                args[i] = gm.graph.call_function(constant_like, (x, a))
            else:
                continue
            args[i].meta = {"nn_module_stack": node.meta.get("nn_module_stack", {})}
    node.args = (*args, *node.args[2:])


def split_layer_norm(gm: fx.GraphModule, node: fx.Node) -> None:
    """LayerNorm over the last dim as the int8 ops TFLite runs (see `decompose`); labels follow a module's path."""
    if node.op == "call_module":
        ln = gm.get_submodule(node.target)
        eps, x = ln.eps, node.args[0]
        w = f"{node.target}.weight" if ln.weight is not None else None
        b = f"{node.target}.bias" if getattr(ln, "bias", None) is not None else None
        consts = [(gm.graph.get_attr, p) for p in (w, b)]
    else:
        x, eps = node.args[0], arg(node, 4, "eps", 1e-5)
        consts = [(None, arg(node, 2, "weight")), (None, arg(node, 3, "bias"))]
    g = gm.graph
    with g.inserting_before(node):
        mean = g.call_function(torch.mean, (x, -1), {"keepdim": True})
        d = g.call_function(operator.sub, (x, mean))
        var = g.call_function(torch.mean, (g.call_function(operator.mul, (d, d)), -1), {"keepdim": True})
        y = g.call_function(operator.mul, (d, g.call_function(rsqrt, (var, float(eps)))))
        parts = [(mean, "mean"), (d, "centered"), (var.args[0], "square"), (var, "variance"), (y.args[1], "rsqrt"),
                 (y, "normalized")]
        for (get, c), op, name in zip(consts, (operator.mul, operator.add), ("scaled", "shifted")):
            if c is None:
                continue
            c = get(c) if get is not None else c
            y = g.call_function(op, (y, g.call_function(converter_constant, (c,))))
            parts.append((y, name))
    for new in list(g.nodes):
        if new.op in ("call_function", "get_attr") and not new.meta:
            new.meta = {"nn_module_stack": node.meta.get("nn_module_stack", {})}
    for new, name in parts:
        new.meta["xqat_functional"] = name
        if node.op == "call_module":
            new.meta["xqat_label"] = f"{node.target}.{name}"  # not the path itself: an ADD's QAdd goes there
    node.replace_all_uses_with(y)
    g.erase_node(node)
