"""Torch layers that can never run on the EdgeTPU (docs/edgetpu.md, "PyTorch-side rules").

What xqat rewrites itself is not refused: grouped convs (split per group), SiLU (LOGISTIC + MUL), hard
swish (x * hardsigmoid(x): ADD, MUL, MUL under QATConfig(edgetpu=True)), LSTM and GRU (unrolled into
FULLY_CONNECTED, LOGISTIC, TANH, MUL, ADD, SUB per time step, all in the table), a ReLU after a
ConvTranspose2d (kept as its own RELU under edgetpu=True: a fused TRANSPOSE_CONV is op version 4, which
compiler 16 rejects).

`edgetpu_layer_problems` finds them in a float or prepared model before training, so users change the
architecture before spending compute; `xqat.check_edgetpu` judges the exported file afterwards.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["edgetpu_layer_problems"]

_ACT_FIX = "use nn.ReLU / nn.ReLU6, or nn.SiLU (LOGISTIC + MUL, which the EdgeTPU maps)"
_RESIZE_FIX = "use nn.Upsample(scale_factor=..., mode='nearest')"
_GROUPED_FIX = "use groups=1, or per-group ConvTranspose2d layers + torch.cat"


@dataclass(frozen=True)
class _ModuleRule:
    types: tuple[type[nn.Module], ...]
    check: Callable[[nn.Module], str | None]  # what is wrong, or None
    fix: str


def _grouped(m) -> str | None:
    """Grouped Conv1d/Conv2d are fine: prepare_qat splits them into per-group convs + CONCATENATION, the form
    compiler 16 maps (a grouped CONV_2D, op version 6, it rejects). A grouped transposed conv has no split."""
    if m.groups > 1:
        return (f"grouped ConvTranspose2d (groups={m.groups}) has no int8 TRANSPOSE_CONV form the EdgeTPU runs "
                "(see docs/edgetpu.md)")
    return None


def _dilation(m) -> str | None:
    d = m.dilation if isinstance(m.dilation, tuple) else (m.dilation, m.dilation)
    return f"dilation {d[0]}x{d[1]} differs between H and W" if d[0] != d[1] else None


def _upsample(m) -> str | None:
    mode = getattr(m, "mode", "nearest")
    if isinstance(m, nn.UpsamplingBilinear2d) or mode != "nearest":
        how = "align_corners=True" if getattr(m, "align_corners", False) else "half-pixel centers"
        return f"mode '{mode}' resizes with {how}, which the EdgeTPU does not map"
    return None


def _bidirectional(m) -> str | None:
    return f"bidirectional {type(m).__name__} is not supported (unidirectional only)" if m.bidirectional else None


def _always(reason: str) -> Callable[[nn.Module], str]:
    return lambda m: reason


_MODULE_RULES: tuple[_ModuleRule, ...] = (
    _ModuleRule((nn.ConvTranspose2d,), _grouped, _GROUPED_FIX),
    _ModuleRule((nn.Conv2d,), _dilation, "use the same dilation in H and W"),
    _ModuleRule((nn.LeakyReLU,), _always("LEAKY_RELU is not in the EdgeTPU op table (edgetpu#597)"), _ACT_FIX),
    _ModuleRule((nn.GELU,), _always("GELU (op code 150) is unknown to compiler 16 (edgetpu#818)"), _ACT_FIX),
    _ModuleRule((nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus),
                _always("needs EXP/LOG, which stay on the CPU"), _ACT_FIX),
    _ModuleRule((nn.LogSoftmax,), _always("LOG_SOFTMAX is not in the EdgeTPU op table"),
                "use nn.Softmax on a (1, N) tensor, or move it to postprocessing"),
    _ModuleRule((nn.Upsample, nn.UpsamplingBilinear2d), _upsample, _RESIZE_FIX),
    _ModuleRule((nn.PixelShuffle,), _always("DEPTH_TO_SPACE is not in the EdgeTPU op table"),
                "use nn.ConvTranspose2d or nearest upsampling + conv"),
    _ModuleRule((nn.Conv3d, nn.ConvTranspose3d, nn.MaxPool3d, nn.AvgPool3d, nn.BatchNorm3d),
                _always("works on 5-D tensors; the EdgeTPU maps at most 3 dims > 1"),
                "fold the extra dim into channels or batch-1 2-D layers"),
    _ModuleRule((nn.LSTM, nn.GRU), _bidirectional, "use a unidirectional layer"),
    _ModuleRule((nn.RNN,), _always("RNN ops are not in the EdgeTPU op table, and xqat unrolls only LSTM/GRU"),
                "use nn.LSTM or nn.GRU"),
    _ModuleRule((nn.MultiheadAttention,), _always("its products of two activations are BATCH_MATMUL, which is not in "
                                                  "the EdgeTPU op table: attention blocks run on the CPU"),
                "keep attention out of EdgeTPU models (QATConfig(edgetpu=False))"),
    _ModuleRule((nn.Embedding,), _always("GATHER is not in the EdgeTPU op table"),
                "look embeddings up outside the model"),
)

# Functional calls seen in torch.fx graphs: target -> (what is wrong, fix).
_FUNCTION_RULES: dict[object, tuple[str, str]] = {
    F.leaky_relu: ("LEAKY_RELU is not in the EdgeTPU op table", _ACT_FIX),
    F.gelu: ("GELU (op code 150) is unknown to compiler 16", _ACT_FIX),
    F.elu: ("needs EXP, which stays on the CPU", _ACT_FIX),
    F.selu: ("needs EXP, which stays on the CPU", _ACT_FIX),
    F.mish: ("needs EXP/LOG, which stay on the CPU", _ACT_FIX),
    F.softplus: ("needs EXP/LOG, which stay on the CPU", _ACT_FIX),
    F.log_softmax: ("LOG_SOFTMAX is not in the EdgeTPU op table", "use softmax on a (1, N) tensor"),
    F.pixel_shuffle: ("DEPTH_TO_SPACE is not in the EdgeTPU op table", "use nearest upsampling + conv"),
    F.conv3d: ("works on 5-D tensors", "use 2-D layers"),
    torch.exp: ("EXP is not in the EdgeTPU op table", "avoid exp in the inference graph"),
    **{f: ("a product of two activations (attention) is a BATCH_MATMUL, which is not in the EdgeTPU op table: "
           "attention blocks run on the CPU", "keep attention out of EdgeTPU models (QATConfig(edgetpu=False))")
       for f in (operator.matmul, torch.matmul, torch.bmm)},
}


def _function_problem(node: torch.fx.Node) -> tuple[str, str] | None:
    if node.op != "call_function":
        return None
    if node.target is F.interpolate:
        mode = node.kwargs.get("mode", node.args[3] if len(node.args) > 3 else "nearest")
        if mode != "nearest":
            return f"interpolate mode '{mode}' uses half-pixel centers or align_corners", _RESIZE_FIX
        return None
    return _FUNCTION_RULES.get(node.target)


def _adaptive_pool(module: torch.fx.GraphModule, node: torch.fx.Node) -> str | None:
    """Adaptive average pooling with unequal windows (the map not a multiple of the output): prepare_qat writes it
    as GATHER + AVERAGE_POOL_2D, and GATHER is not in the EdgeTPU op table."""
    pool = (node.op == "call_module" and isinstance(module.get_submodule(node.target), nn.AdaptiveAvgPool2d)) or \
        (node.op == "call_function" and node.target is F.adaptive_avg_pool2d)
    meta = getattr(node.args[0], "meta", {}).get("tensor_meta") if pool and node.args else None
    out = node.meta.get("tensor_meta")
    if meta is None or out is None or len(meta.shape) != 4:
        return None
    (h, w), (oh, ow) = tuple(meta.shape[2:]), tuple(out.shape[2:])
    if h % oh == 0 and w % ow == 0:
        return None
    where = f"{node.target} (AdaptiveAvgPool2d)" if node.op == "call_module" else f"{node.name} (call to " \
        "adaptive_avg_pool2d)"
    return (f"{where}: adaptive average pooling {h}x{w} -> {oh}x{ow} has unequal windows, which run as GATHER + "
            f"AVERAGE_POOL_2D, and GATHER is not in the EdgeTPU op table; fix: an input size whose map here is a "
            f"multiple of {oh}x{ow} (torchvision VGG: 224 px), or "
            "nn.AdaptiveAvgPool2d(1) and the classifier's input size to match")


def _sequence_linear(module: torch.fx.GraphModule, node: torch.fx.Node) -> str | None:
    """A Linear on (N, T, ..., F) with more than one non-unit dim before F: its FULLY_CONNECTED output has more
    than one dim > 1, which compiler 16 leaves on the CPU (docs/sequence-models.md)."""
    if node.op != "call_module" or not isinstance(module.get_submodule(node.target), nn.Linear) or not node.args:
        return None
    meta = getattr(node.args[0], "meta", {}).get("tensor_meta")
    dims = [int(d) for d in getattr(meta, "shape", ())[1:-1]]
    if sum(d > 1 for d in dims) < 1:
        return None
    return (f"{node.target} (Linear): on a {list(meta.shape)} tensor its FULLY_CONNECTED output has more than "
            "one dim > 1, which the EdgeTPU compiler runs on the CPU; fix: a Conv1d(kernel_size=1) on (N, F, T) "
            "(CONV_2D), or apply the Linear to each (N, F) step")


def edgetpu_layer_problems(module: nn.Module) -> list[str]:
    """One line per layer that can never map to the EdgeTPU: module path, class, why, and the fix.

    Walks `named_modules()`; for a torch.fx.GraphModule it also checks functional calls (F.gelu, ...).
    An empty list means no known blocker (the exported .tflite is still checked by `check_edgetpu`)."""
    problems = []
    for path, m in module.named_modules():
        for rule in _MODULE_RULES:
            if isinstance(m, rule.types) and (why := rule.check(m)):
                problems.append(f"{path or '<root>'} ({type(m).__name__}): {why}; fix: {rule.fix}")
    if isinstance(module, torch.fx.GraphModule):
        for node in module.graph.nodes:
            for rule in (_sequence_linear, _adaptive_pool):
                if (why := rule(module, node)) is not None:
                    problems.append(why)
            if (found := _function_problem(node)) is not None:
                name = getattr(node.target, "__name__", str(node.target))
                problems.append(f"{node.name} (call to {name}): {found[0]}; fix: {found[1]}")
    return problems
