"""Parity between the torch QAT simulation (eval mode) and the TFLite interpreter, in units of the
quantization step (LSB): per output, and per layer (every activation fake-quant point matched to its
TFLite tensor through the mapping the exporter stored in the .tflite).

The float simulation reproduces TF's fake quant exactly, but the integer kernels requantize with their
own rounding (tf-quant-semantics.md §5): expect identical codes on most elements and ±1 LSB elsewhere.
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
from ..tflite.mapping import read_mapping
from ..tflite.model import read_tflite
from ..tflite.qtypes import UINT8_ZERO_POINT_SHIFT, int8_zero_point
from ..tflite.validate import validate_model
from ..torch_side.prepare import POINTS, point_module, require_qat_model
from .backends import check_backend
from .interpreter import QUANTIZE_RULES, make_interpreter, quantize_input

__all__ = ["parity", "ParityReport", "TensorParity"]


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

    def table(self) -> str:
        head = ["tensor", "identical", "|Δ|=1", "|Δ|=2", "|Δ|>=3", "max|Δ|", "mean Δ", "top-1"]

        def row(t: TensorParity):
            n = max(t.elements, 1)
            return [t.name, f"{100 * t.identical:.2f}%", f"{100 * t.histogram['1'] / n:.2f}%",
                    f"{100 * t.histogram['2'] / n:.2f}%", f"{100 * t.histogram['>=3'] / n:.2f}%", t.max_abs,
                    f"{t.mean_delta:+.4f}", "-" if t.top1_agreement is None else f"{100 * t.top1_agreement:.2f}%"]

        parts = [format_table(head, [row(t) for t in self.outputs],
                              title=f"parity: torch simulation vs {self.model_path} on backend '{self.backend}', "
                                    f"{self.inputs} inputs (Δ = tflite - torch, in output LSB)")]
        if self.layers:
            parts.append(format_table(head, [row(t) for t in self.layers], title="layerwise, graph order:"))
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


def _to_tflite_layout(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)) if a.ndim == 4 else a


def _point_grid(model: nn.Module, key: str) -> tuple[float, int]:
    s, zp = point_module(model, key).quantizer.scale_zero_point()
    return s, int8_zero_point(zp)


def _codes(x: torch.Tensor, scale: float, zp: int) -> np.ndarray:
    return (torch.round(x.detach().float() / scale).to(torch.int64) + zp).numpy()


def parity(model: nn.Module, tflite: str | os.PathLike | bytes, inputs, backend: str = "xnnpack",
           layerwise: bool = False, tolerance: int = 1) -> ParityReport:
    """Run `inputs` (float, NCHW for images, a batch along dim 0) through the QAT model in eval mode and
    through the .tflite interpreter one by one; compare integer codes at the output (and every layer)."""
    raw = tflite if isinstance(tflite, bytes) else _read(tflite)
    path = "<bytes>" if isinstance(tflite, bytes) else str(tflite)
    require_qat_model(model, "compare it with a .tflite")
    check_backend(backend)
    tfl = validate_model(read_tflite(raw if isinstance(tflite, bytes) else tflite), runnable=True)
    mapping = read_mapping(raw, path)
    x = inputs if isinstance(inputs, torch.Tensor) else torch.as_tensor(np.asarray(inputs))
    x = x.float()
    if x.numel() == 0 or not bool(torch.isfinite(x).all()):
        raise ParityError(f"the parity inputs must be a non-empty batch of finite numbers; got shape "
                          f"{tuple(x.shape)}{'' if x.numel() == 0 else ' with NaN or Inf values'}")
    expected = mapping.input_shapes[0]
    if x.dim() != len(expected) or tuple(x.shape[1:]) != expected[1:]:
        raise ParityError(f"inputs of shape {tuple(x.shape)} do not fit {path}, exported for {list(expected)} "
                          "(batch may differ)")
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

    # torch side: eval simulation, capturing every point
    captured: dict[str, torch.Tensor] = {}
    hooks = []
    if layerwise:
        for p in points:
            mod = point_module(model, p.key)
            hooks.append(mod.register_forward_hook(lambda m, a, out, k=p.key: captured.__setitem__(k, out)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            y = model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)

    # TFLite side
    it = _interpreter(raw, path, backend, layerwise)
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    io_float = inp["dtype"] == np.float32
    in_point = mapping.input_points[0]
    s_in, zp_in = _point_grid(model, in_point)
    xs = _to_tflite_layout(x.numpy())
    tfl_out, tfl_layers = [], {p.key: [] for p in points} if layerwise else {}
    for i in range(len(xs)):
        xi = xs[i:i + 1]
        if io_float:
            feed = xi.astype(np.float32)
        else:
            s, zp = inp["quantization"]
            feed = quantize_input(xi, s, zp, inp["dtype"], backend)
        try:
            it.set_tensor(inp["index"], feed)
            it.invoke()
        except (ValueError, RuntimeError) as e:
            raise TFLiteFileError(f"{path}: the interpreter fails to run the model ({_first_line(e)})") from e
        tfl_out.append(it.get_tensor(out["index"]).copy())
        for p in points if layerwise else ():
            tfl_layers[p.key].append(it.get_tensor(p.tensor).copy())
    out_key = mapping.output_points[0]
    s_out, zp_out = _point_grid(model, out_key)
    t_out = np.concatenate(tfl_out)
    if out["dtype"] == np.float32:
        t_codes = np.round(t_out / s_out).astype(np.int64) + zp_out
    else:
        t_codes = t_out.astype(np.int64) - (UINT8_ZERO_POINT_SHIFT if out["dtype"] == np.uint8 else 0)
    y_codes = _to_tflite_layout(_codes(y, s_out, zp_out))
    if y_codes.shape != t_codes.shape:
        raise ParityError(f"output shapes differ: torch {y_codes.shape} vs tflite {t_codes.shape}")
    outputs = [_stats(mapping.point(out_key).label, out["index"], y_codes, t_codes, classifier=True)]
    report = ParityReport(backend, path, len(xs), "float I/O: the model's own QUANTIZE op" if io_float
                          else QUANTIZE_RULES[backend], outputs, tolerance=tolerance)
    if not io_float:
        report.input_rule += f" (input scale {s_in:.6g}, zero point {zp_in})"
    for p in points if layerwise else ():
        s, zp = _point_grid(model, p.key)
        tc = _to_tflite_layout(_codes(captured[p.key], s, zp))
        lc = np.concatenate(tfl_layers[p.key]).astype(np.int64)
        if lc.shape != tc.shape:
            lc = lc.reshape(tc.shape) if lc.size == tc.size else lc
        if lc.shape != tc.shape:
            raise ParityError(f"layer '{p.label}': torch shape {tc.shape} vs tflite {lc.shape}")
        report.layers.append(_stats(p.label, p.tensor, tc, lc, classifier=False))
    report.first_divergent = next((t.name for t in report.layers if t.diverges(tolerance)), None)
    return report


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def _interpreter(raw: bytes, path: str, backend: str, layerwise: bool):
    """The interpreter on `raw`; one it refuses is a TFLiteFileError naming the file."""
    try:
        return make_interpreter(raw, backend, preserve_all_tensors=layerwise)
    except (ValueError, RuntimeError) as e:
        raise TFLiteFileError(f"{path}: the TFLite interpreter refuses the model ({_first_line(e)})") from e


def _read(path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TFLiteFileError(f"cannot read {path}: {e.strerror}") from e
