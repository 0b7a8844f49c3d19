"""Parity between the torch QAT simulation (eval mode) and the TFLite interpreter, in units of the
quantization step (LSB): per output, and per layer (every activation fake-quant point matched to its
TFLite tensor through the mapping the exporter stored in the .tflite).

The float simulation reproduces TF's fake quant exactly, but the integer kernels requantize with their
own rounding (docs/numerics.md, per-backend kernel rules): expect identical codes on most elements and ±1 LSB
elsewhere. End to end, those differences accumulate through the layers; local (teacher-forced) parity feeds
every torch layer the interpreter's own tensors, so each layer row is that layer's own mismatch.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from ..errors import ParityError, TFLiteFileError
from ..table import format_table
from ..tflite.mapping import TFLiteMapping, read_mapping
from ..tflite.model import TFLiteModel, read_tflite
from ..tflite.qtypes import UINT8_ZERO_POINT_SHIFT, int8_zero_point
from ..tflite.validate import validate_model
from ..torch_side.point_hooks import point_hooks
from ..torch_side.prepare import POINTS, point_module, require_qat_model
from .backends import check_backend
from .copy_layout import copy_orders
from .interpreter import QUANTIZE_RULES, make_interpreter, quantize_input
from .io_match import as_input_list, io_tensor, read_model_bytes, to_tflite_layout, to_torch_layout
from .teacher_forced import run_recording

__all__ = ["parity", "ParityReport", "TensorParity", "LAYER_MODES"]


@dataclass
class TensorParity:
    """Code-level agreement of one tensor over all inputs."""

    name: str
    tflite_index: int
    elements: int
    identical: float  # fraction of elements with identical integer codes
    histogram: dict[str, int]  # |Δ| in LSB: "0", "1", "2", ">=3"
    max_abs: int
    mean_delta: float  # tflite - torch, in LSB: the bias
    top1_agreement: float | None = None  # classifier outputs (2-D): argmax equal

    def diverges(self, tolerance: int) -> bool:
        """More than 1% of elements differ by more than `tolerance` LSB."""
        far = sum(v for k, v in self.histogram.items() if _bucket_min(k) > tolerance)
        return far > 0.01 * self.elements


LAYER_MODES = {
    "end-to-end": "end to end: each layer gets torch's own inputs, so differences accumulate through the layers "
                  "and the first diverging layer may lie after the one at fault; local=True isolates each layer",
    "local": "local, teacher-forced: each layer gets the interpreter's own int8 inputs, so each row is that "
             "layer's own mismatch and the first diverging layer is one at fault",
}


def _bucket_min(k: str) -> int:
    return int(k.lstrip(">="))


def _stats(name: str, idx: int, torch_codes: np.ndarray, tfl_codes: np.ndarray, classifier: bool) -> TensorParity:
    d = tfl_codes.astype(np.int64) - torch_codes.astype(np.int64)
    a = np.abs(d)
    hist = {"0": int((a == 0).sum()), "1": int((a == 1).sum()), "2": int((a == 2).sum()), ">=3": int((a >= 3).sum())}
    top1 = None
    if classifier and torch_codes.ndim == 2 and torch_codes.shape[1] > 1:
        top1 = float((torch_codes.argmax(1) == tfl_codes.argmax(1)).mean())
    return TensorParity(name, idx, int(d.size), float((a == 0).mean()), hist, int(a.max(initial=0)),
                        float(d.mean()) if d.size else 0.0, top1)


@dataclass
class ParityReport:
    """Torch simulation vs TFLite interpreter, per output and (layerwise) per fake-quant point."""

    backend: str
    model_path: str
    inputs: int
    input_rule: str
    outputs: list[TensorParity]
    layers: list[TensorParity] = field(default_factory=list)
    tolerance: int = 1
    first_divergent: str | None = None
    mode: str = "output"  # "output" (no layers), "end-to-end" or "local" (teacher-forced) layerwise rows

    def table(self) -> str:
        head = ["tensor", "identical", "|Δ|=1", "|Δ|=2", "|Δ|>=3", "max|Δ|", "mean Δ", "top-1"]

        def row(t: TensorParity):
            n = max(t.elements, 1)
            return [t.name, f"{100 * t.identical:.2f}%", f"{100 * t.histogram['1'] / n:.2f}%",
                    f"{100 * t.histogram['2'] / n:.2f}%", f"{100 * t.histogram['>=3'] / n:.2f}%", t.max_abs,
                    f"{t.mean_delta:+.4f}", "-" if t.top1_agreement is None else f"{100 * t.top1_agreement:.2f}%"]

        parts = [format_table(head, [row(t) for t in self.outputs],
                              title=f"parity: torch simulation vs {self.model_path} on backend '{self.backend}', "
                                    f"{self.inputs} inputs, one row per model output "
                                    "(Δ = tflite - torch, in output LSB)")]
        if self.layers:
            parts.append(format_table(head, [row(t) for t in self.layers],
                                      title=f"layerwise ({LAYER_MODES[self.mode]}), graph order:"))
            parts.append(f"first layer diverging beyond {self.tolerance} LSB on >1% of elements: "
                         f"{self.first_divergent or 'none'}")
        parts.append(f"input quantization rule: {self.input_rule}")
        return "\n".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def plot(self, path: str | os.PathLike) -> None:
        """Per-layer bar chart of the share of elements at each |Δ| (needs matplotlib)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.layers or self.outputs
        names = [t.name for t in rows]
        fig, ax = plt.subplots(figsize=(max(6, 0.4 * len(rows) + 2), 4))
        bottom = np.zeros(len(rows))
        for key, color in (("1", "#f2c14e"), ("2", "#f78154"), (">=3", "#b4436c")):
            share = np.array([100 * t.histogram[key] / max(t.elements, 1) for t in rows])
            label = "|Δ| ≥ 3 LSB" if key == ">=3" else f"|Δ| = {key} LSB"
            ax.bar(range(len(rows)), share, bottom=bottom, color=color, label=label)
            bottom += share
        ax.set_xticks(range(len(rows)), names, rotation=70, ha="right", fontsize=7)
        ax.set_ylabel("% of elements differing")
        ax.set_title(f"xqat parity per layer ({self.backend})")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def _point_grid(model: nn.Module, key: str) -> tuple[float, int]:
    q = point_module(model, key).quantizer
    if key in point_hooks(model):  # exact numerics compute on the deployed (snapped) grid
        r = q.snapped()
        return r.scale, int8_zero_point(r.zero_point)
    s, zp = q.scale_zero_point()
    return s, int8_zero_point(zp)


