"""One handler per op kind: how `prepare_qat` fuses the op and where its output's fake-quant point goes.

`HANDLERS[kind](plan, node, detail)` is called for each node in graph order. Adding an op is one rule in
`patterns.py` (what it computes) and one handler here (where the int8 TFLite graph has its tensor).
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
from torch import fx, nn

from .decomposed import adaptive_pool_axis, gather_rows, hardsigmoid_relu6, hardsigmoid_scale
from .modules import Act, QAdd, QConv2d, QLinear
from .patterns import CONSTANT_OPERAND, FIX, OpKind, arg, shape, tensor_inputs
from .placement import Plan, label
from .recurrent import unroll
from .transformer import constant_operands, split_layer_norm, split_multihead_attention

__all__ = ["HANDLERS", "decompose"]

Handler = Callable[[Plan, fx.Node, str], None]
HANDLERS: dict[OpKind, Handler] = {}


def handles(*kinds: OpKind) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        for k in kinds:
            HANDLERS[k] = fn
        return fn
    return register


# -- graph surgery helpers -----------------------------------------------------------------------------
def _single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _next_op(plan: Plan, node: fx.Node) -> fx.Node | None:
    """The op that alone consumes `node`, looking through pass-through ops (Identity, Dropout, DropPath)
    that alone consume it, so conv -> BN -> Identity -> ReLU still fuses."""
    nxt = _single_user(node)
    while plan.is_identity(nxt):
        nxt = _single_user(nxt)
    return nxt


def _fused_act(plan: Plan, node: fx.Node) -> tuple[fx.Node | None, Act | None]:
    nxt = _next_op(plan, node)
    kind = plan.kind(nxt)
    if kind is OpKind.RELU:
        return nxt, Act.RELU
    if kind is OpKind.RELU6:
        return nxt, Act.RELU6
    return None, None


def _drop(plan: Plan, *nodes: fx.Node | None) -> None:
    """Remove fused nodes: each one's users read its input instead (pass-through ops in between stay)."""
    for n in nodes:
        if n is not None:
            n.replace_all_uses_with(n.args[0])
            plan.gm.graph.erase_node(n)
            plan.consumed.add(n)


def _replace_module(gm: fx.GraphModule, target: str, new: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, new)


def _weight_kwargs(plan: Plan) -> dict:
    cfg = plan.config
    return {"quant_delay": cfg.quant_delay, "weight_bits": cfg.weight_bits}


# -- handlers ------------------------------------------------------------------------------------------
@handles(OpKind.CONV)
def _conv(plan: Plan, node: fx.Node, detail: str) -> None:
    gm, cfg = plan.gm, plan.config
    bn = _next_op(plan, node)
    if plan.kind(bn) is not OpKind.BN or not _bn_matches(gm, node, bn):
        bn = None
    conv = gm.get_submodule(node.target)
    act_node, act = _fused_act(plan, bn if bn is not None else node)
    if cfg.edgetpu and isinstance(conv, nn.ConvTranspose2d):
        act_node, act = None, None  # TRANSPOSE_CONV with a fused activation is op version 4: compiler 16 rejects it
    elif _crops_output(conv):
        act_node, act = None, None  # the crop (STRIDED_SLICE) sits between TRANSPOSE_CONV and the activation
    bn_mod = gm.get_submodule(bn.target) if bn is not None else None
    _replace_module(gm, node.target, QConv2d(conv, bn_mod, act=act, freeze_bn_delay=cfg.freeze_bn_delay,
                                             bn_stats=cfg.bn_stats, sync_bn=cfg.sync_bn, **_weight_kwargs(plan)))
    _drop(plan, act_node, bn)
    if bn is not None:  # the BN now lives inside the QConv2d only
        parent, _, name = str(bn.target).rpartition(".")
        delattr(gm.get_submodule(parent) if parent else gm, name)
    plan.add_point(node, OpKind.CONV)


