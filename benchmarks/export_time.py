"""End-to-end export time of MobileNetV2 (width 1.0, 224x224): prepare_qat -> calibrate -> export_tflite.

Run: .venv/bin/python -m benchmarks.export_time [--width 1.0] [--size 224] [--repeats 2]
Prints the seconds per stage (torch->ONNX, onnx2tf, TFLite converter) of each export, the ratio to the
60 s target, whether the exports are byte-identical (sha256), and the report's verdict.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
import warnings

import torch

import xqat
from benchmarks._timing import machine
from xqat.demo.nets import MobileNetV2

TARGET_S = 60.0


def main() -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=2)
    args, _ = ap.parse_known_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    shape = (1, 3, args.size, args.size)
    qat = xqat.prepare_qat(MobileNetV2(width_mult=args.width).eval(), torch.randn(shape))
    qat.train()
    with torch.no_grad():
        for _ in range(2):
            qat(torch.rand(2, *shape[1:]))
    print(f"export of MobileNetV2 width {args.width} at {args.size}x{args.size} ({machine()})")
    totals, digests = [], set()
    with tempfile.TemporaryDirectory() as d:
        for i in range(args.repeats):
            path = f"{d}/m{i}.tflite"
            t0 = time.perf_counter()
            report = xqat.export_tflite(qat, torch.rand(shape), path)
            totals.append(time.perf_counter() - t0)
            with open(path, "rb") as f:
                digests.add(hashlib.sha256(f.read()).hexdigest()[:16])
            stages = ", ".join(f"{k} {v:.1f}s" for k, v in report.seconds.items())
            print(f"  export {i + 1}: {totals[-1]:.1f} s ({stages}); {len(report.tensors)} tensors checked, "
                  f"ok={report.ok}")
    print(f"  first export {totals[0]:.1f} s = {totals[0] / TARGET_S:.2f}x the {TARGET_S:.0f} s target; "
          f"byte-identical across exports: {len(digests) == 1}")
    return {"export_s": totals[0], "export_warm_s": min(totals), "target_ratio": totals[0] / TARGET_S}


if __name__ == "__main__":
    main()
