"""Forward+backward time of xqat.fake_quant vs torch's fused fake_quantize_per_tensor_affine.

Run: .venv/bin/python -m benchmarks.fake_quant [--shape 8,64,56,56]
Prints the median times and the ratio xqat / torch (target: <= 2x).
"""

from __future__ import annotations

import argparse

import torch

import xqat
from benchmarks._timing import compare, machine


def main() -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", default="8,64,56,56")
    args, _ = ap.parse_known_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True)
    g = torch.randn(shape)
    mn, mx = -3.0, 3.0
    mn_c, mx_c = torch.tensor(mn), torch.tensor(mx)
    mn_t = torch.tensor(mn, requires_grad=True)
    mx_t = torch.tensor(mx, requires_grad=True)
    scale, zp = (mx - mn) / 255, 128

    def run_xqat():
        xqat.fake_quant(x, mn, mx).backward(g)

    def run_xqat_learned():
        xqat.fake_quant(x, mn_t, mx_t).backward(g)

    def run_torch():
        torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, 255).backward(g)

    compiled = torch.compile(lambda x, mn, mx: xqat.fake_quant(x, mn, mx), fullgraph=True)

    def run_compiled():  # the fake quant as a compiled QAT model runs it: one fused pass forward, one backward
        compiled(x, mn_c, mx_c).backward(g)

    t = compare({"xqat": run_xqat, "xqat_learned_range": run_xqat_learned, "xqat_compiled": run_compiled,
                 "torch": run_torch})
    print(f"fake quant fwd+bwd, tensor {shape}, CPU ({machine()})")
    print(f"  torch.fake_quantize_per_tensor_affine : {t['torch'] * 1e3:8.2f} ms")
    print(f"  xqat.fake_quant (fixed range)         : {t['xqat'] * 1e3:8.2f} ms   ratio {t['xqat'] / t['torch']:.2f}x")
    print(f"  xqat.fake_quant (min/max with grad)   : {t['xqat_learned_range'] * 1e3:8.2f} ms   "
          f"ratio {t['xqat_learned_range'] / t['torch']:.2f}x")
    print(f"  xqat.fake_quant (torch.compile)       : {t['xqat_compiled'] * 1e3:8.2f} ms   "
          f"ratio {t['xqat_compiled'] / t['torch']:.2f}x")
    return {"ratio": t["xqat"] / t["torch"], "ratio_learned": t["xqat_learned_range"] / t["torch"],
            "ratio_compiled": t["xqat_compiled"] / t["torch"]}


if __name__ == "__main__":
    main()
