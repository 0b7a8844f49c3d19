"""Forward+backward time of xqat.fake_quant vs torch's fused fake_quantize_per_tensor_affine.

Run: .venv/bin/python -m benchmarks.fake_quant [--shape 8,64,56,56]
Prints the median times and the ratio xqat / torch (target: <= 2x).
"""

from __future__ import annotations

import argparse

import torch

import xqat
from benchmarks._timing import compare, machine
from xqat.torch_side.fake_quant import use_fused_kernels


def main() -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", default="8,64,56,56")
    args, _ = ap.parse_known_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True)
    g = torch.randn(shape)
    mn, mx = -3.0, 3.0
    mn_t = torch.tensor(mn, requires_grad=True)
    mx_t = torch.tensor(mx, requires_grad=True)
    scale, zp = (mx - mn) / 255, 128

    def run_xqat():
        xqat.fake_quant(x, mn, mx).backward(g)

    def run_xqat_learned():
        xqat.fake_quant(x, mn_t, mx_t).backward(g)

    def run_torch():
        torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, 255).backward(g)

    def run_fused():
        use_fused_kernels(True)
        try:
            xqat.fake_quant(x, mn, mx).backward(g)
        finally:
            use_fused_kernels(False)

    t = compare({"xqat": run_xqat, "xqat_learned_range": run_xqat_learned, "xqat_fused": run_fused,
                 "torch": run_torch})
    print(f"fake quant fwd+bwd, tensor {shape}, CPU ({machine()})")
    print(f"  torch.fake_quantize_per_tensor_affine : {t['torch'] * 1e3:8.2f} ms")
    print(f"  xqat.fake_quant (fixed range)         : {t['xqat'] * 1e3:8.2f} ms   ratio {t['xqat'] / t['torch']:.2f}x")
    print(f"  xqat.fake_quant (min/max with grad)   : {t['xqat_learned_range'] * 1e3:8.2f} ms   "
          f"ratio {t['xqat_learned_range'] / t['torch']:.2f}x")
    print(f"  xqat.fake_quant (fused kernels)       : {t['xqat_fused'] * 1e3:8.2f} ms   "
          f"ratio {t['xqat_fused'] / t['torch']:.2f}x")
    return {"ratio": t["xqat"] / t["torch"], "ratio_learned": t["xqat_learned_range"] / t["torch"],
            "ratio_fused": t["xqat_fused"] / t["torch"]}


if __name__ == "__main__":
    main()
