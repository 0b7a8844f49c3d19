"""int8 (xqat export) vs float TFLite: size and interpreter latency (batch 1, 1 thread), side by side.

Run: .venv/bin/python -m benchmarks.tflite_latency [--size 224]
Models: MobileNetV2 (width 1.0) and the ResNet-style net of xqat.demo.nets (width 32, depth 2, 3 stages).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

import xqat
from benchmarks._timing import compare
from xqat.demo.nets import MobileNetV2, ResNetSmall
from xqat.export.float_baseline import float_tflite
from xqat.verify.interpreter import make_interpreter


def _invoker(model: bytes):
    it = make_interpreter(model, "xnnpack", num_threads=1)
    inp = it.get_input_details()[0]
    it.set_tensor(inp["index"], np.zeros(inp["shape"], inp["dtype"]))
    return it.invoke


def main() -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=224)
    args, _ = ap.parse_known_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    warnings.simplefilter("ignore")
    results = {}
    nets = {"MobileNetV2 1.0": (MobileNetV2(width_mult=1.0), args.size),
            "ResNet-style (w32, d2)": (ResNetSmall(num_classes=1000, width=32, depth=2), args.size)}
    print(f"TFLite size and latency, batch 1, 1 thread, XNNPACK, input {args.size}x{args.size}")
    with tempfile.TemporaryDirectory() as d:
        for name, (net, size) in nets.items():
            torch.manual_seed(0)
            shape = (1, 3, size, size)
            qat = xqat.prepare_qat(net.eval(), torch.randn(shape)).train()
            with torch.no_grad():
                qat(torch.rand(2, *shape[1:]))
            path = Path(d) / "int8.tflite"
            xqat.export_tflite(qat, torch.rand(shape), path)
            int8 = path.read_bytes()
            f32 = float_tflite(net.eval(), torch.rand(shape))
            t = compare({"float": _invoker(f32), "int8": _invoker(int8)}, repeats=20, warmup=3)
            print(f"  {name:24s} size float {len(f32) / 2**20:6.2f} MiB, int8 {len(int8) / 2**20:6.2f} MiB "
                  f"({len(f32) / len(int8):.2f}x smaller); latency float {t['float'] * 1e3:7.1f} ms, int8 "
                  f"{t['int8'] * 1e3:7.1f} ms ({t['float'] / t['int8']:.2f}x faster)")
            results[name] = {"size_ratio": len(f32) / len(int8), "speedup": t["float"] / t["int8"]}
    return results


if __name__ == "__main__":
    main()
