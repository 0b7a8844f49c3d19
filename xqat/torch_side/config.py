"""QATConfig: every knob of a QAT model in one dataclass (bits, EMA, delays, range learning, skips)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from enum import StrEnum

from ..errors import QATConfigError

__all__ = ["QATConfig", "EMA_MODES", "EmaMode", "BNStats", "OUTLIER_POLICIES", "NUMERICS", "check_numerics"]

OUTLIER_POLICIES = ("skip", "warn", "off")
# "tf": TF's float fake quant; a TFLite backend name (verify/backends.py BACKENDS, checked equal by the tests):
# the integer kernels of that backend (docs/numerics.md#exact-training-numerics)
NUMERICS = ("tf", "xnnpack", "builtin", "reference")


def check_numerics(name) -> str:
    """`name` if it is one of NUMERICS; otherwise QATConfigError naming the choices."""
    if name not in NUMERICS:
        raise QATConfigError(f"numerics must be one of {', '.join(map(repr, NUMERICS))} (\"tf\": TF's fake quant; "
                             f"a backend name: that TFLite backend's integer kernels); got {name!r}")
    return name


class EmaMode(StrEnum):
    """How activation ranges average batch min/max (equal to the strings "debias" and "tfmot")."""

    DEBIAS = "debias"  # tf.contrib.quantize: zero-debiased EMA, first step = batch range
    TFMOT = "tfmot"  # tfmot MovingAverageQuantizer: init +-6, no debias


class BNStats(StrEnum):
    """Where the training-time BN fold takes its batch statistics from."""

    QUANTIZED = "quantized"  # the quantized conv, rescaled (one conv per layer)
    FLOAT = "float"  # a second, float conv (tf.contrib.quantize)


EMA_MODES = tuple(m.value for m in EmaMode)


@dataclass
class QATConfig:
    """How `prepare_qat` quantizes a model.

    - `ema="debias"` (default): bias-corrected EMA as tf.contrib.quantize (zero_debias=True), so the first
      step's range is the batch range. `ema="tfmot"`: tfmot's MovingAverageQuantizer exactly (init +-6, no
      debias, float32 decay applied before the same step's fake quant; docs/numerics.md#ema).
    - `quant_delay`: training steps during which ranges are collected but activations pass unquantized
      (tf.contrib quant_delay, docs/numerics.md#quant-delay). Weights follow the same delay.
    - `freeze_bn_delay`: training steps after which BN statistics are frozen and the fold uses the moving
      statistics only (docs/numerics.md#bn-folding). None: never freeze during training.
    - `learn_ranges`: after `range_warmup_steps` of EMA, activation min/max become trained parameters with
      TF's gradient (docs/numerics.md#gradients).
    - `skip`: module paths (or fx node names) left in float; the TFLite model is then not full-integer.
    - `edgetpu`: refuse, at prepare time, layers that can never run on the EdgeTPU (grouped ConvTranspose2d,
      GELU, LeakyReLU, ...), so you learn it before training; `export_tflite(..., edgetpu=True)` checks again.
      Hardswish is then trained and exported as x * hardsigmoid(x) (ADD, MUL, MUL: EdgeTPU ops).
    - `bn_stats`: where BN batch statistics come from while folding in training: "quantized" (default; the
      quantized conv output rescaled, one conv per layer, as torch.ao) or "float" (a second, float conv,
      exactly as tf.contrib.quantize and Jacob et al.).
    - `sync_ranges`: under torch.distributed, all-reduce batch min/max before each EMA update, so every
      rank keeps the same ranges (those of the global batch).
    - `numerics`: "tf" (default; TF's float fake quant) or a TFLite backend ("xnnpack", "builtin",
      "reference"): the forward then computes, bit for bit, the integer model export would produce for that
      backend, with straight-through gradients of the "tf" path (docs/numerics.md#exact-training-numerics).
      Applied by `xqat.prepare_qat` / `xqat.set_numerics` / `xqat.load_qat`.
    - `sync_bn`: under torch.distributed, compute the BN batch statistics of the training-time fold over
      all ranks, as torch.nn.SyncBatchNorm does (forward and gradient). Off by default, like plain
      BatchNorm under DDP: each rank then folds with its own batch's statistics.
    - `range_outliers`: what an EMA range does with a finite but absurd batch, one whose range is more than
      `range_outlier_factor` times the current one (a 1e30 glitch would otherwise ruin the grid for good):
      "skip" (default; counted in `outlier_count`, warned, left out; a third such batch in a row is taken as
      a real shift and used), "warn" (used, warned, counted) or "off".
    """

    activation_bits: int = 8
    weight_bits: int = 8
    ema: str = "debias"
    ema_decay: float = 0.999
    quant_delay: int = 0
    freeze_bn_delay: int | None = None
    learn_ranges: bool = False
    range_warmup_steps: int = 100
    skip: list[str] = field(default_factory=list)
    bn_stats: str = "quantized"
    edgetpu: bool = False
    sync_ranges: bool = True
    sync_bn: bool = False
    range_outliers: str = "skip"
    range_outlier_factor: float = 1000.0
    numerics: str = "tf"

    def __post_init__(self) -> None:
        for name in ("activation_bits", "weight_bits"):
            bits = getattr(self, name)
            if not isinstance(bits, int) or not 2 <= bits <= 16:
                raise QATConfigError(f"QATConfig.{name} must be an int in 2..16, got {bits!r}")
            if bits != 8:
                warnings.warn(
                    f"QATConfig.{name}={bits}: simulated only. TFLite integer kernels and the EdgeTPU run "
                    "8-bit models; such a model cannot be exported as full-integer TFLite.",
                    stacklevel=3,
                )
        if self.ema not in EMA_MODES:
            raise QATConfigError(f"QATConfig.ema must be one of {EMA_MODES}, got {self.ema!r}")
        self.ema = EmaMode(self.ema).value  # a plain str: checkpoints load with weights_only=True
        if not 0.0 < self.ema_decay < 1.0:
            raise QATConfigError(f"QATConfig.ema_decay must be in (0, 1), got {self.ema_decay}")
        for name in ("quant_delay", "range_warmup_steps"):
            if getattr(self, name) < 0:
                raise QATConfigError(f"QATConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.freeze_bn_delay is not None and self.freeze_bn_delay < 0:
            raise QATConfigError(f"QATConfig.freeze_bn_delay must be >= 0 or None, got {self.freeze_bn_delay}")
        if self.bn_stats not in tuple(BNStats):
            raise QATConfigError(f"QATConfig.bn_stats must be 'quantized' or 'float', got {self.bn_stats!r}")
        if self.range_outliers not in OUTLIER_POLICIES:
            raise QATConfigError(f"QATConfig.range_outliers must be one of {OUTLIER_POLICIES}, "
                                 f"got {self.range_outliers!r}")
        if not self.range_outlier_factor > 1.0:
            raise QATConfigError(f"QATConfig.range_outlier_factor must be > 1, got {self.range_outlier_factor}")
        self.bn_stats = BNStats(self.bn_stats).value
        check_numerics(self.numerics)
        self.skip = list(self.skip)
