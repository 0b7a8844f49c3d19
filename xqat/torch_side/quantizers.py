"""Range state of QAT quantizers: EMA / learned activation ranges, last-value symmetric weight ranges.

Quantizers hold statistics and decide the (min, max) to use; the numerics are `fake_quant` and
`fake_quant_per_channel` (TF-exact), so a quantizer has no rounding code of its own.
Formulas: docs/numerics.md#ema (tfmot and tf.contrib zero-debias EMA), docs/numerics.md#quant-delay.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn

from .fake_quant import fake_quant, fake_quant_per_channel
from .qparams import MIN_WEIGHT_ABSMAX, nudge, snap_range
from .traced import compiling, select, write_state

__all__ = ["ActivationQuantizer", "WeightQuantizer", "QuantPoint", "FIXED_RANGES"]

# TFLite's fixed output grids (quantization_spec.md, docs/numerics.md#fixed-output-grids), as FakeQuant ranges that
# nudge to them:
# LOGISTIC/SOFTMAX: scale 1/256, int8 zero point -128; TANH: scale 1/128, zero point 0. Hard sigmoid's two ops
# (decomposed.py): xqat's own choice, the exact value ranges [0, 6] and [0, 1] (scales 6/255 and 1/255).
FIXED_RANGES = {"sigmoid": (0.0, 255.0 / 256.0), "softmax": (0.0, 255.0 / 256.0), "tanh": (-1.0, 127.0 / 128.0),
                "hardsigmoid_relu6": (0.0, 6.0), "hardsigmoid": (0.0, 1.0)}
_INF = float("inf")


def _all_reduce_(t: torch.Tensor, op) -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op)


class ActivationQuantizer(nn.Module):
    """Per-tensor asymmetric activation range: EMA of batch min/max (always containing 0), optionally
    learned with TF's gradient after a warm-up, or a fixed range (sigmoid/tanh/softmax outputs).
    Under torch.compile it runs as graph code (`_forward_traced`): same state and numerics, no warnings.

    State (all in state_dict): min, max, step (training updates seen), biased_min/max (zero-debias
    accumulators), nan_count (non-finite batches skipped), outlier_count (absurd range jumps), frozen.
    `outliers` / `outlier_factor`: QATConfig.range_outliers / range_outlier_factor.
    """

    def __init__(
        self,
        num_bits: int = 8,
        ema: str = "debias",
        decay: float = 0.999,
        quant_delay: int = 0,
        learn: bool = False,
        warmup: int = 100,
        fixed_range: tuple[float, float] | None = None,
        sync: bool = True,
        outliers: str = "skip",
        outlier_factor: float = 1000.0,
    ) -> None:
        super().__init__()
        self.num_bits, self.ema, self.decay = num_bits, ema, decay
        self.outliers, self.outlier_factor = outliers, outlier_factor
        self.quant_delay, self.learn, self.warmup, self.sync = quant_delay, learn, warmup, sync
        self.fixed = fixed_range is not None
        init = fixed_range if self.fixed else ((-6.0, 6.0) if ema == "tfmot" else (0.0, 0.0))
        mn, mx = torch.tensor(init[0]), torch.tensor(init[1])
        if learn and not self.fixed:
            self.min, self.max = nn.Parameter(mn), nn.Parameter(mx)
        else:
            self.register_buffer("min", mn)
            self.register_buffer("max", mx)
        self.register_buffer("step", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("biased_min", torch.tensor(0.0))
        self.register_buffer("biased_max", torch.tensor(0.0))
        self.register_buffer("nan_count", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("outlier_count", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("frozen", torch.tensor(self.fixed))
        # batches in a row left out as outliers; not in state_dict (a fresh streak after loading)
        self.register_buffer("outlier_streak", torch.tensor(0, dtype=torch.int64), persistent=False)
        self._frozen = self.fixed  # mirror of `frozen` read under torch.compile: freezing recompiles once

    # -- state ---------------------------------------------------------------------------------
    @property
    def initialized(self) -> bool:
        """True once a range exists: fixed, observed at least once, or tfmot's +-6 init."""
        return self.fixed or self.ema == "tfmot" or int(self.step) > 0

    def _learning(self) -> bool:
        return self.learn and not self.fixed and int(self.step) >= self.warmup

    def freeze(self) -> None:
        """Stop range updates (EMA and learning); forward keeps quantizing with the frozen range."""
        self.frozen.fill_(True)
        self._frozen = True
        if isinstance(self.min, nn.Parameter):
            self.min.requires_grad_(False)
            self.max.requires_grad_(False)

    def extra_repr(self) -> str:
        kind = "fixed" if self.fixed else f"ema={self.ema}" + (", learned" if self.learn else "")
        return f"{kind}, bits={self.num_bits}, range=[{float(self.min.detach()):.5g}, {float(self.max.detach()):.5g}]"

    # -- statistics ----------------------------------------------------------------------------
    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """One EMA update from a batch (tfmot / contrib zero-debias, docs/numerics.md#ema), skipping non-finite
        values."""
        x = x.detach()
        if x.numel() == 0:
            from ..errors import InputError

            raise InputError(f"an empty batch (shape {tuple(x.shape)}) reached a quantizer; training batches need "
                             "at least one sample (drop_last=True in the DataLoader avoids a short last batch)")
        bmin, bmax = torch.aminmax(x)  # one pass; NaN/Inf anywhere shows up in these two
        if not bool(torch.isfinite(bmin) & torch.isfinite(bmax)):
            finite = torch.isfinite(x)
            self.nan_count += 1
            warnings.warn(
                f"xqat: non-finite activations (NaN/Inf) reached a quantizer ({int(self.nan_count)} batches so "
                "far); they are left out of the range statistics", RuntimeWarning, stacklevel=3)
            if not bool(finite.any()):
                return
            bmin, bmax = torch.aminmax(x[finite])
        bmin = torch.clamp(bmin.float(), max=0.0)
        bmax = torch.clamp(bmax.float(), min=0.0)
        if self.sync:
            _all_reduce_(bmin, dist.ReduceOp.MIN)
            _all_reduce_(bmax, dist.ReduceOp.MAX)
        if self._absurd_jump(bmin, bmax):
            return
        self.step += 1
        one_minus_decay = torch.tensor(1.0 - self.decay, dtype=torch.float32, device=bmin.device)
        if self.ema == "tfmot":
            # var <- var - (var - r) * float32(1 - decay); no debias, init +-6 (docs/numerics.md#ema)
            self.min.data.sub_((self.min.data - bmin) * one_minus_decay)
            self.max.data.sub_((self.max.data - bmax) * one_minus_decay)
            return
        # tf.contrib assign_moving_average(zero_debias=True): biased <- biased - (biased - r)(1-d);
        # unbiased <- unbiased - (unbiased - biased / (1 - d^t)) (docs/numerics.md#ema)
        self.biased_min.sub_((self.biased_min - bmin) * one_minus_decay)
        self.biased_max.sub_((self.biased_max - bmax) * one_minus_decay)
        debias = 1.0 - torch.pow(1.0 - one_minus_decay, self.step.float())
        self.min.data.sub_(self.min.data - self.biased_min / debias)
        self.max.data.sub_(self.max.data - self.biased_max / debias)

    def _absurd_jump(self, bmin: torch.Tensor, bmax: torch.Tensor) -> bool:
        """True if this batch is to be left out: its range is `outlier_factor` times the current one
        (QATConfig.range_outliers). Counted and warned either way; three in a row are a real shift."""
        span = float(self.max.detach() - self.min.detach())
        if self.outliers == "off" or not self.initialized or span <= 0 or \
                float(bmax - bmin) <= self.outlier_factor * span:
            self.outlier_streak.zero_()
            return False
        self.outlier_count += 1
        self.outlier_streak += 1
        skip = self.outliers == "skip" and int(self.outlier_streak) < 3
        warnings.warn(
            f"xqat: a batch with range [{float(bmin):.3g}, {float(bmax):.3g}] reached a quantizer whose range is "
            f"[{float(self.min.detach()):.3g}, {float(self.max.detach()):.3g}] ({int(self.outlier_count)} such "
            f"batches so far); {'left out of' if skip else 'used in'} the range statistics "
            "(QATConfig.range_outliers)", RuntimeWarning, stacklevel=4)
        return skip

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before outlier_count existed load with a zero count
        state_dict.setdefault(prefix + "outlier_count", torch.zeros((), dtype=torch.int64))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._frozen = bool(self.frozen)

    # -- the torch.compile form ------------------------------------------------------------------
    @torch.no_grad()
    def _observe_traced(self, x: torch.Tensor, active: torch.Tensor | None) -> None:
        """`observe` and `_absurd_jump` as tensor code: every skip (non-finite batch, outlier, `active` False
        while ranges are learned) masks the state update instead of returning. Same float32 formulas."""
        x = x.detach()
        if x.numel() == 0:
            from ..errors import InputError

            raise InputError(f"an empty batch (shape {tuple(x.shape)}) reached a quantizer; training batches need "
                             "at least one sample (drop_last=True in the DataLoader avoids a short last batch)")
        finite = torch.isfinite(x)
        bmin, bmax = torch.where(finite, x, _INF).amin(), torch.where(finite, x, -_INF).amax()
        ok = bmin <= bmax  # some value is finite
        bad = ~finite.all()
        if active is not None:
            ok, bad = ok & active, bad & active
        write_state(self, "nan_count", self.nan_count + bad.long())
        bmin = torch.clamp(bmin.float(), max=0.0)
        bmax = torch.clamp(bmax.float(), min=0.0)
        if self.sync:
            _all_reduce_(bmin, dist.ReduceOp.MIN)
            _all_reduce_(bmax, dist.ReduceOp.MAX)
        update = ok
        if self.outliers != "off":
            span = (self.max.detach() - self.min.detach()).double()
            absurd = ~(span <= 0) & ~((bmax - bmin).double() <= self.outlier_factor * span) & ok
            if self.ema != "tfmot":
                absurd = absurd & (self.step > 0)  # not initialized yet: no range to compare with
            write_state(self, "outlier_count", self.outlier_count + absurd.long())
            streak = torch.where(absurd, self.outlier_streak + 1, 0)
            write_state(self, "outlier_streak", torch.where(ok, streak, self.outlier_streak))
            if self.outliers == "skip":
                update = ok & ~(absurd & (streak < 3))
        write_state(self, "step", self.step + update.long())
        one_minus_decay = torch.tensor(1.0 - self.decay, dtype=torch.float32, device=bmin.device)
        mn, mx = self.min.detach(), self.max.detach()
        if self.ema == "tfmot":
            write_state(self, "min", torch.where(update, mn - (mn - bmin) * one_minus_decay, mn))
            write_state(self, "max", torch.where(update, mx - (mx - bmax) * one_minus_decay, mx))
            return
        biased_min = self.biased_min - (self.biased_min - bmin) * one_minus_decay
        biased_max = self.biased_max - (self.biased_max - bmax) * one_minus_decay
        debias = 1.0 - torch.pow(1.0 - one_minus_decay, self.step.float())
        write_state(self, "min", torch.where(update, mn - (mn - biased_min / debias), mn))
        write_state(self, "max", torch.where(update, mx - (mx - biased_max / debias), mx))
        write_state(self, "biased_min", torch.where(update, biased_min, self.biased_min))
        write_state(self, "biased_max", torch.where(update, biased_max, self.biased_max))

    def _forward_traced(self, x: torch.Tensor, observe: bool) -> torch.Tensor:
        """`forward` as graph code: the frozen flag is a Python guard (it changes once), the step-dependent
        branches (learning after the warm-up, quant_delay, nothing observed yet) are tensor selects."""
        if self.fixed:
            return fake_quant(x, self.min, self.max, self.num_bits)
        training = self.training and not self._frozen
        learning = (self.step >= self.warmup) if self.learn else None
        if training and observe:
            self._observe_traced(x, None if learning is None else ~learning)
        mn, mx = self.min.detach(), self.max.detach()
        if learning is not None and training:  # asked again: this step's observation may end the warm-up
            learning = self.step >= self.warmup
            mn, mx = select(learning, self.min, mn), select(learning, self.max, mx)
        out = fake_quant(x, mn, mx, self.num_bits)
        if self.training:
            return select(self.step <= self.quant_delay, x, out)
        return out if self.ema == "tfmot" else select(self.step == 0, x, out)

    # -- numerics ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, observe: bool = True) -> torch.Tensor:
        if compiling():
            return self._forward_traced(x, observe)
        training = self.training and not bool(self.frozen)
        if training and observe and not self._learning():
            self.observe(x)
        if not self.initialized:
            return x  # nothing observed yet (a follower that runs before its group's observer)
        if self.training and int(self.step) <= self.quant_delay and not self.fixed:
            return x  # quant_delay: ranges collected, quantization not applied yet
        if self._learning() and training:
            return fake_quant(x, self.min, self.max, self.num_bits)
        return fake_quant(x, self.min.detach(), self.max.detach(), self.num_bits)

    def _all_zero(self) -> bool:
        return float(self.min.detach()) == 0.0 and float(self.max.detach()) == 0.0

    def snapped(self):
        """The deployable range: TF's grid for the current (min, max), written so the converter agrees.

        An all-zero range (an all-constant tensor: a dead ReLU, x*0), where TF outputs 0 (docs/numerics.md#edge-cases),
        deploys as the converter's degenerate scale 1.0 (docs/numerics.md#converter-qparams) with the zero point at the
        top of the grid: every x >= 0 (a ReLU output: all of them) still quantizes to exactly 0."""
        if self._all_zero():
            return snap_range(-float((1 << self.num_bits) - 1), 0.0, self.num_bits, False)
        return snap_range(float(self.min.detach()), float(self.max.detach()), self.num_bits, False)

    def scale_zero_point(self) -> tuple[float, int]:
        """TF's (scale, unsigned zero point) for the current range (the deployed grid for an all-zero one)."""
        if self._all_zero():
            r = self.snapped()
            return r.scale, r.zero_point
        g = nudge(self.min.detach(), self.max.detach(), self.num_bits, False)
        return float(g.scale), int(g.zero_point)