def _crops_output(conv: nn.Module) -> bool:
    """A ConvTranspose2d with padding / output_padding: TFLite runs it as TRANSPOSE_CONV then a STRIDED_SLICE that
    crops (or pads) to torch's size, so a following ReLU cannot be fused into the op; it is a RELU of its own."""
    return isinstance(conv, nn.ConvTranspose2d) and (any(conv.padding) or any(conv.output_padding))


def _bn_matches(gm: fx.GraphModule, conv_node: fx.Node, bn_node: fx.Node) -> bool:
    conv, bn = gm.get_submodule(conv_node.target), gm.get_submodule(bn_node.target)
    return isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)) and bn.num_features == conv.out_channels and \
        (isinstance(bn, nn.BatchNorm2d) == isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d)))


@handles(OpKind.BN)
def _lonely_bn(plan: Plan, node: fx.Node, detail: str) -> None:
    """BatchNorm not after a conv (pre-activation nets): a depthwise 1x1 identity conv is put before it and
    the BN folded into that, the exact per-channel affine map TFLite runs as DEPTHWISE_CONV_2D."""
    gm = plan.gm
    bn = gm.get_submodule(node.target)
    if not isinstance(bn, nn.BatchNorm2d) or not bn.affine or not bn.track_running_stats:
        plan.refuse(node, f"{type(bn).__name__} that no conv feeds needs affine=True, track_running_stats=True and "
                    "4-D input to become a depthwise 1x1 conv", "put it right after a Conv2d/Conv1d")
        return
    c = bn.num_features
    conv = nn.Conv2d(c, c, 1, groups=c, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    conv.weight.requires_grad_(False)
    parent, _, name = str(node.target).rpartition(".")
    owner = gm.get_submodule(parent) if parent else gm
    conv_path = f"{parent + '.' if parent else ''}{name}_dwconv"
    owner.add_module(f"{name}_dwconv", conv.to(bn.weight.device))
    with gm.graph.inserting_before(node):
        conv_node = gm.graph.call_module(conv_path, (node.args[0],))
    conv_node.meta = dict(node.meta)
    node.replace_input_with(node.args[0], conv_node)
    plan.kinds[conv_node] = (OpKind.CONV, "")
    _conv(plan, conv_node, "")


@handles(OpKind.LINEAR)
def _linear(plan: Plan, node: fx.Node, detail: str) -> None:
    act_node, act = _fused_act(plan, node)
    _replace_module(plan.gm, node.target, QLinear(plan.gm.get_submodule(node.target), act=act, **_weight_kwargs(plan)))
    _drop(plan, act_node)
    plan.add_point(node, OpKind.LINEAR)


@handles(OpKind.ADD)
def _add(plan: Plan, node: fx.Node, detail: str) -> None:
    gm = plan.gm
    act_node, act = _fused_act(plan, node)
    node.meta["xqat_functional"] = "add"
    target = label(gm, node)
    gm.add_submodule(target, QAdd(act))
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(target, tuple(node.args[:2]))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    plan.consumed.add(node)
    _drop(plan, act_node)
    plan.add_point(new, OpKind.ADD)


@handles(OpKind.RELU, OpKind.RELU6, OpKind.MEAN, OpKind.MUL, OpKind.SUB, OpKind.MATMUL, OpKind.HARDSWISH, OpKind.GELU,
         OpKind.RSQRT)
def _own_range(plan: Plan, node: fx.Node, detail: str) -> None:
    """An op whose output TFLite requantizes to a grid of its own."""
    plan.add_point(node, plan.kinds[node][0])


@handles(OpKind.FIXED)
def _fixed(plan: Plan, node: fx.Node, detail: str) -> None:
    plan.add_point(node, OpKind.FIXED, fixed=detail, observe=False)


@handles(OpKind.CAT)
def _cat(plan: Plan, node: fx.Node, detail: str) -> None:
    s = plan.add_point(node, OpKind.CAT)
    for src in tensor_inputs(node):
        plan.slots.union(plan.slot_of[src], s)


@handles(OpKind.AVGPOOL)
def _avgpool(plan: Plan, node: fx.Node, detail: str) -> None:
    src = tensor_inputs(node)[0]
    plan.add_point(node, OpKind.AVGPOOL, slot=plan.slot_of[src], observe=False, pool_divisor=_pool_divisor(plan, node))


@handles(OpKind.RESIZE)
def _resize(plan: Plan, node: fx.Node, detail: str) -> None:
    """Bilinear resize keeps its input's grid but re-rounds interpolated values: a tied fake quant."""
    plan.add_point(node, OpKind.RESIZE, slot=plan.slot_of[tensor_inputs(node)[0]], observe=False)


@handles(OpKind.SAME_SCALE)
def _same_scale(plan: Plan, node: fx.Node, detail: str) -> None:
    src = tensor_inputs(node)[0]
    if _folds_into_fully_connected(plan, node, src) or _folds_into_batch_matmul(plan, node):
        plan.alias(node, src)
        return
    plan.add_point(node, OpKind.SAME_SCALE, slot=plan.slot_of[src], observe=False, passthrough=True)


def _through_pass(plan: Plan, node: fx.Node) -> fx.Node | None:
    """`node`, or the op after the pass-through ops (Dropout, ...) that start at it."""
    while node is not None and plan.kind(node) is OpKind.PASS_THROUGH:
        node = _single_user(node)
    return node


def _producer(plan: Plan, node: fx.Node) -> fx.Node:
    """The op that computes `node` in TFLite, looking back through ops that are identities there."""
    while plan.kind(node) is OpKind.PASS_THROUGH and tensor_inputs(node):
        node = tensor_inputs(node)[0]
    return node


def _folds_into_fully_connected(plan: Plan, node: fx.Node, src: fx.Node) -> bool:
    """(N, C, 1, 1) -> (N, C) feeding a Linear, from an op other than a global mean: FULLY_CONNECTED reads the
    4-D tensor itself and the converter drops the RESHAPE (e.g. flatten after a global pool over a 1x1 map).
    After a MEAN, onnx2tf keeps the RESHAPE."""
    if len(shape(src)) != 4 or shape(src)[2:] != (1, 1) or shape(node) != shape(src)[:2]:
        return False
    users = list(node.users)
    if not users or any(plan.kind(_through_pass(plan, u)) is not OpKind.LINEAR for u in users):
        return False
    return plan.kind(_producer(plan, src)) is not OpKind.MEAN


def _folds_into_batch_matmul(plan: Plan, node: fx.Node) -> bool:
    """A swap of the last two dims that only matmuls read (q @ k.transpose(-2, -1)): BATCH_MATMUL reads the
    untransposed tensor (adj_y), so the converter drops the TRANSPOSE and its tensor."""
    if node.target not in ("transpose", torch.transpose) or not node.users:
        return False
    rank = len(shape(node))
    dims = {d % rank for d in (arg(node, 1, "dim0"), arg(node, 2, "dim1"))}
    return dims == {rank - 2, rank - 1} and all(plan.kind(u) is OpKind.MATMUL for u in node.users)


@handles(OpKind.PASS_THROUGH)
def _pass_through(plan: Plan, node: fx.Node, detail: str) -> None:
    ins = tensor_inputs(node)
    if ins:
        plan.alias(node, ins[0])


@handles(OpKind.NON_TENSOR, OpKind.CONSTANT)
def _non_tensor(plan: Plan, node: fx.Node, detail: str) -> None:
    return None


@handles(OpKind.UNSUPPORTED)
def _unsupported(plan: Plan, node: fx.Node, detail: str) -> None:
    reason, _, fix = detail.partition(FIX)
    plan.refuse(node, reason, fix)


def _pool_divisor(plan: Plan, node: fx.Node) -> int:
    """Pixels per output of an average pool without padding (0 if padded, ceil-mode or divisor override:
    then the simulation keeps TF's fake-quant rounding)."""
    gm = plan.gm
    m = gm.get_submodule(node.target) if node.op == "call_module" else None
    if isinstance(m, nn.AdaptiveAvgPool2d) or (m is None and node.target is torch.nn.functional.adaptive_avg_pool2d):
        (h, w), (oh, ow) = shape(tensor_inputs(node)[0])[2:], shape(node)[2:]
        return (h // oh) * (w // ow)
    if m is not None:
        k, pad, ceil, div = m.kernel_size, m.padding, m.ceil_mode, m.divisor_override
    else:
        k, pad, ceil, div = arg(node, 1, "kernel_size"), arg(node, 3, "padding", 0), arg(node, 4, "ceil_mode", False), \
            arg(node, 6, "divisor_override")
    kh, kw = (k, k) if isinstance(k, int) else tuple(k)
    padded = any(pad) if isinstance(pad, (tuple, list)) else bool(pad)
    return 0 if (padded or ceil or div) else int(kh * kw)


# -- decompositions: ops TFLite runs as several tensors ------------------------------------------------
def decompose(plan: Plan) -> bool:
    """Rewrite ops that TFLite runs as several ops into those ops; True if the graph changed (shapes and
    kinds are then computed again).

    - SiLU -> x * sigmoid(x): LOGISTIC (fixed 1/256 grid) then MUL (own grid).
    - hard sigmoid -> relu6(x + 3) then * 1/6: ADD+RELU6 and MUL, fixed grids [0, 6] and [0, 1] (decomposed.py).
    - hard swish, with QATConfig(edgetpu=True) only -> x * hardsigmoid(x): HARD_SWISH is a CPU op on the EdgeTPU,
      ADD, MUL, MUL map (elsewhere the one HARD_SWISH op is cheaper and finer).
    - channel shuffle -> reshape, transpose, reshape (ONNX has no channel-shuffle op).
    - LSTM / GRU -> the unrolled time steps (recurrent.py).
    - k.transpose(1, 2) (multi-head split) then .transpose(-2, -1) into a matmul -> one permute (0, 2, 3, 1): the
      converter merges the two TRANSPOSEs into one, whose tensor is the composed one.
    - LayerNorm (last dim) -> mean = MEAN(x), d = x - mean (SUB), MEAN(d * d) (MUL, MEAN), RSQRT, d * rsqrt (MUL),
      * gamma (MUL), + beta (ADD): each an int8 op with its own range (TFLite has no int8 LayerNorm).
    - ADD/SUB/MUL with a number or a parameter operand (x / c is x * (1/c)) -> the op with a constant
      operand quantized as the converter quantizes it (decomposed.constant_like / converter_constant).
    - (N, A*K, H, W) -> view (N, A, K, H, W) -> permute (0, 3, 4, 1, 2) (SSD heads) -> permute (0, 2, 3, 1) then
      reshape (N, H, W, A, K): the same values, with the transpose TFLite's NHWC layout already is (no TRANSPOSE).
    - grouped conv (not depthwise) [+BN][+ReLU] -> chunk + per-group conv[+BN][+ReLU] + concat: the form
      every TFLite backend runs in int8 and the EdgeTPU compiler accepts (it rejects grouped CONV_2D).
    - adaptive average pooling with unequal windows -> GATHER along H and/or W, then AVERAGE_POOL_2D with
      kernel = stride (decomposed.py): both keep the input's grid.
    """
    changed = False
    for node in list(plan.gm.graph.nodes):
        rewrite = _decomposition(plan, node)
        if rewrite is not None:
            rewrite()
            changed = True
    if changed:
        plan.gm.graph.eliminate_dead_code()
        plan.gm.delete_all_unused_submodules()
        plan.gm.recompile()
    return changed


def _decomposition(plan: Plan, node: fx.Node) -> Callable[[], None] | None:
    """The rewrite `decompose` applies to `node` (first match in this order), or None."""
    gm, kind = plan.gm, plan.kind(node)
    if kind is OpKind.SILU:
        return lambda: _split_silu(plan, node)
    if kind is OpKind.HARDSIGMOID or (kind is OpKind.HARDSWISH and plan.config.edgetpu):
        return lambda: _split_hard(plan, node, swish=kind is OpKind.HARDSWISH)
    if kind is OpKind.GROUPED_CONV:
        return lambda: _split_groups(plan, node)
    if kind is OpKind.RECURRENT:
        return lambda: unroll(gm, node)
    if kind is OpKind.ADAPTIVE_AVGPOOL:
        return lambda: _split_adaptive_pool(plan, node)
    if _merges_into_key_transpose(plan, node):
        return lambda: _merge_key_transposes(plan, node)
    if kind is OpKind.MULTIHEAD_ATTENTION:
        return lambda: split_multihead_attention(gm, node)
    if kind is OpKind.LAYER_NORM:
        return lambda: split_layer_norm(gm, node)
    if kind is not None and plan.kinds[node][1] == CONSTANT_OPERAND:
        return lambda: constant_operands(gm, node)
    if _is_channel_shuffle(gm, node) and kind is not None:
        return lambda: _split_channel_shuffle(plan, node)
    if _is_channels_to_last(node):
        return lambda: _channels_last_first(plan, node)
    return None


def _split_silu(plan: Plan, node: fx.Node) -> None:
    gm = plan.gm
    x = node.args[0]
    with gm.graph.inserting_before(node):
        sig = gm.graph.call_function(torch.sigmoid, (x,))
        mul = gm.graph.call_function(operator.mul, (x, sig))
    for new, name in ((sig, "sigmoid"), (mul, "silu")):
        new.meta = {k: v for k, v in node.meta.items() if k != "tensor_meta"}
        new.meta["xqat_functional"] = name
    if node.op == "call_module":  # labels follow the SiLU module's path
        sig.meta["xqat_label"], mul.meta["xqat_label"] = f"{node.target}.sigmoid", str(node.target)
    node.replace_all_uses_with(mul)
    gm.graph.erase_node(node)


def _split_hard(plan: Plan, node: fx.Node, swish: bool) -> None:
    """Hard sigmoid (or hard swish: x times it) as the ops of decomposed.py; labels follow a module's path."""
    gm = plan.gm
    x = arg(node, 0, "input")
    with gm.graph.inserting_before(node):
        shifted = gm.graph.call_function(hardsigmoid_relu6, (x,))
        gate = gm.graph.call_function(hardsigmoid_scale, (shifted,))
        out = gm.graph.call_function(operator.mul, (x, gate)) if swish else gate
    parts = [(shifted, "hardsigmoid_relu6", "relu6"), (gate, "hardsigmoid", "gate")] + \
        ([(out, "hardswish", "")] if swish else [])
    for new, name, suffix in parts:
        new.meta = {k: v for k, v in node.meta.items() if k != "tensor_meta"}
        new.meta["xqat_functional"] = name
        if node.op == "call_module":
            new.meta["xqat_label"] = f"{node.target}.{suffix}" if suffix and new is not out else str(node.target)
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)


def _split_adaptive_pool(plan: Plan, node: fx.Node) -> None:
    """Gather each window's pixels into K rows along H, then W, and average K x K blocks (decomposed.py); labels
    follow a pool module's path: '<pool>.gather_h', '<pool>.gather_w', '<pool>'."""
    gm = plan.gm
    (h, w), (oh, ow) = shape(tensor_inputs(node)[0])[2:], shape(node)[2:]
    (rows, kh), (cols, kw) = adaptive_pool_axis(h, oh), adaptive_pool_axis(w, ow)
    y, parts = arg(node, 0, "input"), []
    with gm.graph.inserting_before(node):
        for dim, index, suffix in ((2, rows, "gather_h"), (3, cols, "gather_w")):
            if index is not None:
                y = gm.graph.call_function(gather_rows, (y, dim, index))
                parts.append((y, suffix))
        if (kh, kw) != (1, 1):  # windows of one pixel each: the gathers alone are the pooling
            y = gm.graph.call_function(torch.nn.functional.avg_pool2d, (y, (kh, kw), (kh, kw)))
            parts.append((y, ""))
    for new, suffix in parts:
        new.meta = {k: v for k, v in node.meta.items() if k != "tensor_meta"}
        new.meta["xqat_functional"] = f"adaptive_avg_pool2d{'_' + suffix if suffix else ''}"
        if node.op == "call_module":
            new.meta["xqat_label"] = f"{node.target}.{suffix}" if suffix else str(node.target)
    node.replace_all_uses_with(y)
    gm.graph.erase_node(node)


def _full_perm(node: fx.Node) -> list[int] | None:
    """The permutation a transpose/permute node applies, as a full list (None for other nodes)."""
    if node.op == "call_method" and node.target == "transpose" or node.op == "call_function" and \
            node.target is torch.transpose:
        rank = len(shape(node))
        perm = list(range(rank))
        a, b = (arg(node, 1, "dim0") % rank, arg(node, 2, "dim1") % rank)
        perm[a], perm[b] = perm[b], perm[a]
        return perm
    return _permute_dims(node)


def _merges_into_key_transpose(plan: Plan, node: fx.Node) -> bool:
    """A swap of the last two dims that only matmuls read, of a transpose/permute that only it reads."""
    if plan.kind(node) is not OpKind.SAME_SCALE or not _folds_into_batch_matmul(plan, node):
        return False
    src = node.args[0]
    return isinstance(src, fx.Node) and len(src.users) == 1 and plan.kind(src) is OpKind.SAME_SCALE and \
        _full_perm(src) is not None


def _merge_key_transposes(plan: Plan, node: fx.Node) -> None:
    gm, src = plan.gm, node.args[0]
    first, second = _full_perm(src), _full_perm(node)
    with gm.graph.inserting_before(node):
        merged = gm.graph.call_method("permute", (src.args[0], *[first[i] for i in second]))
    merged.meta = {"nn_module_stack": src.meta.get("nn_module_stack", {})}
    node.replace_all_uses_with(merged)
    gm.graph.erase_node(node)
    gm.graph.erase_node(src)


def _is_channel_shuffle(gm: fx.GraphModule, node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target is torch.channel_shuffle) or \
        (node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.ChannelShuffle))


