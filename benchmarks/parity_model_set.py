"""Output parity of the model set (tests/models.py) on the three interpreter backends, as a Markdown table.

Run from the repo root: .venv/bin/python -m benchmarks.parity_model_set [--inputs 200]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import warnings

import torch

import xqat
from tests.models import INPUT_SHAPE, MODELS, calibrate, make_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--inputs", type=int, default=200)
    args, _ = ap.parse_known_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    warnings.simplefilter("ignore")
    x = torch.rand(args.inputs, *INPUT_SHAPE[1:], generator=torch.Generator().manual_seed(11))
    print("| model | backend | output codes identical | within 1 LSB | max abs Δ | mean Δ | top-1 | worst layer max |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as d:
        for name in MODELS:
            qat = calibrate(xqat.prepare_qat(make_model(name), torch.randn(INPUT_SHAPE)))
            path = f"{d}/{name}.tflite"
            xqat.export_tflite(qat, torch.rand(INPUT_SHAPE), path)
            for backend in ("xnnpack", "builtin", "reference"):
                r = xqat.parity(qat, path, x, backend=backend, layerwise=True)
                o = r.outputs[0]
                top1 = "-" if o.top1_agreement is None else f"{100 * o.top1_agreement:.1f}%"
                near = 100 * (o.histogram["0"] + o.histogram["1"]) / o.elements
                print(f"| {name} | {backend} | {100 * o.identical:.2f}% | {near:.2f}% | {o.max_abs} | "
                      f"{o.mean_delta:+.4f} | {top1} | {max(t.max_abs for t in r.layers)} |")


if __name__ == "__main__":
    main()
