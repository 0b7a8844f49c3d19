"""Time of the ONNX(Q/DQ) -> onnx2tf -> TF FakeQuant graph -> full-integer TFLite step on MobileNetV2.

Run: .venv/bin/python -m benchmarks.export_time [--width 1.0] [--size 224] [--repeats 2]
The model is a hand-written MobileNetV2 (BN folded, ReLU6, residual Adds) with a per-tensor Q/DQ on
every activation and per-channel symmetric int8 conv weights, exported with torch.onnx (dynamo=False).
Prints the seconds per stage of each conversion, the ratio to the 60 s target, whether repeated
conversions give byte-identical files (sha256; run the script twice to compare across processes), and
the qparam / full-integer checks of the result.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks._timing import machine  # noqa: E402
from tests.test_onnx_to_tflite import QDQNet, calibrate, export_qdq_onnx  # noqa: E402

TARGET_S = 60.0
# (expansion t, channels c, repeats n, stride s) of MobileNetV2 (Sandler et al. 2018, table 2)
_CFG = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def _ch(c: float) -> int:
    return max(8, int(c + 4) // 8 * 8)


class QDQMobileNetV2(QDQNet):
    """MobileNetV2 with BN already folded into conv biases; Q/DQ points after every conv / ReLU6 / Add."""

    def __init__(self, width: float = 1.0, num_classes: int = 1000):
        super().__init__()
        self.convs = nn.ModuleList()
        self.plan: list[tuple] = []  # (kind, conv indices, stride, residual)
        cin = _ch(32 * width)
        self._conv(3, cin, 3, 2)
        for t, c, n, s in _CFG:
            cout = _ch(c * width)
            for i in range(n):
                stride = s if i == 0 else 1
                h = cin * t
                idx = ([self._conv(cin, h, 1, 1)] if t != 1 else []) + [self._conv(h, h, 3, stride, groups=h),
                                                                         self._conv(h, cout, 1, 1)]
                self.plan.append((idx, stride == 1 and cin == cout))
                cin = cout
        self.last = _ch(1280 * max(1.0, width))
        self.head = self._conv(cin, self.last, 1, 1)
        self.fc = nn.Linear(self.last, num_classes)

    def _conv(self, cin, cout, k, stride, groups=1) -> int:
        self.convs.append(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups))
        return len(self.convs) - 1

    def _apply(self, i, x, relu6=True):
        m = self.convs[i]
        y = F.conv2d(x, self.w(f"convs.{i}", m), m.bias, m.stride, m.padding, groups=m.groups)
        return self.q(f"a{i}", F.relu6(y) if relu6 else y)

    def forward(self, x):
        x = self._apply(0, self.q("in", x))
        for idx, residual in self.plan:
            y = x
            for j, i in enumerate(idx):
                y = self._apply(i, y, relu6=j < len(idx) - 1)
            x = self.q(f"add{idx[-1]}", x + y) if residual else y
        x = self._apply(self.head, x)
        x = self.q("gap", F.adaptive_avg_pool2d(x, 1).flatten(1))
        return self.q("logits", F.linear(x, self.w("fc", self.fc), self.fc.bias))


def main() -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=2)
    args, _ = ap.parse_known_args()

    from xqat.export.tflite_convert import convert_qdq_onnx

    torch.manual_seed(0)
    net = QDQMobileNetV2(args.width).eval()
    for m in net.convs:  # He init keeps the unnormalised activations in a sane range
        nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        nn.init.uniform_(m.bias, -0.1, 0.1)
    x = torch.rand(2, 3, args.size, args.size)
    t0 = time.perf_counter()
    calibrate(net, x)
    onnx_model = export_qdq_onnx(net, x[:1])
    t_onnx = time.perf_counter() - t0
    n_qdq = sum(n.op_type == "DequantizeLinear" for n in onnx_model.graph.node)
    print(f"MobileNetV2 width {args.width}, {args.size}x{args.size}, {len(net.convs)} convs, {n_qdq} Q/DQ pairs; "
          f"{machine()}")
    print(f"torch calibrate + ONNX export: {t_onnx:.1f} s (not part of the timed step)")

    results, digests = [], []
    for r in range(args.repeats):
        c = convert_qdq_onnx(onnx_model, io_dtype="int8")
        s = c.seconds
        digests.append(hashlib.sha256(c.tflite).hexdigest())
        results.append(s["total"])
        print(f"run {r + 1}: total {s['total']:6.1f} s = analyze {s['analyze']:.1f} + onnx2tf {s['onnx2tf']:.1f} "
              f"+ TFLite converter {s['tflite_converter']:.1f} (+ tensor map); ratio to the {TARGET_S:.0f} s target: "
              f"{s['total'] / TARGET_S:.2f}; sha256 {digests[-1][:16]}")
    checks = c.qparam_checks()
    print(f"{len(c.tflite) / 1e6:.2f} MB, {len(c.model.ops)} ops, byte-identical across runs: {len(set(digests)) == 1}")
    print(f"qparams equal: {sum(r.equal for r in checks)}/{len(checks)} (activations {len(c.tensor_map)} mapped, "
          f"{len(c.fused)} fused, {len(c.unmapped)} unmapped); float tensors: {len(c.float_tensors())}; "
          f"inner QUANTIZE: {len(c.inner_ops('QUANTIZE'))}; TRANSPOSE: {c.model.op_names().count('TRANSPOSE')}")
    return {"first_s": results[0], "last_s": results[-1], "identical": float(len(set(digests)) == 1)}


if __name__ == "__main__":
    main()
