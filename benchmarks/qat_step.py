"""Training-step time and peak memory on CPU: float vs xqat QAT (eager and torch.compile) vs torch.ao eager QAT.

Run: .venv/bin/python -m benchmarks.qat_step [--net mobilenet|resnet|both] [--batch 16] [--size 96] [--width 0.5]
                                             [--no-compile] [--profile [--top 15]] [--device cuda]
     .venv/bin/python -m benchmarks.qat_step --exact   # float vs numerics "tf" vs exact "xnnpack" (`exact_numerics`)
Same batch, same model, interleaved repeats; prints median ms and the ratios to float. Targets:
xqat eager <= 2.0x float, xqat compiled <= 1.6x float, both faster than torch.ao eager QAT, and the peak memory of
a training step within 1.5x float. `--profile` prints the top ops by self CPU time of a few training steps
(torch.profiler, forward + backward + optimizer) for each variant instead of timing them. On CUDA every step runs
inside `exact_cuda_math` (no TF32, deterministic cuDNN: the numerics the fake-quant tests check) and is synchronized.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import types
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import xqat
from benchmarks._timing import compare, machine
from xqat.demo.nets import InvertedResidual, MobileNetV2, ResNetSmall
from xqat.torch_side.traced import exact_cuda_math


def torch_ao_eager_qat(model: nn.Module) -> nn.Module:
    """torch.ao eager-mode QAT of the same net: QuantStub/DeQuantStub, FloatFunctional adds, conv+BN(+ReLU) fused,
    default x86 QAT qconfig (eager fusion has no ReLU6 pattern, so ReLU6 keeps its own observer)."""
    import torch.ao.quantization as tq

    from xqat.demo.nets import BasicBlock

    m = copy.deepcopy(model)
    for mod in list(m.modules()):
        if isinstance(mod, InvertedResidual):
            mod.skip_add = torch.ao.nn.quantized.FloatFunctional()
            mod.forward = types.MethodType(
                lambda self, x: self.skip_add.add(x, self.conv(x)) if self.use_res else self.conv(x), mod)
        if isinstance(mod, BasicBlock):
            mod.skip_add = torch.ao.nn.quantized.FloatFunctional()
            mod.forward = types.MethodType(
                lambda self, x: self.skip_add.add_relu(self.conv2(self.conv1(x)), self.shortcut(x)), mod)
    for mod in list(m.modules()):
        if isinstance(mod, nn.Sequential) and len(mod) >= 2 and isinstance(mod[0], nn.Conv2d) \
                and isinstance(mod[1], nn.BatchNorm2d):
            group = ["0", "1", "2"] if len(mod) >= 3 and isinstance(mod[2], nn.ReLU) else ["0", "1"]
            tq.fuse_modules_qat(mod, [group], inplace=True)

    class Wrapped(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.quant, self.inner, self.dequant = tq.QuantStub(), inner, tq.DeQuantStub()

        def forward(self, x):
            return self.dequant(self.inner(self.quant(x)))

    w = Wrapped(m).train()
    w.qconfig = tq.get_default_qat_qconfig("x86")
    return tq.prepare_qat(w, inplace=False)


def _net(name: str, width: float) -> nn.Module:
    if name == "mobilenet":
        return MobileNetV2(num_classes=10, width_mult=width).eval()
    return ResNetSmall(num_classes=10, width=16, depth=2).eval()


def _describe(name: str, args) -> str:
    net = f"MobileNetV2 width {args.width}" if name == "mobilenet" else "ResNet-style (width 16, 2 blocks x 3 stages)"
    return f"{net}, batch {args.batch}x3x{args.size}x{args.size}"


def _steps(name: str, args) -> dict[str, Callable[[], None]]:
    """One SGD training step per variant, on the same batch and the same initial weights."""
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
    y = torch.randint(0, 10, (args.batch,), device=args.device)
    base = _net(name, args.width).to(args.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models = {"float": copy.deepcopy(base).train(), "xqat": xqat.prepare_qat(base, x[:1]).train()}
        if not args.no_compile:
            models["xqat_compiled"] = torch.compile(xqat.prepare_qat(base, x[:1]).train())
        models["torch.ao"] = torch_ao_eager_qat(base)
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3) for k, m in models.items()}
    cuda = x.is_cuda

    def step(k):
        def run():
            with exact_cuda_math() if cuda else contextlib.nullcontext():
                loss = F.cross_entropy(models[k](x), y)
                opts[k].zero_grad()
                loss.backward()
                opts[k].step()
            if cuda:
                torch.cuda.synchronize()
        return run

    return {k: step(k) for k in models}


def peak_step_memory(fn: Callable[[], None], device: str = "cpu") -> int:
    """Peak bytes allocated by torch on top of what was live before, during one call of `fn` (CUDA: the caching
    allocator's peak; CPU: the profiler's allocation events, summed in time order)."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:  # nbytes: + for an allocation, - for a free
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def profile_top(fns: dict[str, Callable[[], None]], top: int, steps: int = 3) -> None:
    """Print the `top` ops by self CPU time over `steps` training steps of each variant."""
    from torch.profiler import ProfilerActivity, profile

    for k, f in fns.items():
        f()  # warm up (and compile)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                f()
        print(f"\n--- {k}: top {top} ops by self CPU time, {steps} training steps (forward + backward + SGD) ---")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=48))


def run_net(name: str, args) -> dict[str, float]:
    fns = _steps(name, args)
    if args.profile:
        print(f"QAT training step profile, {_describe(name, args)}, {args.device} ({machine()})")
        profile_top(fns, args.top)
        return {}
    t = compare(fns, repeats=args.repeats, warmup=2)
    mem = {k: peak_step_memory(f, args.device) for k, f in fns.items()}
    where = "CUDA " + torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"QAT training step, {_describe(name, args)}, {where} ({machine()}), median of {args.repeats} interleaved")
    for k in fns:
        print(f"  {k:13s}: {t[k] * 1e3:8.1f} ms  {t[k] / t['float']:5.2f}x float   peak step memory "
              f"{mem[k] / 2**20:7.1f} MiB  {mem[k] / mem['float']:5.2f}x float")
    out = {}
    for k in fns:
        if k.startswith("xqat"):
            print(f"  {k} / torch.ao eager QAT: {t[k] / t['torch.ao']:.2f}x")
            out.update({f"{name}_{k}_vs_float": t[k] / t["float"], f"{name}_{k}_vs_torch_ao": t[k] / t["torch.ao"],
                        f"{name}_{k}_memory_vs_float": mem[k] / mem["float"]})
    return out


def main() -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--net", choices=("mobilenet", "resnet", "both"), default="both")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--no-compile", action="store_true", help="leave out the torch.compile variant")
    ap.add_argument("--profile", action="store_true", help="print the top ops of each variant instead of timing")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args, _ = ap.parse_known_args()
    out: dict[str, float] = {}
    for name in (("mobilenet", "resnet") if args.net == "both" else (args.net,)):
        out.update(run_net(name, args))
    return out


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