class QuantPoint(nn.Module):
    """A place in the graph where a tensor is fake-quantized with a (possibly shared) quantizer.

    `observe=False` marks a tied use (same-scale ops such as concat inputs, pooling, reshape): it applies
    the group's range without updating it. `passthrough=True` marks a point whose input is already on
    the group's grid (max pool, reshape): the simulation skips it, the deployed graph still quantizes there.
    The shared quantizer is registered once, in the model's `xqat_quantizers`, not here.
    """

    def __init__(self, quantizer: ActivationQuantizer, observe: bool = True, passthrough: bool = False,
                 group: str = "", label: str = "", pool_divisor: int = 0) -> None:
        super().__init__()
        object.__setattr__(self, "_quantizer", quantizer)  # not a submodule: one owner per group
        self.observe, self.passthrough, self.group, self.label = observe, passthrough, group, label
        self.pool_divisor = pool_divisor  # > 0: the output of an unpadded average pool over that many pixels

    @property
    def quantizer(self) -> ActivationQuantizer:
        return self._quantizer

    @property
    def role(self) -> str:
        """own (observes the group's range), tied (uses it), pass (input already on the grid), fixed."""
        if self.quantizer.fixed:
            return "fixed"
        return "own" if self.observe else ("pass" if self.passthrough else "tied")

    def extra_repr(self) -> str:
        return f"{self.label}, group={self.group}, {self.role}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.passthrough:
            return x
        if self.pool_divisor:
            return self._average_pool_rounding(x)
        return self.quantizer(x, observe=self.observe)

    def _average_pool_rounding(self, x: torch.Tensor) -> torch.Tensor:
        """TFLite's AVERAGE_POOL_2D rounding on the pooled grid values (same kernel on every backend,
        docs/numerics.md#average-pool):
        sum the integer codes, divide by the pixel count rounding half away from zero in the int8 domain.
        TF's fake quant would round half up in the real domain instead (a -0.18 LSB bias). Gradient: STE."""
        q = self.quantizer
        half_range = 1 << (q.num_bits - 1)
        n = self.pool_divisor
        if compiling():
            mn, mx = q.min.detach(), q.max.detach()
            g = nudge(mn, mx, q.num_bits, False)
            all_zero = (mn == 0) & (mx == 0)  # deployed as scale 1, zero point at the top (see `snapped`)
            scale = torch.where(all_zero, 1.0, g.scale)
            zp = torch.where(all_zero, float((1 << q.num_bits) - 1), g.zero_point) - half_range
            multiplier = (n / scale.double()).float()  # n / scale in double, as the eager Python floats
        else:
            if not q.initialized or (q.training and int(q.step) <= q.quant_delay):
                return x
            scale, zp = q.scale_zero_point()
            zp -= half_range
            multiplier, scale = n / scale, torch.tensor(scale, dtype=torch.float32)
        with torch.no_grad():
            acc = torch.round(x.float() * multiplier) + n * zp  # sum of the n input codes, exactly
            q_out = torch.where(acc > 0, torch.div(acc + n // 2, n, rounding_mode="trunc"),
                                torch.div(acc - n // 2, n, rounding_mode="trunc"))
            out = (q_out.clamp(-half_range, half_range - 1) - zp) * scale
        out = x + (out.to(x.dtype) - x).detach()
        if not compiling():
            return out
        off = torch.zeros((), dtype=torch.bool, device=x.device) if q.fixed or q.ema == "tfmot" else q.step == 0
        if q.training:
            off = off | (q.step <= q.quant_delay)
        return select(off, x, out)


class WeightQuantizer(nn.Module):
    """Symmetric narrow-range weight fake quant, range = max|w| of the current weights (tfmot's
    LastValueQuantizer without the stale-range trap, docs/numerics.md#weight-ranges): per output channel (axis 0) for
    conv and depthwise conv, per tensor for Linear (the converter rejects per-channel FC, docs/numerics.md#weights).
    """

    def __init__(self, per_channel: bool, num_bits: int = 8, axis: int = 0) -> None:
        super().__init__()
        self.per_channel, self.num_bits, self.axis = per_channel, num_bits, axis

    def extra_repr(self) -> str:
        return f"{f'per-channel axis {self.axis}' if self.per_channel else 'per-tensor'}, bits={self.num_bits}, narrow"

    def absmax(self, w: torch.Tensor) -> torch.Tensor:
        """max|w| per channel (or tensor), at least MIN_WEIGHT_ABSMAX: the grid the converter keeps (near-zero
        channels, e.g. after a zero-initialised BN gamma, and all-zero ones)."""
        w = w.detach()
        if self.per_channel:
            m = w.abs().transpose(0, self.axis).reshape(w.shape[self.axis], -1).amax(dim=1).float()
        else:
            m = w.abs().max().float()
        return m.clamp_min(MIN_WEIGHT_ABSMAX)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        m = self.absmax(w)
        if self.per_channel:
            return fake_quant_per_channel(w, -m, m, self.num_bits, narrow_range=True, axis=self.axis)
        return fake_quant(w, -m, m, self.num_bits, narrow_range=True)

    def scales(self, w: torch.Tensor) -> torch.Tensor:
        """TF's per-channel (or per-tensor) scale for these weights: nudge(-m, m, narrow)."""
        m = self.absmax(w)
        return nudge(-m, m, self.num_bits, True).scale
