"""The main job end to end on the bundled digits data (`make demo` / `xqat demo`):
train a float CNN, fine-tune it with QAT, export a verified full-integer .tflite, and compare it with the
float model, the QAT simulation and a post-training-quantized (PTQ) TFLite of the same float model.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..table import format_table
from .data import digits
from .nets import DigitsCNN
from .training import accuracy, fit

__all__ = ["run_demo", "DemoResult", "tflite_accuracy"]


@dataclass
class DemoResult:
    """Numbers of one demo run (also written to results.json in the run folder)."""

    accuracy: dict[str, float] = field(default_factory=dict)
    parity: dict[str, float] = field(default_factory=dict)
    edgetpu: dict[str, object] = field(default_factory=dict)
    size_bytes: dict[str, int] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    run_dir: str = ""

    def table(self) -> str:
        a, p, e, s, lat = self.accuracy, self.parity, self.edgetpu, self.size_bytes, self.latency_ms
        rows = [
            ["accuracy: float torch model", f"{100 * a['float_torch']:.2f}%"],
            ["accuracy: QAT torch simulation", f"{100 * a['qat_simulation']:.2f}%"],
        ]
        if "qat_exact" in a:
            rows.append(["accuracy: QAT torch, exact numerics (xnnpack)", f"{100 * a['qat_exact']:.2f}%"])
        rows += [
            ["accuracy: int8 TFLite (xqat export)", f"{100 * a['int8_tflite']:.2f}%"],
        ]
        if "int8_emulated" in a:
            rows.append(["accuracy: int8 TFLite, xqat.evaluate (batched emulator, xnnpack)",
                         f"{100 * a['int8_emulated']:.2f}%"])
        if "ptq_tflite" in a:
            rows.append(["accuracy: int8 TFLite (PTQ, representative dataset)", f"{100 * a['ptq_tflite']:.2f}%"])
        rows += [
            ["parity: output codes identical (sim vs TFLite, xnnpack)", f"{100 * p['identical']:.2f}%"],
            ["parity: max |Δ| / mean Δ (output LSB)", f"{p['max_abs']:.0f} / {p['mean_delta']:+.4f}"],
            ["parity: top-1 agreement sim vs TFLite", f"{100 * p['top1_agreement']:.2f}%"],
        ]
        if "exact_identical" in p:
            rows.append(["parity, exact numerics: identical codes (every tensor) / top-1 agreement",
                         f"{100 * p['exact_identical']:.2f}% / {100 * p['exact_top1_agreement']:.2f}%"])
        rows += [
            ["EdgeTPU check", f"{'ready' if e['fully_mapped'] else 'NOT ready'} ({e['findings']} findings, "
                              f"{100 * e['mapped_op_share']:.0f}% of ops on the TPU)"],
        ]
        if "float_tflite" in s:
            rows.append(["model size float / int8 TFLite", f"{s['float_tflite'] / 1024:.1f} KiB / "
                                                           f"{s['int8_tflite'] / 1024:.1f} KiB "
                                                           f"({s['float_tflite'] / s['int8_tflite']:.2f}x smaller)"])
        else:
            rows.append(["model size int8 TFLite", f"{s['int8_tflite'] / 1024:.1f} KiB"])
        if "float_tflite" in lat:
            rows.append(["latency float / int8 TFLite (batch 1, 1 thread)",
                         f"{lat['float_tflite']:.3f} ms / {lat['int8_tflite']:.3f} ms "
                         f"({lat['float_tflite'] / lat['int8_tflite']:.2f}x)"])
        return format_table(["xqat demo: digits 16x16, DigitsCNN", "result"], rows)


def _tflite_predict(model: bytes, x: torch.Tensor, backend: str = "xnnpack") -> np.ndarray:
    """Class predictions of a .tflite over NCHW float inputs, one image at a time (batch-1 model)."""
    from ..verify.interpreter import make_interpreter, quantize_input

    it = make_interpreter(model, backend)
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    xs = x.permute(0, 2, 3, 1).numpy()
    preds = []
    for i in range(len(xs)):
        xi = xs[i:i + 1]
        if inp["dtype"] != np.float32:
            xi = quantize_input(xi, *inp["quantization"], inp["dtype"], backend)
        it.set_tensor(inp["index"], xi)
        it.invoke()
        preds.append(int(it.get_tensor(out["index"]).argmax()))
    return np.array(preds)


def tflite_accuracy(model: bytes, x: torch.Tensor, y: torch.Tensor, backend: str = "xnnpack") -> float:
    """Top-1 accuracy of a .tflite classifier on the TFLite interpreter itself, one image at a time."""
    return float((_tflite_predict(model, x, backend) == y.numpy()).mean())


def _latency_ms(model: bytes, repeats: int = 300) -> float:
    """Median invoke time of the interpreter, batch 1, 1 thread."""
    from ..verify.interpreter import make_interpreter

    it = make_interpreter(model, "xnnpack", num_threads=1)
    inp = it.get_input_details()[0]
    it.set_tensor(inp["index"], np.zeros(inp["shape"], inp["dtype"]))
    for _ in range(20):
        it.invoke()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        it.invoke()
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def run_demo(out_dir: str | Path = "runs", seed: int = 0, epochs: int = 8, qat_epochs: int = 3,
             verbose: bool = True) -> DemoResult:
    """Train -> QAT -> export -> verify on digits; returns the numbers and writes a run folder."""
    from ..checkpoint import save_qat
    from ..edgetpu.check import check_edgetpu
    from ..export.api import export_tflite
    from ..export.float_baseline import float_tflite
    from ..torch_side.prepare import prepare_qat
    from ..verify.evaluate import evaluate
    from ..verify.exact import set_numerics
    from ..verify.parity import parity

    def say(msg: str) -> None:
        if verbose:
            print(msg, flush=True)

    t_start = time.perf_counter()
    run = Path(out_dir) / time.strftime("demo-%Y%m%d-%H%M%S")
    run.mkdir(parents=True, exist_ok=True)
    res = DemoResult(run_dir=str(run))
    torch.manual_seed(seed)
    data = digits(size=16, seed=seed)
    shape = (1, *data.x_train.shape[1:])

    say(f"[1/5] training a float CNN on {len(data.x_train)} digits (16x16)")
    t = time.perf_counter()
    float_model = fit(DigitsCNN(), data.x_train, data.y_train, epochs=epochs, lr=3e-3, seed=seed,
                      progress="float training" if verbose else None)
    res.accuracy["float_torch"] = accuracy(float_model, data.x_test, data.y_test)
    res.seconds["float_training"] = time.perf_counter() - t

    say("[2/5] QAT fine-tuning (TF fake-quant numerics, BN folded)")
    t = time.perf_counter()
    qat = prepare_qat(float_model, data.x_train[:1])
    fit(qat, data.x_train, data.y_train, epochs=qat_epochs, lr=5e-4, seed=seed + 1,
        progress="QAT fine-tuning" if verbose else None)
    res.accuracy["qat_simulation"] = accuracy(qat, data.x_test, data.y_test)
    res.seconds["qat_training"] = time.perf_counter() - t
    save_qat(qat, run / "qat.pt", shape)

    say("[3/5] exporting a full-integer TFLite model (ONNX Q/DQ -> onnx2tf -> TFLite converter)")
    t = time.perf_counter()
    int8_path = run / "model_int8.tflite"
    report = export_tflite(qat, data.x_train[:1], int8_path)
    (run / "export_report.txt").write_text(report.table() + "\n")
    int8 = int8_path.read_bytes()
    res.seconds["export"] = time.perf_counter() - t

    say("[4/5] verifying: accuracy and parity of the .tflite, exact numerics, EdgeTPU check")
    t = time.perf_counter()
    res.accuracy["int8_tflite"] = tflite_accuracy(int8, data.x_test, data.y_test)
    batches = [(data.x_test[i:i + 256], data.y_test[i:i + 256]) for i in range(0, len(data.x_test), 256)]
    res.accuracy["int8_emulated"] = evaluate(int8, batches, backend="xnnpack").value  # equals the line above
    par = parity(qat, int8, data.x_test, layerwise=True)
    (run / "parity.txt").write_text(par.table() + "\n")
    par.plot(run / "parity_layers.png")
    out = par.outputs[0]
    res.parity = {"identical": out.identical, "max_abs": out.max_abs, "mean_delta": out.mean_delta,
                  "top1_agreement": out.top1_agreement or 0.0, "inputs": par.inputs}
    set_numerics(qat, "xnnpack")  # the QAT model now computes the device's integer model, bit for bit
    res.accuracy["qat_exact"] = accuracy(qat, data.x_test, data.y_test)
    exact = parity(qat, int8, data.x_test, layerwise=True)
    res.parity["exact_identical"] = min(t.identical for t in exact.layers + exact.outputs)
    res.parity["exact_top1_agreement"] = exact.outputs[0].top1_agreement or 0.0
    tpu = check_edgetpu(int8)
    res.edgetpu = {"ok": tpu.ok, "fully_mapped": tpu.fully_mapped, "findings": len(tpu.findings),
                   "mapped_op_share": tpu.mapped_op_share}
    res.size_bytes["int8_tflite"] = len(int8)
    res.latency_ms["int8_tflite"] = _latency_ms(int8)
    res.seconds["verify"] = time.perf_counter() - t

    say("[5/5] baselines: float TFLite and post-training quantization of the same float model")
    t = time.perf_counter()
    calib = data.x_train[torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(seed))[:200]]
    f32 = float_tflite(float_model, data.x_train[:1])
    ptq = float_tflite(float_model, data.x_train[:1], representative=calib)
    (run / "model_float.tflite").write_bytes(f32)
    (run / "model_ptq_int8.tflite").write_bytes(ptq)
    res.accuracy["ptq_tflite"] = tflite_accuracy(ptq, data.x_test, data.y_test)
    res.size_bytes["float_tflite"] = len(f32)
    res.latency_ms["float_tflite"] = _latency_ms(f32)
    res.seconds["baselines"] = time.perf_counter() - t
    res.seconds["total"] = time.perf_counter() - t_start

    (run / "results.json").write_text(json.dumps(
        {**res.__dict__, "machine": f"{platform.machine()}, python {platform.python_version()}, "
                                    f"torch {torch.__version__}"}, indent=1, default=float))
    table = res.table()
    (run / "summary.txt").write_text(table + "\n")
    say("")
    say(table)
    say(f"\nrun folder: {run} (results.json, summary.txt, export_report.txt, parity.txt, parity_layers.png, "
        f"model_int8.tflite, model_float.tflite, model_ptq_int8.tflite, qat.pt); {res.seconds['total']:.0f} s")
    return res
