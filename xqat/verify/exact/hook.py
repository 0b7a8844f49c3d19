"""`ExactPoint`: the point hook that replaces a fake-quant point's output by the device's own value, computed
from the integer codes of the layer's inputs by the backend's kernel, with the "tf" path's gradient
(straight-through: value y_exact, gradient that of y_tf; docs/numerics.md#exact-training-numerics)."""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import EmulationError
from ...torch_side.modules import QConv2d
from .integer_ops import (
    Grid,
    conv_kernel,
    fc_kernel,
    grid_of,
    input_quantizer,
    nhwc,
    op_kernel,
    requantize_kernel,
    transpose_conv_kernel,
)
from .layers import Layer

__all__ = ["ExactPoint", "to_codes", "from_codes"]


def to_codes(x: torch.Tensor, g: Grid) -> torch.Tensor:
    """Values on grid `g` (torch layout) -> int8 codes in TFLite layout (exact: x / s rounds to the code)."""
    q = torch.round(x.detach().float() / g.scale).add_(g.zero_point).clamp_(-128, 127).to(torch.int8)
    return q.permute(0, 2, 3, 1) if q.dim() == 4 else q


def from_codes(q: torch.Tensor, g: Grid, shape) -> torch.Tensor:
    """int8 codes (TFLite layout) -> float32 values (q - zp) * s in torch layout `shape` (one rounding)."""
    v = (q.to(torch.float32) - g.zero_point) * torch.tensor(g.scale, dtype=torch.float32, device=q.device)
    return (v.permute(0, 3, 1, 2) if v.dim() == 4 else v).reshape(shape)


def _active(quantizer) -> bool:
    """The quantizer has a grid this step (observed, and past quant_delay in training)."""
    q = quantizer
    return q.initialized and (q.fixed or not (q.training and int(q.step) <= q.quant_delay))