def _split_channel_shuffle(plan: Plan, node: fx.Node) -> None:
    gm = plan.gm
    groups = gm.get_submodule(node.target).groups if node.op == "call_module" else arg(node, 1, "groups")
    _, c, *spatial = shape(node)
    with gm.graph.inserting_before(node):
        a = gm.graph.call_method("reshape", (node.args[0], (-1, groups, c // groups, *spatial)))
        b = gm.graph.call_method("transpose", (a, 1, 2))
        out = gm.graph.call_method("reshape", (b, (-1, c, *spatial)))
    for new in (a, b, out):
        new.meta = {"nn_module_stack": node.meta.get("nn_module_stack", {})}
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)


def _permute_dims(node: fx.Node) -> list[int] | None:
    if node.op == "call_method" and node.target == "permute":
        dims = node.args[1:]
    elif node.op == "call_function" and node.target is torch.permute:
        dims = (arg(node, 1, "dims"),)
    else:
        return None
    dims = dims[0] if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims
    return [int(d) for d in dims] if all(isinstance(d, int) for d in dims) else None


def _is_channels_to_last(node: fx.Node) -> bool:
    """permute(0, 3, 4, 1, 2) of a view that split the channels of an (N, C, H, W) tensor into (A, K)."""
    dims = _permute_dims(node)
    src = node.args[0] if node.args else None
    if dims is None or len(dims) != 5 or [d % 5 for d in dims] != [0, 3, 4, 1, 2] or not isinstance(src, fx.Node):
        return False
    if not (src.op == "call_method" and src.target in ("view", "reshape") and len(src.users) == 1):
        return False
    x = src.args[0]
    if not (isinstance(x, fx.Node) and "tensor_meta" in x.meta and "tensor_meta" in src.meta):
        return False
    if len(shape(x)) != 4 or len(shape(src)) != 5:
        return False
    (_, c, h, w), split = shape(x), shape(src)
    return split[3:] == (h, w) and split[1] * split[2] == c


def _channels_last_first(plan: Plan, node: fx.Node) -> None:
    gm, view = plan.gm, node.args[0]
    _, a, k, h, w = shape(view)
    with gm.graph.inserting_before(node):
        nhwc = gm.graph.call_method("permute", (view.args[0], 0, 2, 3, 1))
        out = gm.graph.call_method("reshape", (nhwc, (-1, h, w, a, k)))
    for new in (nhwc, out):
        new.meta = {"nn_module_stack": node.meta.get("nn_module_stack", {})}
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)
    gm.graph.erase_node(view)


def _split_groups(plan: Plan, node: fx.Node) -> None:
    gm = plan.gm
    conv = gm.get_submodule(node.target)
    bn = _next_op(plan, node)
    bn = bn if plan.kind(bn) is OpKind.BN and isinstance(gm.get_submodule(bn.target), nn.BatchNorm2d | nn.BatchNorm1d) \
        else None
    act_node, act = _fused_act(plan, bn if bn is not None else node)
    g, parent_path, _, name = conv.groups, *str(node.target).rpartition(".")
    parent = gm.get_submodule(parent_path) if parent_path else gm
    bn_mod = gm.get_submodule(bn.target) if bn is not None else None
    og = conv.out_channels // g
    outs, stack = [], {"nn_module_stack": node.meta.get("nn_module_stack", {})}
    with gm.graph.inserting_before(node):
        parts = gm.graph.call_function(torch.chunk, (node.args[0], g, 1))
        for i in range(g):
            part = gm.graph.call_function(operator.getitem, (parts, i))
            path = _register(parent, parent_path, f"{name}_g{i}", _group_conv(conv, i, og))
            y = gm.graph.call_module(path, (part,))
            if bn_mod is not None:
                y = gm.graph.call_module(_register(parent, parent_path, f"{path}_bn".rpartition(".")[2],
                                                   _group_bn(bn_mod, i, og)), (y,))
            if act is not None:
                y = gm.graph.call_function(torch.relu if act == Act.RELU else torch.nn.functional.relu6, (y,))
            outs.append(y)
        cat = gm.graph.call_function(torch.cat, (outs, 1))
    for n in gm.graph.nodes:
        if n.op == "call_function" and not n.meta:
            n.meta = dict(stack)
    for n in (act_node, bn, node):
        if n is not None:
            n.replace_all_uses_with(cat)
            gm.graph.erase_node(n)


def _register(parent: nn.Module, parent_path: str, name: str, module: nn.Module) -> str:
    parent.add_module(name, module)
    return f"{parent_path}.{name}" if parent_path else name


@torch.no_grad()
def _group_conv(conv: nn.Conv2d | nn.Conv1d, i: int, og: int) -> nn.Module:
    g = conv.groups
    part = type(conv)(conv.in_channels // g, og, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                      bias=conv.bias is not None, padding_mode=conv.padding_mode)
    part.weight.copy_(conv.weight[i * og:(i + 1) * og])
    if conv.bias is not None:
        part.bias.copy_(conv.bias[i * og:(i + 1) * og])
    return part.to(conv.weight.device)


@torch.no_grad()
def _group_bn(bn: nn.BatchNorm2d | nn.BatchNorm1d, i: int, og: int) -> nn.Module:
    part = type(bn)(og, eps=bn.eps, momentum=bn.momentum, affine=bn.affine, track_running_stats=bn.track_running_stats)
    sl = slice(i * og, (i + 1) * og)
    for name in ("weight", "bias", "running_mean", "running_var"):
        src = getattr(bn, name)
        if src is not None:
            getattr(part, name).copy_(src[sl])
    if bn.track_running_stats:
        part.num_batches_tracked.copy_(bn.num_batches_tracked)
    return part.to(bn.running_mean.device if bn.running_mean is not None else "cpu")
