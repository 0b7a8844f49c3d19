"""MobileNetV2 (width multiplier) QAT -> full-integer EdgeTPU-ready .tflite.

Run: .venv/bin/python examples/mobilenet_v2_qat.py [--data IMAGE_FOLDER] [--width 0.35] [--size 64]
Without --data it trains on synthetic images (no download).
"""
import sys

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import load, parse, qat_export_verify  # noqa: E402

from xqat.demo.nets import MobileNetV2  # noqa: E402

if __name__ == "__main__":
    args = parse(__doc__, size=64, width=0.35, epochs=15)
    data, classes = load(args)
    qat_export_verify(MobileNetV2(num_classes=classes, width_mult=args.width), data, args)
