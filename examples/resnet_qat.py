"""A ResNet-style net (basic blocks, residual Add + ReLU) QAT -> full-integer .tflite.

Run: .venv/bin/python examples/resnet_qat.py [--data IMAGE_FOLDER] [--size 32]
Without --data it trains on synthetic images (no download).
"""
import sys

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import load, parse, qat_export_verify  # noqa: E402

from xqat.demo.nets import ResNetSmall  # noqa: E402

if __name__ == "__main__":
    args = parse(__doc__, size=32)
    data, classes = load(args)
    qat_export_verify(ResNetSmall(num_classes=classes, width=16, depth=1), data, args)
