"""QAT compute modules: fused Conv2d(+BN)(+ReLU/ReLU6), Linear(+ReLU), Add(+ReLU), and the float ops
that sit between quantization points. Activation fake quant is not here: `prepare_qat` puts a
`QuantPoint` after each module, exactly where the int8 TFLite graph has a tensor.

BN folding in training follows tf.contrib.quantize / Jacob et al. (docs/numerics.md#bn-folding).
"""

from __future__ import annotations

import warnings
from enum import StrEnum
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .qparams import int32_bias, nudge
from .quantizers import ActivationQuantizer, WeightQuantizer
from .traced import compiling, exact_cuda_math, select, write_state

__all__ = ["BatchFold", "WeightQuantizedModule", "QConv2d", "QLinear", "QAdd", "ACTIVATIONS", "Act"]


class Act(StrEnum):
    """Activations TFLite fuses into CONV_2D / FULLY_CONNECTED / ADD (equal to the strings "relu", "relu6")."""

    RELU = "relu"
    RELU6 = "relu6"


ACTIVATIONS = (None, Act.RELU, Act.RELU6)


def _activate(y: torch.Tensor, act: str | None) -> torch.Tensor:
    if act == Act.RELU:
        return F.relu(y)
    if act == Act.RELU6:
        return F.hardtanh(y, 0.0, 6.0)
    return y


def _per_channel_shape(w: torch.Tensor, axis: int) -> tuple[int, ...]:
    """Shape that broadcasts a per-output-channel vector along `axis` of a weight like `w`."""
    return tuple(-1 if i == axis else 1 for i in range(w.dim()))


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient is the sum of every rank's gradient, as in SyncBatchNorm's backward."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        t = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