def _codes(x: torch.Tensor, scale: float, zp: int) -> np.ndarray:
    return (torch.round(x.detach().float().cpu() / scale).to(torch.int64) + zp).numpy()


def _file_grid(tfl: TFLiteModel, tensor: int) -> tuple[float, int]:
    t = tfl.tensor(tensor)
    return float(t.scales[0]), int(t.zero_points[0])


def _run_interpreter(raw: bytes, tfl: TFLiteModel, mapping: TFLiteMapping, xs: list[torch.Tensor], backend: str,
                     layer_tensors: list[int], where: str) -> tuple[dict[str, np.ndarray], dict[int, np.ndarray], bool]:
    """The interpreter one sample at a time: int8 codes (TFLite layout) of every model output by output point
    key, of every tensor in `layer_tensors`, and whether the model has float I/O. Inputs and outputs are
    matched to the mapping's points by tensor index, not by the interpreter's order."""
    try:
        it = make_interpreter(raw, backend, preserve_all_tensors=bool(layer_tensors))
    except (ValueError, RuntimeError) as e:
        raise TFLiteFileError(f"{where}: the TFLite interpreter refuses the model ({_first_line(e)})") from e
    ins = {d["index"]: d for d in it.get_input_details()}
    outs = {d["index"]: d for d in it.get_output_details()}
    feeds = []
    for key, x in zip(mapping.input_points, xs):
        d = ins[io_tensor(tfl, mapping.point(key).tensor, list(ins), where)]
        a = to_tflite_layout(x.numpy(), d["shape"], mapping.sequence_layout)
        feeds.append((d, a if d["dtype"] == np.float32 else
                      quantize_input(a, *d["quantization"], d["dtype"], backend)))
    fetch = [(key, outs[io_tensor(tfl, mapping.point(key).tensor, list(outs), where)])
             for key in mapping.output_points]
    got: dict[str, list] = {key: [] for key in mapping.output_points}
    layer_tensors = sorted(set(layer_tensors))  # points sharing a tensor (same-scale ops) read it once
    layers: dict[int, list] = {t: [] for t in layer_tensors}
    for i in range(len(xs[0])):
        try:
            for d, a in feeds:
                it.set_tensor(d["index"], a[i:i + 1].astype(d["dtype"]))
            it.invoke()
        except (ValueError, RuntimeError) as e:
            raise TFLiteFileError(f"{where}: the interpreter fails to run the model ({_first_line(e)})") from e
        for key, d in fetch:
            got[key].append(it.get_tensor(d["index"]).copy())
        for t in layer_tensors:
            layers[t].append(it.get_tensor(t).copy())
    codes = {}
    for key, d in fetch:
        a = np.concatenate(got[key])
        if d["dtype"] == np.float32:
            s, zp = _file_grid(tfl, mapping.point(key).tensor)
            codes[key] = np.round(a / s).astype(np.int64) + zp
        else:
            codes[key] = a.astype(np.int64) - (UINT8_ZERO_POINT_SHIFT if d["dtype"] == np.uint8 else 0)
    io_float = any(d["dtype"] == np.float32 for d, _ in feeds)
    # a tensor without the batch dim ((T, F) of a Linear on a sequence, rows = steps): one sample per row of the stack
    return codes, {t: (np.concatenate(v) if v[0].shape[:1] == (1,) else np.stack(v)).astype(np.int64)
                   for t, v in layers.items()}, io_float


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def _compare(label: str, index: int, torch_out: torch.Tensor, scale: float, zp: int, tfl_codes: np.ndarray,
             classifier: bool, sequence_layout: bool = False, order: np.ndarray | None = None) -> TensorParity:
    codes = _codes(torch_out, scale, zp)
    if order is not None and order.max(initial=-1) < codes[0].size:  # a copy's own element order (copy_layout.py)
        per_sample = order.shape[1:] if order.shape[0] == 1 else order.shape  # (T, F) rows: no batch dim
        tc = codes.reshape(len(codes), -1)[:, order.reshape(-1)].reshape(len(codes), *per_sample)
    else:
        tc = to_tflite_layout(codes, tfl_codes.shape, sequence_layout)
    if tc.shape != tfl_codes.shape and tc.size == tfl_codes.size and tfl_codes.shape[0] % len(codes) == 0:
        tc = tc.reshape(tfl_codes.shape)  # a FULLY_CONNECTED of a sequence: its rows, (T, F) per sample
    if tc.shape != tfl_codes.shape:
        raise ParityError(f"'{label}': torch shape {tuple(torch_out.shape)} vs tflite {tfl_codes.shape}")
    return _stats(label, index, tc, tfl_codes, classifier)


