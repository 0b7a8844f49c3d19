"""The device's accuracy over a whole data set, batched: a .tflite through the bit-exact integer emulator of one
backend (what the interpreter returns, sample for sample, without running it one image at a time), or a QAT
model through its eval() forward.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from ..tflite.mapping import TFLiteMapping
from ..tflite.metadata import XQAT_KEY, read_metadata
from ..tflite.model import read_tflite
from ..torch_side.point_hooks import hook_key
from ..torch_side.prepare import point_key, point_module
from .backends import check_backend
from .exact import numerics
from .interpreter import quantize_input
from .io_match import io_tensor, read_model_bytes, to_tflite_layout

__all__ = ["evaluate", "EvaluationResult", "METRICS"]

METRICS = ("top1",)


@dataclass
class EvaluationResult:
    """A metric over a data set. `value`: the model's only scored output, or the mean over its scored outputs;
    `per_output`: output label -> value, in model output order, for the outputs that got labels."""

    metric: str
    value: float
    count: int  # samples
    source: str  # what computed it, e.g. "emulator (xnnpack)" or "QAT model (eval forward)"
    per_output: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        outs = "" if len(self.per_output) < 2 else " (" + ", ".join(
            f"{k}: {100 * v:.2f}%" for k, v in self.per_output.items()) + ")"
        return f"{self.metric} {100 * self.value:.2f}% over {self.count} samples, {self.source}{outs}"


def evaluate(model_or_tflite: nn.Module | str | os.PathLike | bytes, loader: Iterable, backend: str = "xnnpack",
             metric: str = "top1", device: str | torch.device | None = None) -> EvaluationResult:
    """`metric` of a QAT model (eval forward, on its own device) or of a .tflite (the integer emulator of
    `backend`, bit-exact with the interpreter, on `device`, default CPU) over `loader`: a DataLoader or any
    iterable of (x, y) batches. x: float, torch layout (NCHW), or a tuple with one batch per model input;
    y: class indices, or a tuple with one per model output (None skips an output); top1 compares the argmax
    over the class (channel) dimension, so a segmentation output scores per pixel with (N, H, W) labels."""
    if metric not in METRICS:
        raise InputError(f"metric must be one of {', '.join(METRICS)}; got {metric!r}")
    check_backend(backend)
    if isinstance(model_or_tflite, nn.Module):
        run, labels, source = _torch_runner(model_or_tflite)
    elif isinstance(model_or_tflite, (str, os.PathLike, bytes)):
        run, labels, source = _emulator_runner(model_or_tflite, backend, device)
    else:
        raise InputError(f"evaluate takes a QAT model or a .tflite (path or bytes); got {type(model_or_tflite)}")
    correct = np.zeros(len(labels), np.int64)
    scored = np.zeros(len(labels), np.int64)  # labels seen per output (None skips one)
    count = 0
    for batch in loader:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise InputError("the loader must yield (x, y) batches: x the inputs, y the class indices")
        x, y = batch
        xs = list(x) if isinstance(x, (tuple, list)) else [x]
        ys = list(y) if isinstance(y, (tuple, list)) else [y]
        if len(ys) != len(labels):
            raise InputError(f"the model has {len(labels)} outputs ({', '.join(labels)}); give y as a tuple with "
                             f"one label batch per output (None to skip one), got {len(ys)}")
        outs, class_dim = run(xs)
        for k, (out, yk) in enumerate(zip(outs, ys)):
            if yk is not None:
                pred, yk = out.argmax(class_dim).cpu(), torch.as_tensor(yk).cpu()
                if pred.shape != yk.shape:
                    raise InputError(f"output '{labels[k]}' predicts {tuple(pred.shape)} classes per batch, but its "
                                     f"labels have shape {tuple(yk.shape)}")
                scored[k] += yk.numel()
                correct[k] += int((pred == yk).sum())
        count += len(xs[0])
    if count == 0:
        raise InputError("the loader yielded no samples")
    if not scored.any():
        raise InputError("every label batch was None: give class indices for at least one output")
    per = {name: float(c) / n for name, c, n in zip(labels, correct, scored) if n}
    return EvaluationResult(metric, float(np.mean(list(per.values()))), count, source, per)


def _torch_runner(model: nn.Module):
    from ..torch_side.prepare import require_qat_model

    require_qat_model(model, "evaluate it")
    param = next(iter(model.parameters()), None)
    dev = param.device if param is not None else torch.device("cpu")
    labels = _output_labels(model)

    @torch.no_grad()
    def run(xs):
        was_training = model.training
        model.eval()
        try:
            y = model(*[torch.as_tensor(x).float().to(dev) for x in xs])
        finally:
            model.train(was_training)
        return (list(y) if isinstance(y, (tuple, list)) else [y]), 1  # torch layout: classes along dim 1

    name = numerics(model)
    return run, labels, "QAT model (eval forward)" if name == "tf" else f"QAT model, exact {name} numerics"


def _output_labels(model: nn.Module) -> list[str]:
    """The label of the fake-quant point on each output of a QAT GraphModule ('output i' where there is none)."""
    out = next(n for n in model.graph.nodes if n.op == "output").args[0]
    nodes = list(out) if isinstance(out, (tuple, list)) else [out]
    keys = [(point_key(n) or hook_key(n)) if hasattr(n, "op") else None for n in nodes]  # hook: exact numerics
    return [point_module(model, k).label if k else f"output {i}" for i, k in enumerate(keys)]


def _emulator_runner(tflite, backend: str, device):
    from .emulate import Emulator

    raw = tflite if isinstance(tflite, bytes) else read_model_bytes(tflite)
    tfl = read_tflite(raw if isinstance(tflite, bytes) else tflite)
    emu = Emulator(tfl, backend, device or "cpu")
    stored = read_metadata(raw, XQAT_KEY)
    where = tfl.source
    if stored is not None:  # an xqat export: inputs/outputs in the torch model's order, by tensor index
        mapping = TFLiteMapping.from_dict(stored, where)
        ins = [io_tensor(tfl, mapping.point(k).tensor, tfl.inputs, where) for k in mapping.input_points]
        outs = [io_tensor(tfl, mapping.point(k).tensor, tfl.outputs, where) for k in mapping.output_points]
        labels = [mapping.point(k).label for k in mapping.output_points]
        sequence_layout = mapping.sequence_layout
    else:  # any other int8 .tflite: the file's order
        ins, outs, labels = list(tfl.inputs), list(tfl.outputs), [tfl.tensor(t).name for t in tfl.outputs]
        sequence_layout = False
    order_out = [list(tfl.outputs).index(t) for t in outs]  # torch output position -> file output position

    def run(xs):
        if len(xs) != len(ins):
            raise InputError(f"{where} has {len(ins)} inputs; got {len(xs)} tensors per batch")
        feeds = []
        for idx in tfl.inputs:  # the file's input order
            t = tfl.tensor(idx)
            a = to_tflite_layout(torch.as_tensor(xs[ins.index(idx)]).detach().float().cpu().numpy(), t.shape,
                                 sequence_layout)
            if t.dtype != "FLOAT32":
                a = quantize_input(a, float(t.scales[0]), int(t.zero_points[0]), t.np_dtype, backend)
            feeds.append(torch.from_numpy(a))
        got = emu.run(feeds)
        return [got[i] for i in order_out], -1  # TFLite layout: classes (channels) last

    return run, labels, f"integer emulator ({backend}, bit-exact with the interpreter)"
