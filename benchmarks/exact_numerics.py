"""Exact numerics on a deep residual net: what the device computes vs what training simulated.

Trains a ResNet-style net (ResNetSmall: stem + 3 stages of `--depth` basic blocks, residual adds, mean, Linear;
depth 3 is 21 conv layers) on the bundled digits, fine-tunes it with QAT in TF's fake-quant numerics ("tf"),
exports a full-integer .tflite, and prints one table:

  - accuracy of the float model, of the QAT model in "tf" numerics, of the same model evaluated in exact
    numerics (`xqat.set_numerics(qat, "xnnpack")`), and of the int8 TFLite (the interpreter itself, and
    `xqat.evaluate` on the integer emulator: the two are equal);
  - `xqat.parity(..., layerwise=True)` over the whole test set on xnnpack, torch model vs .tflite: % identical
    output codes, % identical codes on the worst tensor of the model, the largest output difference (LSB), and
    top-1 agreement. In "tf" numerics the +-1 LSB per-layer differences compound with depth; in exact numerics
    every tensor is 100% identical;
  - the same after `--exact-epochs` more epochs of fine-tuning in exact numerics (exported again).

Run: .venv/bin/python -m benchmarks.exact_numerics [--size 16] [--width 8] [--depth 3] [--epochs 6]
                                                   [--qat-epochs 2] [--exact-epochs 1] [--seed 0]
Seeds are fixed: the same command prints the same table on the same machine. A few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import xqat
from benchmarks._timing import machine
from xqat.demo.data import Split, digits
from xqat.demo.nets import ResNetSmall
from xqat.demo.pipeline import tflite_accuracy
from xqat.demo.training import accuracy, fit
from xqat.table import format_table


def _conv_layers(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in model.modules())


def _sim_row(label: str, qat: nn.Module, data: Split, path: Path) -> list[str]:
    """A QAT model in its current numerics: test accuracy, and parity with `path` over the test set."""
    report = xqat.parity(qat, path, data.x_test, backend="xnnpack", layerwise=True)
    par, worst = report.outputs[0], min(t.identical for t in report.layers + report.outputs)
    return [label, f"{100 * accuracy(qat, data.x_test, data.y_test):.2f}%", f"{100 * par.identical:.2f}%",
            f"{100 * worst:.2f}%", f"{par.max_abs:.0f}", f"{100 * (par.top1_agreement or 0.0):.2f}%"]


def _tflite_row(path: Path, data: Split) -> list[str]:
    """The .tflite's test accuracy on the interpreter, checked equal to `xqat.evaluate` on the emulator."""
    on_interpreter = tflite_accuracy(path.read_bytes(), data.x_test, data.y_test)
    batches = [(data.x_test[i:i + 256], data.y_test[i:i + 256]) for i in range(0, len(data.x_test), 256)]
    on_emulator = xqat.evaluate(path, batches, backend="xnnpack").value
    if on_emulator != on_interpreter:  # xqat.evaluate's promise; a table with two different numbers is a bug
        raise AssertionError(f"{path.name}: emulator {on_emulator} != interpreter {on_interpreter}")
    return ["  its int8 TFLite (interpreter = evaluate)", f"{100 * on_interpreter:.2f}%", "", "",
            "", ""]


def run(size: int = 16, width: int = 8, depth: int = 3, epochs: int = 6, qat_epochs: int = 2,
        exact_epochs: int = 1, seed: int = 0) -> str:
    """Train, export and compare as the module docstring says; returns the table."""
    t0 = last = time.perf_counter()

    def say(done: str) -> None:  # progress on stderr, so stdout is the table alone
        nonlocal last
        print(f"{done}: {time.perf_counter() - last:.0f} s", file=sys.stderr, flush=True)
        last = time.perf_counter()

    torch.manual_seed(seed)
    data = digits(size=size, seed=seed)
    example = data.x_train[:1]
    net = ResNetSmall(num_classes=10, width=width, depth=depth, in_channels=1)
    float_model = fit(net, data.x_train, data.y_train, epochs=epochs, lr=3e-3, seed=seed)
    rows = [["float torch model", f"{100 * accuracy(float_model, data.x_test, data.y_test):.2f}%", "", "", "", ""]]
    say("float training")

    qat = xqat.prepare_qat(float_model, example)
    fit(qat, data.x_train, data.y_train, epochs=qat_epochs, lr=5e-4, seed=seed + 1)
    say('QAT in "tf" numerics')
    with tempfile.TemporaryDirectory(prefix="xqat-exact-bench-") as tmp:
        path = Path(tmp) / "tf_trained.tflite"
        xqat.export_tflite(qat, example, path)
        say("export")
        rows.append(_sim_row(f'QAT, "tf" numerics ({qat_epochs} epochs)', qat, data, path))
        xqat.set_numerics(qat, "xnnpack")
        rows.append(_sim_row('  same model, exact numerics (xnnpack)', qat, data, path))
        rows.append(_tflite_row(path, data))
        say("parity and accuracies")
        if exact_epochs:
            fit(qat, data.x_train, data.y_train, epochs=exact_epochs, lr=1e-4, seed=seed + 2)
            say("fine-tuning in exact numerics")
            path = Path(tmp) / "exact_tuned.tflite"
            xqat.export_tflite(qat, example, path)
            label = f"+ {exact_epochs} epoch{'s' * (exact_epochs > 1)} in exact numerics (xnnpack)"
            rows.append(_sim_row(label, qat, data, path))
            rows.append(_tflite_row(path, data))
    title = (f"digits {size}x{size}, ResNetSmall width {width} depth {depth} ({_conv_layers(net)} conv layers, "
             f"residual adds); test set {len(data.x_test)} images; parity on xnnpack")
    table = format_table(["model", "top-1", "identical: output", "worst tensor", "max |Δ|", "top-1 agreement"],
                         rows)
    return f"{title}\n{machine()}; {time.perf_counter() - t0:.0f} s\n{table}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.exact_numerics", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=16, help="image size, pixels (default 16)")
    ap.add_argument("--width", type=int, default=8, help="channels of the first stage (default 8)")
    ap.add_argument("--depth", type=int, default=3, help="basic blocks per stage, 3 stages (default 3)")
    ap.add_argument("--epochs", type=int, default=6, help="float training epochs (default 6)")
    ap.add_argument("--qat-epochs", type=int, default=2, help='QAT epochs in "tf" numerics (default 2)')
    ap.add_argument("--exact-epochs", type=int, default=1, help="then epochs in exact numerics, 0 to skip "
                                                                "(default 1)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    print(run(a.size, a.width, a.depth, a.epochs, a.qat_epochs, a.exact_epochs, a.seed))


if __name__ == "__main__":
    main()