def _sync_var_mean(var: torch.Tensor, mean: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel (biased var, mean, count) of the batch on every rank together, differentiable: the
    count-weighted mean and Chan's pooled variance, what torch.nn.SyncBatchNorm combines (uneven counts ok)."""
    if n == 0:  # an empty local batch still joins the collectives
        var, mean = torch.zeros_like(var), torch.zeros_like(mean)
    total = _AllReduceSum.apply(torch.cat([mean * n, mean.new_full((1,), float(n))]))
    count = total[-1]
    mean_g = total[:-1] / count
    m2 = _AllReduceSum.apply(n * (var + (mean - mean_g).square()))
    return m2 / count, mean_g, int(count)


class BatchFold(NamedTuple):
    """One training step's BN fold with batch statistics: y = conv(x, FQ(weight)) * scale + shift, per channel
    (docs/numerics.md#bn-folding); kept, detached, so exact numerics can build that step's integer layer."""

    weight: torch.Tensor  # w * gamma / sigma_moving, before fake quant
    scale: torch.Tensor  # sigma_moving / sigma_batch
    shift: torch.Tensor  # beta - mean_batch * gamma / sigma_batch


class WeightQuantizedModule(nn.Module):
    """Base of every module with quantized weights (QConv2d, QLinear, ...): its step counter drives quant_delay
    and freeze_bn_delay; `export_weights()` gives what the deployed model holds.

    Each subclass provides `functional(x, weight, bias)` (its float op with its hyper-parameters, without the
    fused activation), `act` (None, "relu" or "relu6": the fused activation applied after it), `weight_quant`
    and `weight_axis` (the output-channel axis of the weight), so a conversion can rebuild the deployed op.
    """

    weight_axis: int = 0  # output channels of the weight: 0 for conv / linear (1 for a transposed conv)

    def __init__(self, quant_delay: int) -> None:
        super().__init__()
        self.quant_delay = quant_delay
        self.register_buffer("step", torch.tensor(0, dtype=torch.int64))
        self.link_input(None)

    def link_input(self, quantizer: ActivationQuantizer | None) -> None:
        """The range group of this layer's input (set by prepare_qat): its scale times the weight scales is the
        int32 bias grid of the deployed op, which the inference form simulates (`deployed_bias`)."""
        object.__setattr__(self, "_input_quantizer", quantizer)  # not a submodule: the model owns its quantizers

    def deployed_bias(self, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        """The inference form's bias on the int32 grid the .tflite stores (docs/numerics.md#bias), gradient
        straight through; the float bias while the input is not quantized (no linked or no initialized
        input range, quant_delay) or the layer has no bias."""
        q = getattr(self, "_input_quantizer", None)  # absent in modules pickled before it existed
        if bias is None or q is None:
            return bias
        if compiling():  # the same choice as a tensor condition, the input scale as a tensor (no host sync)
            active = (q.step > 0) | (q.fixed or q.ema == "tfmot")
            if q.training:
                active = active & (q.step > q.quant_delay)
            g = nudge(q.min.detach(), q.max.detach(), q.num_bits, False)
            deployed = int32_bias(bias, g.scale, g.zero_point, self.weight_quant.scales(weight))
            return select(active, bias + (deployed - bias).detach(), bias)
        if not q.initialized or (q.training and int(q.step) <= q.quant_delay):
            return bias
        return bias + (int32_bias(bias, *q.scale_zero_point(), self.weight_quant.scales(weight)) - bias).detach()

    def _deployed_bias_if(self, quant: bool | torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor | None) -> torch.Tensor | None:
        """`deployed_bias` while weights are quantized in this forward (`quant` from `_tick`), else the float bias."""
        if bias is None:
            return bias
        if isinstance(quant, torch.Tensor):
            return select(quant, self.deployed_bias(weight, bias), bias)
        return self.deployed_bias(weight, bias) if quant else bias

    def functional(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The float op with this module's hyper-parameters, without the fused activation."""
        raise NotImplementedError

    @torch.no_grad()
    def export_weights(self, folded: tuple[torch.Tensor, torch.Tensor | None] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(fake-quantized folded weight, its TF scale(s), bias on its int32 grid as float): what the deployed
        model holds, for the eval fold or a given (weight, bias) fold (a training step's, `BatchFold`); the
        converter then stores that bias's codes exactly. Scales are positive (an all-zero channel gets the
        smallest weight range, `qparams.MIN_WEIGHT_ABSMAX`)."""
        w, b = self.folded() if folded is None else folded
        b = self.deployed_bias(w, b)
        return self.weight_quant(w).detach(), self.weight_quant.scales(w), (b.detach().clone() if b is not None
                                                                           else None)

    def _tick(self) -> bool | torch.Tensor:
        """Count a training step; True when weights are fake-quantized in this forward (under torch.compile a
        bool tensor while quant_delay can still hold)."""
        if not self.training:
            return True
        if compiling():
            write_state(self, "step", self.step + 1)
            return True if self.quant_delay == 0 else self.step > self.quant_delay
        self.step += 1
        return int(self.step) > self.quant_delay

    def _weight_fq(self, quant: bool | torch.Tensor):
        """The weight fake quant of this forward: identity before quant_delay ends."""
        if isinstance(quant, torch.Tensor):
            return lambda w: select(quant, self.weight_quant(w), w)
        return self.weight_quant if quant else (lambda w: w)


class QConv2d(WeightQuantizedModule):
    """Conv2d, depthwise Conv2d, Conv1d or ConvTranspose2d (groups=1) with optional BN folded during
    training and a fused ReLU/ReLU6. Weights are quantized per output channel (`weight_axis`: 0, or 1 for
    the transposed conv, whose weight is (in, out, kh, kw)).

    Without BN: y = conv(x, FQ(w)) + b. With BN before the freeze (docs/numerics.md#bn-folding): the weight is
    fake-quantized as w·γ/σ_moving and the output corrected to the batch statistics,
        y = conv(x, FQ(w·γ/σ_mv)) · σ_mv/σ_B + β − μ_B·γ/σ_B,
    with μ_B, σ_B from the float conv (`bn_stats="float"`, as tf.contrib) or from the quantized conv
    rescaled by σ_mv/γ (`bn_stats="quantized"`, one conv instead of two, as torch.ao); `sync_bn` takes
    them over all torch.distributed ranks (SyncBatchNorm semantics, gradient included). After the freeze,
    in eval and at export: y = conv(x, FQ(w·γ/√(var_mv+ε))) + β + (b − μ_mv)·γ/σ_mv.
    That bias goes on the int32 grid s_in·s_w TFLite stores (`deployed_bias`, docs/numerics.md#bias).
    """

    def __init__(self, conv: nn.Conv2d | nn.Conv1d | nn.ConvTranspose2d, bn: nn.BatchNorm2d | None = None,
                 act: str | None = None, *, quant_delay: int = 0, freeze_bn_delay: int | None = None,
                 bn_stats: str = "quantized", weight_bits: int = 8, sync_bn: bool = False) -> None:
        super().__init__(quant_delay)
        if act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
        if bn_stats not in ("quantized", "float"):
            raise ValueError(f"bn_stats must be 'quantized' or 'float', got {bn_stats!r}")
        if isinstance(conv, nn.ConvTranspose2d) and conv.groups != 1:
            raise ValueError("ConvTranspose2d with groups > 1 has no int8 TFLite kernel")
        self.conv, self.bn, self.act = conv, bn, (Act(act) if act is not None else None)
        self.freeze_bn_delay, self.bn_stats, self.sync_bn = freeze_bn_delay, bn_stats, sync_bn
        self.weight_axis = 1 if isinstance(conv, nn.ConvTranspose2d) else 0
        self.weight_quant = WeightQuantizer(per_channel=True, num_bits=weight_bits, axis=self.weight_axis)
        self.register_buffer("bn_frozen", torch.tensor(False))
        self._bn_frozen = False  # mirror of `bn_frozen` read under torch.compile: freezing recompiles once

    @property
    def is_depthwise(self) -> bool:
        c = self.conv
        return c.groups > 1 and c.groups == c.in_channels

    def extra_repr(self) -> str:
        return f"bn={'folded' if self.bn is not None else 'none'}, act={self.act}"

    def freeze_bn(self) -> None:
        """Freeze BN statistics now: training then uses the moving statistics (the inference form)."""
        self.bn_frozen.fill_(True)
        self._bn_frozen = True

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._bn_frozen = bool(self.bn_frozen)

    def _bn_is_frozen(self) -> bool | torch.Tensor:
        """Whether the fold uses the moving statistics; under torch.compile a bool tensor while freeze_bn_delay
        can still pass."""
        if compiling():
            if self._bn_frozen or self.freeze_bn_delay is None:
                return self._bn_frozen
            frozen = self.bn_frozen | (self.step > self.freeze_bn_delay)
            write_state(self, "bn_frozen", frozen)
            return frozen
        if bool(self.bn_frozen):
            return True
        if self.freeze_bn_delay is not None and int(self.step) > self.freeze_bn_delay:
            self.bn_frozen.fill_(True)
            self._bn_frozen = True
            return True
        return False

    def functional(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The float conv with this layer's stride, padding, dilation and groups (no activation)."""
        c = self.conv
        if isinstance(c, nn.ConvTranspose2d):
            return F.conv_transpose2d(x, weight, bias, c.stride, c.padding, c.output_padding, c.groups, c.dilation)
        return c._conv_forward(x, weight, bias)

    def _conv(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return self.functional(x, w, b)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Eval/export weight and bias: BN folded with the moving statistics, the inference form of
        docs/numerics.md#bn-folding."""
        w, b = self.conv.weight, self.conv.bias
        if self.bn is None:
            return w, b
        bn = self.bn
        factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        b0 = b if b is not None else torch.zeros_like(bn.running_mean)
        return w * factor.reshape(_per_channel_shape(w, self.weight_axis)), bn.bias + (b0 - bn.running_mean) * factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and not compiling():
            with exact_cuda_math():
                return self._forward(x)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        quant = self._tick()
        wq = self._weight_fq(quant)
        frozen = self.bn is None or not self.training or self._bn_is_frozen()
        if isinstance(frozen, torch.Tensor):  # torch.compile, freeze_bn_delay: both forms, one is taken
            return _activate(select(frozen, self._folded_forward(x, wq, quant), self._train_bn_fold(x, wq, ~frozen)),
                             self.act)
        if frozen:
            return _activate(self._folded_forward(x, wq, quant), self.act)
        return _activate(self._train_bn_fold(x, wq), self.act)

    def _folded_forward(self, x: torch.Tensor, wq, quant: bool | torch.Tensor) -> torch.Tensor:
        w, b = self.folded()
        return self.functional(x, wq(w), self._deployed_bias_if(quant, w, b))

    def _train_bn_fold(self, x: torch.Tensor, wq, update: torch.Tensor | None = None) -> torch.Tensor:
        bn, w = self.bn, self.conv.weight
        sigma_mv = torch.sqrt(bn.running_var + bn.eps)
        gamma_over_mv = bn.weight / sigma_mv
        w_fold = w * gamma_over_mv.reshape(_per_channel_shape(w, self.weight_axis))
        y_q = self._conv(x, wq(w_fold), None)
        dims = (0, *range(2, y_q.dim()))
        bshape = _per_channel_shape(y_q, 1)
        if self.bn_stats == "float":
            var_b, mean_b = torch.var_mean(self.functional(x, w, None), dims, correction=0)
        else:  # stats of the quantized conv with the fold undone: y_q · σ_mv/γ ≈ conv(x, w)
            safe = torch.where(gamma_over_mv == 0, torch.ones_like(gamma_over_mv), gamma_over_mv)
            var_q, mean_q = torch.var_mean(y_q, dims, correction=0)
            mean_b, var_b = mean_q / safe, var_q / (safe * safe)
        n = y_q.numel() // y_q.shape[1]
        if self.sync_bn and _world_size() > 1:
            var_b, mean_b, n = _sync_var_mean(var_b, mean_b, n)
        self._update_running_stats(mean_b, var_b, n, update)
        sigma_b = torch.sqrt(var_b + bn.eps)
        scale = (sigma_mv / sigma_b).reshape(bshape)
        shift = (bn.bias - mean_b * bn.weight / sigma_b).reshape(bshape)
        # this step's fold (a plain attribute, not state): exact numerics build the same step's integer layer
        self.batch_fold = BatchFold(w_fold.detach(), scale.detach().reshape(-1), shift.detach().reshape(-1))
        return torch.addcmul(shift, y_q, scale)

    @torch.no_grad()
    def _update_running_stats(self, mean_b, var_b, n: int, update: torch.Tensor | None = None) -> None:
        """BatchNorm2d's own update: momentum, Bessel-corrected variance (n per channel), conv bias in the mean.
        Channels whose batch statistics are NaN/Inf keep their moving statistics (with a warning), so one bad
        batch cannot poison the folded weights of every later step and of the exported model.
        `update` (torch.compile only): a bool tensor, False leaves the statistics as they are."""
        bn = self.bn
        if not bn.track_running_stats:
            return
        if compiling():
            self._update_running_stats_traced(mean_b, var_b, n, update)
            return
        bn.num_batches_tracked += 1
        momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        mean = (mean_b + (self.conv.bias if self.conv.bias is not None else 0.0)).detach()
        var = var_b.detach() * (n / max(n - 1, 1))
        new_mean = bn.running_mean.mul(1 - momentum).add_(mean, alpha=momentum)
        new_var = bn.running_var.mul(1 - momentum).add_(var, alpha=momentum)
        finite = torch.isfinite(new_mean) & torch.isfinite(new_var)
        if not bool(finite.all()):
            warnings.warn(f"xqat: non-finite BN batch statistics in {int((~finite).sum())} of {finite.numel()} "
                          "channels of a folded conv (NaN/Inf activations); those channels keep their moving "
                          "statistics", RuntimeWarning, stacklevel=4)
            new_mean = torch.where(finite, new_mean, bn.running_mean)
            new_var = torch.where(finite, new_var, bn.running_var)
        bn.running_mean.copy_(new_mean)
        bn.running_var.copy_(new_var)

    def _update_running_stats_traced(self, mean_b, var_b, n: int, update: torch.Tensor | None) -> None:
        """`_update_running_stats` as graph code: the same formulas, the non-finite channels masked (no warning)."""
        bn = self.bn
        write_state(bn, "num_batches_tracked", bn.num_batches_tracked + (1 if update is None else update.long()))
        momentum = bn.momentum if bn.momentum is not None else 1.0 / bn.num_batches_tracked.double()
        mean = (mean_b + (self.conv.bias if self.conv.bias is not None else 0.0)).detach()
        var = var_b.detach() * (n / max(n - 1, 1))
        new_mean = bn.running_mean * (1 - momentum) + mean * momentum
        new_var = bn.running_var * (1 - momentum) + var * momentum
        keep = torch.isfinite(new_mean) & torch.isfinite(new_var)
        if update is not None:
            keep = keep & update
        write_state(bn, "running_mean", torch.where(keep, new_mean, bn.running_mean))
        write_state(bn, "running_var", torch.where(keep, new_var, bn.running_var))


class QLinear(WeightQuantizedModule):
    """Linear with per-tensor symmetric weight fake quant and an optional fused ReLU."""

    def __init__(self, linear: nn.Linear, act: str | None = None, *, quant_delay: int = 0,
                 weight_bits: int = 8) -> None:
        super().__init__(quant_delay)
        if act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
        self.linear, self.act = linear, (Act(act) if act is not None else None)
        self.weight_axis = 0
        self.weight_quant = WeightQuantizer(per_channel=False, num_bits=weight_bits)

    def extra_repr(self) -> str:
        return f"act={self.act}"

    def folded(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.linear.weight, self.linear.bias

    def functional(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The float linear op (no activation)."""
        return F.linear(x, weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quant = self._tick()
        w = self._weight_fq(quant)(self.linear.weight)
        b = self._deployed_bias_if(quant, self.linear.weight, self.linear.bias)
        if x.is_cuda and not compiling():
            with exact_cuda_math():
                return _activate(self.functional(x, w, b), self.act)
        return _activate(self.functional(x, w, b), self.act)


class QAdd(nn.Module):
    """Residual add with an optional fused ReLU/ReLU6 (TFLite ADD with a fused activation)."""

    def __init__(self, act: str | None = None) -> None:
        super().__init__()
        self.act = Act(act) if act is not None else None

    def extra_repr(self) -> str:
        return f"act={self.act}"

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return _activate(a + b, self.act)
