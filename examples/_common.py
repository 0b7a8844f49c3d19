"""Shared argument handling and the QAT -> export -> verify tail of the example scripts."""
import argparse

import torch

import xqat
from xqat.demo.data import image_folder, synthetic_images
from xqat.demo.training import accuracy, fit


def parse(description: str, size: int, width: float | None = None, epochs: int = 8) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    if width is not None:
        ap.add_argument("--width", type=float, default=width, help=f"width multiplier (default {width})")
    ap.add_argument("--data", help="image folder (root/<class>/<image>); default: synthetic images")
    ap.add_argument("--size", type=int, default=size, help=f"input size (default {size})")
    ap.add_argument("--epochs", type=int, default=epochs, help=f"float training epochs (default {epochs})")
    ap.add_argument("--qat-epochs", type=int, default=2)
    ap.add_argument("--out", default="model_int8.tflite")
    return ap.parse_args()


def load(args) -> tuple:
    if args.data:
        split, classes = image_folder(args.data, args.size)
        return split, len(classes)
    return synthetic_images(n=384, classes=4, size=args.size), 4


def qat_export_verify(float_model: torch.nn.Module, data, args) -> None:
    fit(float_model, data.x_train, data.y_train, epochs=args.epochs, lr=2e-3, progress="float training")
    print(f"float accuracy {accuracy(float_model, data.x_test, data.y_test):.4f}")
    qat = xqat.prepare_qat(float_model, data.x_train[:1], xqat.QATConfig(freeze_bn_delay=100))
    fit(qat, data.x_train, data.y_train, epochs=args.qat_epochs, lr=3e-4, progress="QAT")
    print(f"QAT simulation accuracy {accuracy(qat, data.x_test, data.y_test):.4f}")
    print(xqat.export_tflite(qat, data.x_train[:1], args.out).table())
    print(xqat.parity(qat, args.out, data.x_test[:64]).table())
    print(xqat.check_edgetpu(args.out).table())