def parity(model: nn.Module, tflite: str | os.PathLike | bytes, inputs, backend: str = "xnnpack",
           layerwise: bool = False, tolerance: int = 1, local: bool = False) -> ParityReport:
    """Run `inputs` through the QAT model in eval mode and through the .tflite interpreter one by one; compare
    integer codes at every model output (and, layerwise, at every fake-quant point).

    inputs: float, torch layout (NCHW for images), batch along dim 0; a tuple/list of such batches, one per
    model input, for models with several inputs. local=True (implies layerwise): teacher-forced, every torch
    layer gets the interpreter's own tensors as inputs, so each layer row is that layer's own mismatch.
    """
    raw = tflite if isinstance(tflite, bytes) else read_model_bytes(tflite)
    path = "<bytes>" if isinstance(tflite, bytes) else str(tflite)
    require_qat_model(model, "compare it with a .tflite")
    check_backend(backend)
    layerwise = layerwise or local
    tfl = validate_model(read_tflite(raw if isinstance(tflite, bytes) else tflite), runnable=True)
    mapping = read_mapping(raw, path)
    xs = as_input_list(inputs, mapping, path)
    if any(x.numel() == 0 or not bool(torch.isfinite(x).all()) for x in xs):
        raise ParityError(f"the parity inputs must be non-empty batches of finite numbers; got shapes "
                          f"{[tuple(x.shape) for x in xs]}, some empty or with NaN or Inf values")
    model_points = getattr(model, POINTS)
    missing = [p.key for p in mapping.points if p.key not in model_points]
    if missing or len(mapping.points) != len(model_points):
        raise ParityError(f"{path} does not match this model: its {len(mapping.points)} fake-quant points vs the "
                          f"model's {len(model_points)} (missing here: {missing[:5]}); was it exported from "
                          "another architecture?")
    points = [p for p in mapping.points if p.tensor is not None]  # None: not located by a non-strict export
    n_tensors = len(tfl.tensors)
    if any(not 0 <= p.tensor < n_tensors for p in points):
        raise ParityError(f"{path}: the stored mapping points past the file's {n_tensors} tensors; re-export")
    unmapped = [k for k in mapping.input_points + mapping.output_points if mapping.point(k).tensor is None]
    if unmapped:
        raise ParityError(f"{path}: the model inputs/outputs {unmapped} have no TFLite tensor in the mapping "
                          "(non-strict export); export with strict=True")

    t_out, t_layers, io_float = _run_interpreter(raw, tfl, mapping, xs, backend,
                                                 [p.tensor for p in points] if layerwise else [], path)
    keys = {p.key for p in points} if layerwise else set(mapping.output_points)
    own = run_recording(model, xs, keys | set(mapping.output_points))
    report = ParityReport(backend, path, len(xs[0]), "float I/O: the model's own QUANTIZE op" if io_float
                          else QUANTIZE_RULES[backend], [], tolerance=tolerance,
                          mode=("local" if local else "end-to-end") if layerwise else "output")
    for key in mapping.output_points:
        p = mapping.point(key)
        report.outputs.append(_compare(p.label, p.tensor, own[key], *_point_grid(model, key), t_out[key], True,
                                       mapping.sequence_layout))
    if not io_float:
        descr = [f"{k}: scale {s:.6g}, zero point {zp}" for k in mapping.input_points
                 for s, zp in [_point_grid(model, k)]]
        report.input_rule += f" (input {'; '.join(descr)})"
    if local:
        own = run_recording(model, xs, keys, _teacher(tfl, {p.key: p.tensor for p in points}, t_layers,
                                                      mapping.sequence_layout))
    orders = copy_orders(model, tfl, mapping, mapping.sequence_layout) if layerwise else {}
    for p in points if layerwise else ():
        report.layers.append(_compare(p.label, p.tensor, own[p.key], *_point_grid(model, p.key),
                                      t_layers[p.tensor], False, mapping.sequence_layout, orders.get(p.key)))
    report.first_divergent = next((t.name for t in report.layers if t.diverges(tolerance)), None)
    return report


def _teacher(tfl: TFLiteModel, tensors: dict[str, int], codes: dict[int, np.ndarray], sequence_layout: bool = False):
    """Teacher for `run_recording`: the interpreter's tensor at each point, dequantized with the file's grid."""

    def forced(key: str, own: torch.Tensor) -> torch.Tensor:
        s, zp = _file_grid(tfl, tensors[key])
        a = to_torch_layout(codes[tensors[key]], own.shape, sequence_layout)
        return torch.from_numpy(((a - zp) * s).astype(np.float32))

    return forced
