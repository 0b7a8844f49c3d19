"""`export_tflite`: a trained QAT model -> Q/DQ ONNX -> onnx2tf (xqat handlers) -> TFLite converter ->
a full-integer .tflite whose every scale and zero point is the one learned in torch, verified.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import fx, nn

from ..errors import ExportError
from ..tflite.mapping import MappedPoint, TFLiteMapping, write_mapping
from ..tflite.qtypes import IO_DTYPES
from ..torch_side.point_hooks import hook_key
from ..torch_side.prepare import point_key, quant_points
from .atomic import atomic_write_bytes, check_writable
from .report import ExportReport, build_report
from .snapping import snap_ranges
from .tflite_convert import convert_qdq_onnx
from .torch_to_onnx import export_onnx

__all__ = ["export_tflite", "tflite_mapping", "save_report_json"]


def _example(example_inputs, batch_size: int | None) -> tuple[torch.Tensor, ...]:
    xs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    out = []
    for i, x in enumerate(xs):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ExportError(f"example input {i} must be a float tensor (NCHW for images), got "
                              f"{type(x).__name__}{'' if not isinstance(x, torch.Tensor) else ' ' + str(x.dtype)}")
        if x.dim() == 0:
            raise ExportError(f"example input {i} must have a batch dimension")
        x = x.detach().float().cpu()
        if batch_size is not None:
            x = x[:1].expand(batch_size, *x.shape[1:]).contiguous()
        out.append(x)
    return tuple(out)


def export_tflite(model: nn.Module, example_inputs, path: str | os.PathLike, io_dtype: str = "int8", *,
                  batch_size: int | None = 1, saved_model_dir: str | os.PathLike | None = None,
                  edgetpu: bool = False, strict: bool = True, snap_model: bool = False) -> ExportReport:
    """Export a `prepare_qat` model as a full-integer .tflite and verify it against the torch side.

    - `io_dtype`: "int8" (default), "uint8", or "float32" (float I/O around an int8 graph).
    - `batch_size`: static batch (1 by default, as the EdgeTPU needs); None keeps the example's.
    - `saved_model_dir`: also keep the TF graph of FakeQuant ops as a SavedModel there.
    - `edgetpu`: refuse layers that can never map to the EdgeTPU, and check the result with
      `xqat.check_edgetpu` (raising on FAIL or CPU findings).
    - `strict`: raise ExportError if any check of the report fails (nothing is written then).
    - `snap_model`: after a successful export, also snap `model`'s ranges in place (`xqat.snap_ranges`).

    The export converts a copy of `model`: the .tflite always gets the snapped grids (each learned range
    rewritten so TF's nudge and the TFLite converter agree, `xqat.snap_range`), and `report.snaps` lists every
    range whose deployed form differs from the stored one. `model` keeps its trained ranges unless
    `snap_model=True`; its simulation differs from the .tflite only where a snap moved the grid
    (`scale_moved_ulps`, rare) or gave an all-zero range a grid. The file is written atomically: a failed
    export leaves nothing behind.
    """
    if io_dtype not in IO_DTYPES:
        raise ExportError(f"io_dtype must be one of {IO_DTYPES}, got {io_dtype!r}")
    target = check_writable(path, what=".tflite file")
    if edgetpu:
        from ..edgetpu.layers import edgetpu_layer_problems

        problems = edgetpu_layer_problems(model)
        if problems:
            raise ExportError("layers that can never run on the EdgeTPU:\n  " + "\n  ".join(problems))
    t0 = time.perf_counter()
    example = _example(example_inputs, batch_size)
    onnx_export = export_onnx(model, example)
    t1 = time.perf_counter()
    conversion = convert_qdq_onnx(onnx_export.model, io_dtype=io_dtype, batch_size=batch_size,
                                  saved_model_dir=saved_model_dir)
    report = build_report(model, onnx_export, conversion, str(target), [tuple(x.shape) for x in example])
    report.seconds = {"torch->onnx": t1 - t0, **{k: v for k, v in conversion.seconds.items() if k != "total"},
                      "total": time.perf_counter() - t0}
    if strict and not report.ok:
        raise ExportError(f"the .tflite for {type(model).__name__} failed verification, nothing was written:\n  "
                          + "\n  ".join(report.problems()))
    if edgetpu:
        from ..edgetpu.check import check_edgetpu

        tpu = check_edgetpu(conversion.tflite)
        if not tpu.fully_mapped:
            raise ExportError("the .tflite would not run fully on the EdgeTPU, nothing was written:\n"
                              + tpu.table())
    mapping = tflite_mapping(model, report, [tuple(x.shape) for x in example], conversion.sequence_layout)
    atomic_write_bytes(target, write_mapping(conversion.tflite, mapping))
    if snap_model:
        snap_ranges(model)
    return report


def tflite_mapping(model: fx.GraphModule, report: ExportReport, input_shapes: list[tuple[int, ...]],
                   sequence_layout: bool = False) -> TFLiteMapping:
    """What the .tflite carries for parity and emulation: every fake-quant point's TFLite tensor in graph order,
    with its torch label and range group, and which points are the model's inputs and outputs.
    `sequence_layout`: the conversion kept 3-D tensors in torch's order (`Conversion.sequence_layout`)."""
    points = tuple(MappedPoint(p.key, report.point_tensors.get(p.key), p.label, p.group) for p in quant_points(model))
    nodes = list(model.graph.nodes)
    inputs = []
    for n in nodes:
        if n.op == "placeholder":
            key = _input_point(n)
            if key is None:
                raise ExportError(f"model input '{n.name}' does not go straight into a fake-quant point; was the "
                                  "model made by xqat.prepare_qat?")
            inputs.append(key)
    outputs = []
    for i, arg in enumerate(_flat_outputs(nodes)):
        key = (point_key(arg) or hook_key(arg)) if isinstance(arg, fx.Node) else None  # hook: exact numerics
        if key is None:
            raise ExportError(f"model output {i} is not quantized (its last op '{getattr(arg, 'name', arg)}' has no "
                              "fake-quant point)")
        outputs.append(key)
    return TFLiteMapping(points, tuple(inputs), tuple(outputs), report.io_dtype, tuple(map(tuple, input_shapes)),
                         sequence_layout)


def _input_point(node: fx.Node) -> str | None:
    """The fake-quant point an input placeholder feeds, through single-use checks (prepare's input check)."""
    for _ in range(4):
        users = [u for u in node.users if hook_key(u) is None]  # exact numerics' hooks read the input too
        if len(users) != 1:
            return None
        node = users[0]
        if point_key(node) is not None:
            return point_key(node)
    return None


def _flat_outputs(nodes: list[fx.Node]) -> list:
    """The graph output's values, flattened (a tuple, list or dict of tensors gives several outputs)."""
    out: list = []
    fx.node.map_aggregate(next(n for n in nodes if n.op == "output").args[0], out.append)
    return out


def save_report_json(report: ExportReport, path: str | os.PathLike) -> Path:
    """Write the report as JSON next to the model (atomic)."""
    return atomic_write_bytes(path, report.to_json().encode())