class ExactPoint(nn.Module):
    """One point's device value; stateless (no parameters or buffers, so state_dict is unchanged)."""

    def __init__(self, backend: str, layer: Layer, point, in_points: list) -> None:
        super().__init__()
        self.backend, self.kind, self.label = backend, layer.kind, layer.label
        self.params = dict(layer.params)
        # references, not submodules: the model owns them (state_dict stays the model's own)
        object.__setattr__(self, "_layer_module", layer.module)
        object.__setattr__(self, "_point", point)
        object.__setattr__(self, "_in_points", list(in_points))
        object.__setattr__(self, "_stochastic", list(layer.stochastic))  # Dropout / DropPath before the point
        object.__setattr__(self, "_cache", (None, None))
        object.__setattr__(self, "producers", [])  # the hooks of `in_points` (set_numerics links them)
        object.__setattr__(self, "_last", (None, None, None))  # weakref to the last output, its codes and grid

    def extra_repr(self) -> str:
        return f"{self.label}: {self.kind} on backend {self.backend!r}"

    def _weights_active(self) -> bool:
        """The layer's weights are fake-quantized this step (past quant_delay in training)."""
        m = self._layer_module
        return not m.training or int(m.step) > m.quant_delay

    def forward(self, y: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        quantizers = [self._point.quantizer] + [p.quantizer for p in self._in_points]
        if not all(_active(q) for q in quantizers) or (self.kind in ("conv", "fc") and not self._weights_active()):
            return y  # no integer model exists yet (ranges not observed, quant_delay): the float path
        if any(m.training for m in self._stochastic):
            return y  # a training step's dropout has no device form: this point keeps the "tf" value
        g_out = grid_of(self._point.quantizer)
        with torch.no_grad():
            codes = self._codes(y, inputs, g_out)
            exact = from_codes(codes, g_out, y.shape).to(y.dtype)
        out = exact + (y - y.detach())  # the device's value, the "tf" path's gradient
        object.__setattr__(self, "_last", (weakref.ref(out), codes, g_out))
        return out

    def _input_codes(self, inputs) -> tuple[list[torch.Tensor], list[Grid]]:
        """Codes and grids of the inputs: the producing hook's own codes when the input is its last output
        (on the grid it was produced with, even if its range moved since), else the values' codes."""
        xs, grids = [], []
        for i, x in enumerate(inputs):
            last = self.producers[i]._last if i < len(self.producers) else (None, None, None)
            if last[0] is not None and last[0]() is x:
                xs.append(last[1])
                grids.append(last[2])
            else:  # values from elsewhere (a teacher-forced run): on the input point's grid
                g = grid_of(self._in_points[i].quantizer)
                xs.append(to_codes(x, g))
                grids.append(g)
        return xs, grids

    def _kernel(self, key, make):
        """One cached kernel: rebuilt when the grids, shapes or weights (tensor versions) change."""
        if key is not None and self._cache[0] == key:
            return self._cache[1]
        k = make()
        object.__setattr__(self, "_cache", (key, k))
        return k

    def _codes(self, y, inputs, g_out: Grid) -> torch.Tensor:
        dev, kind = y.device, self.kind
        if kind == "input":
            x = inputs[0].detach().float()
            x = x.permute(0, 2, 3, 1) if x.dim() == 4 else x
            fn = self._kernel(("input", g_out, tuple(x.shape[1:]), dev),
                              lambda: input_quantizer(g_out, x[0].numel(), self.backend, dev))
            return fn(x.contiguous()).to(torch.int8)
        if kind == "copy":  # max pool / reshape of grid values: the float op already gave the device's codes
            return to_codes(y, g_out)
        xs, g_ins = self._input_codes(inputs)
        shapes = [tuple(x.shape) for x in inputs]
        key = (g_out, tuple(g_ins), tuple(s[1:] for s in shapes), dev)
        if kind == "conv":
            return self._conv(xs[0], shapes[0], y, g_ins[0], g_out, key)
        if kind == "fc":
            m = self._layer_module
            k = self._kernel(key + _versions(m), lambda: fc_kernel(m, self.label, shapes[0], g_ins[0], g_out,
                                                                   self.backend, dev))
            x = xs[0]  # 2-D, or (N, T, D) of a sequence in torch layout: FULLY_CONNECTED on its rows
            return k([x.reshape(-1, x.shape[-1]), None, None]).reshape(*x.shape[:-1], -1)
        if kind == "op":
            return self._op(xs, g_ins, shapes, y, g_out, key)
        raise EmulationError(f"layer {self.label}: no exact kernel for {kind!r}")

    def _op(self, xs, g_ins, shapes, y, g_out: Grid, key) -> torch.Tensor:
        """Any other device op: `layers._op`'s name, options and constants, one kernel call on the real shapes."""
        p, dev = self.params, y.device
        tfl_shapes, out_shape = [nhwc(s) for s in shapes], nhwc(y.shape)
        if p.get("channels_last"):  # (N, C, T) codes in torch layout: TFLite's (N, T, C)
            xs = [x.permute(0, 2, 1) for x in xs]
            tfl_shapes = [(1, s[2], s[1]) for s in shapes]
            out_shape = (1, y.shape[2], y.shape[1]) if y.dim() == 3 else out_shape
        if p.get("torch_layout"):  # a sequence model: TFLite keeps torch's axes, 4-D codes (NHWC) go back to them
            xs = [x.permute(0, 3, 1, 2) if x.dim() == 4 else x for x in xs]
            tfl_shapes, out_shape = [(1, *s[1:]) for s in shapes], (1, *y.shape[1:])
        params = tuple((id(c.source), c.source._version) for c in p["consts"] if getattr(c, "source", None) is not None)
        key = (*key, params)  # a parameter operand (gamma, beta, a positional embedding) changed: rebuilt
        if p["same_grid"] and any(g != g_out for g in g_ins):
            # an input on another grid (its range moved this training step): the converter's requantize first
            xs = [x if g == g_out else requantize_kernel(self.label, tfl_shapes[i], g, g_out, self.backend, dev)([x])
                  for i, (x, g) in enumerate(zip(xs, g_ins))]
            g_ins = [g_out] * len(xs)
            key = (g_out, tuple(g_ins), *key[2:])
        k = self._kernel(key, lambda: op_kernel(p["op"], self.label, tfl_shapes, g_ins, out_shape, g_out,
                                                p["options"], self.backend, dev, p["consts"]))
        out = k(xs)
        if p.get("torch_layout") and out.dim() == 4:
            return out.permute(0, 2, 3, 1)  # `from_codes` reads 4-D codes as NHWC
        return out.permute(0, 2, 1) if p.get("channels_last") and out.dim() == 3 else out

    def _conv(self, x, x_shape, y, g_in: Grid, g_out: Grid, key) -> torch.Tensor:
        m: QConv2d = self._layer_module
        fold = None
        if m.training and m.bn is not None and not bool(m.bn_frozen):
            fold = m.batch_fold  # this step's fold with batch statistics
        if isinstance(m.conv, nn.ConvTranspose2d):
            k = self._kernel(None if fold is not None else key + _versions(m),
                             lambda: transpose_conv_kernel(m, self.label, x_shape, y.shape, g_in, g_out, self.backend,
                                                           y.device, fold))
            return k([x])
        conv1d = x.dim() == 3
        if conv1d:  # codes (N, C, W) -> the CONV_2D view [N, 1, W, C]
            x = x.permute(0, 2, 1).unsqueeze(1)
        pad = m.conv._reversed_padding_repeated_twice
        if any(pad):
            x = F.pad(x, (0, 0, *pad), value=g_in.zero_point)  # out-of-image taps are the code of a real 0
        k = self._kernel(None if fold is not None else key + _versions(m),
                         lambda: conv_kernel(m, self.label, x_shape, y.shape, g_in, g_out, self.backend, y.device,
                                             fold))
        out = k([x, None, None])
        return out.squeeze(1).permute(0, 2, 1) if conv1d else out


def _versions(m: nn.Module) -> tuple:
    """Identity and in-place version of every tensor of a layer: a changed weight or BN statistic rebuilds."""
    return tuple((id(t), t._version) for t in (*m.parameters(), *m.buffers())) + (m.training,)
