"""Training-step time of a MobileNetV2-style model on CPU: float vs xqat QAT vs torch.ao eager QAT.

Run: .venv/bin/python -m benchmarks.qat_step [--batch 16] [--size 96] [--width 0.5]
     .venv/bin/python -m benchmarks.qat_step --exact   # float vs numerics "tf" vs exact "xnnpack" (`exact_numerics`)
Same batch, same model, interleaved repeats; prints median ms and the ratios
(targets: xqat <= 1.5x float, and no slower than torch.ao QAT). "xqat_fused" runs the same numerics
through torch.compile-fused fake-quant kernels (xqat.use_fused_kernels).
"""

from __future__ import annotations

import argparse
import copy
import types
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import xqat
from benchmarks._timing import compare, machine
from xqat.demo.nets import InvertedResidual, MobileNetV2
from xqat.torch_side.fake_quant import use_fused_kernels


def torch_ao_eager_qat(model: nn.Module) -> nn.Module:
    """torch.ao eager-mode QAT of the same net: QuantStub/DeQuantStub, FloatFunctional adds, conv+BN fused,
    default x86 QAT qconfig (eager fusion has no ReLU6 pattern, so ReLU6 keeps its own observer)."""
    import torch.ao.quantization as tq

    m = copy.deepcopy(model)
    for mod in list(m.modules()):
        if isinstance(mod, InvertedResidual):
            mod.skip_add = torch.ao.nn.quantized.FloatFunctional()
            mod.forward = types.MethodType(
                lambda self, x: self.skip_add.add(x, self.conv(x)) if self.use_res else self.conv(x), mod)
    for mod in list(m.modules()):
        if isinstance(mod, nn.Sequential) and len(mod) >= 2 and isinstance(mod[0], nn.Conv2d) \
                and isinstance(mod[1], nn.BatchNorm2d):
            tq.fuse_modules_qat(mod, [["0", "1"]], inplace=True)

    class Wrapped(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.quant, self.inner, self.dequant = tq.QuantStub(), inner, tq.DeQuantStub()

        def forward(self, x):
            return self.dequant(self.inner(self.quant(x)))

    w = Wrapped(m).train()
    w.qconfig = tq.get_default_qat_qconfig("x86")
    return tq.prepare_qat(w, inplace=False)


def main() -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--width", type=float, default=0.5)
    args, _ = ap.parse_known_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 10, (args.batch,))
    base = MobileNetV2(num_classes=10, width_mult=args.width).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models = {
            "float": copy.deepcopy(base).train(),
            "xqat": xqat.prepare_qat(base, x[:1]).train(),
            "xqat_fused": xqat.prepare_qat(base, x[:1]).train(),
            "torch.ao": torch_ao_eager_qat(base),
        }
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3) for k, m in models.items()}

    def step(k):
        def run():
            use_fused_kernels(k == "xqat_fused")
            loss = F.cross_entropy(models[k](x), y)
            opts[k].zero_grad()
            loss.backward()
            opts[k].step()
        return run

    t = compare({k: step(k) for k in models}, repeats=10, warmup=2)
    print(f"QAT training step, MobileNetV2 width {args.width}, batch {args.batch}x3x{args.size}x{args.size}, CPU "
          f"({machine()})")
    for k in models:
        print(f"  {k:9s}: {t[k] * 1e3:8.1f} ms   {t[k] / t['float']:.2f}x float")
    print(f"  xqat / torch.ao eager QAT: {t['xqat'] / t['torch.ao']:.2f}x (fused kernels: "
          f"{t['xqat_fused'] / t['torch.ao']:.2f}x)")
    use_fused_kernels(False)
    return {"xqat_vs_float": t["xqat"] / t["float"], "xqat_vs_torch_ao": t["xqat"] / t["torch.ao"],
            "xqat_fused_vs_float": t["xqat_fused"] / t["float"],
            "xqat_fused_vs_torch_ao": t["xqat_fused"] / t["torch.ao"]}


def exact_numerics() -> dict[str, float]:
    """Step time of exact numerics (QATConfig(numerics="xnnpack"): the integer kernels in the forward) vs the
    "tf" fake quant vs float, same run (goal: exact <= 2x "tf"; docs/benchmarks.md)."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=10)
    args, _ = ap.parse_known_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 10, (args.batch,))
    base = MobileNetV2(num_classes=10, width_mult=args.width).eval()
    models = {"float": copy.deepcopy(base).train(),
              "tf": xqat.prepare_qat(base, x[:1]).train(),
              "xnnpack": xqat.prepare_qat(base, x[:1], xqat.QATConfig(numerics="xnnpack")).train()}
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3) for k, m in models.items()}

    def step(k):
        def run():
            loss = F.cross_entropy(models[k](x), y)
            opts[k].zero_grad()
            loss.backward()
            opts[k].step()
        return run

    def forward(k):
        def run():
            with torch.no_grad():
                models[k].eval()(x)
            models[k].train()
        return run

    t = compare({k: step(k) for k in models}, repeats=args.repeats, warmup=2)
    e = compare({k: forward(k) for k in models}, repeats=args.repeats, warmup=1)
    print(f"QAT numerics, MobileNetV2 width {args.width}, batch {args.batch}x3x{args.size}x{args.size}, CPU "
          f"({machine()})")
    for k in models:
        print(f"  {k:8s}: training step {t[k] * 1e3:8.1f} ms ({t[k] / t['tf']:.2f}x tf)   "
              f"eval forward {e[k] * 1e3:8.1f} ms ({e[k] / e['tf']:.2f}x tf)")
    return {"exact_vs_tf_step": t["xnnpack"] / t["tf"], "exact_vs_tf_eval": e["xnnpack"] / e["tf"]}


if __name__ == "__main__":
    import sys

    exact_numerics() if "--exact" in sys.argv else main()
