"""One zoo model through the whole chain, as a user would run it: prepare -> a few training steps -> strict
export -> parity and emulator on three backends -> EdgeTPU check. Shared by tests/test_model_zoo.py and
benchmarks/model_zoo.py; every stage's failure is recorded with its one-line reason, never raised."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import xqat
from tests.real_models import ZooModel

BACKENDS = ("xnnpack", "builtin", "reference")


@dataclass
class ZooResult:
    """What happened to one model at one input size; `error` names the first stage that failed and why."""

    model: str
    size: tuple[int, int]
    stage: str = "build"  # the last stage reached: build, prepare, train, export, parity, emulate, exact, edgetpu,
    # done
    error: str = ""
    identical: dict[str, float] = field(default_factory=dict)  # backend -> share of output codes identical
    max_abs: dict[str, int] = field(default_factory=dict)
    top1: dict[str, float | None] = field(default_factory=dict)
    emulator_exact: dict[str, bool] = field(default_factory=dict)
    edgetpu_mapped: float | None = None  # share of ops in the TPU segment
    edgetpu_fully_mapped: bool | None = None
    edgetpu_export: str = ""  # "ok" / the reason export_tflite(edgetpu=True) refused; "" when not asked
    exact: dict[str, float] = field(default_factory=dict)  # backend -> least share of identical codes over all
    # tensors, layerwise, in that backend's exact numerics (1.0: every tensor identical)
    exact_error: str = ""  # why exact numerics could not run (a refused layer), "" otherwise

    @property
    def ok(self) -> bool:
        return self.stage == "done" and not self.error


def _outputs(y) -> list[torch.Tensor]:
    if isinstance(y, torch.Tensor):
        return [y]
    if isinstance(y, dict):
        y = list(y.values())
    return [t for o in y for t in _outputs(o)]


def train_a_few_steps(qat: torch.nn.Module, z: ZooModel, size: tuple[int, int], steps: int = 3) -> None:
    """Random inputs, a loss on every output: ranges observed, BN statistics and weights moved."""
    qat.train()
    opt = torch.optim.SGD([p for p in qat.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    for i in range(steps):
        opt.zero_grad()
        loss = sum(o.float().square().mean() for o in _outputs(qat(*z.example(size, batch=4, seed=100 + i))))
        loss.backward()
        opt.step()
    qat.eval()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def emulator_matches(path: Path, xs: tuple[torch.Tensor, ...], backend: str) -> bool:
    """The integer emulator's outputs equal the interpreter's, bit for bit, on the same int8 inputs (each torch
    input paired with its TFLite input through the exported mapping: the converter may reorder inputs)."""
    from xqat.tflite.mapping import read_mapping
    from xqat.tflite.model import read_tflite
    from xqat.verify.interpreter import make_interpreter, quantize_input
    from xqat.verify.io_match import io_tensor, to_tflite_layout

    raw = path.read_bytes()
    tfl, mapping = read_tflite(raw), read_mapping(raw)
    it = make_interpreter(raw, backend)
    details = {d["index"]: d for d in it.get_input_details()}
    feeds: dict[int, np.ndarray] = {}
    for key, x in zip(mapping.input_points, xs):
        d = details[io_tensor(tfl, mapping.point(key).tensor, list(details), str(path))]
        s, zp = d["quantization"]
        feeds[d["index"]] = quantize_input(to_tflite_layout(x.numpy(), d["shape"]), s, zp, d["dtype"], backend)
    order = [d["index"] for d in it.get_input_details()]  # the emulator takes inputs in the file's order
    expected: list[list[np.ndarray]] = []
    for i in range(len(xs[0])):
        for idx in order:
            it.set_tensor(idx, feeds[idx][i:i + 1])
        it.invoke()
        expected.append([it.get_tensor(o["index"]).copy() for o in it.get_output_details()])
    got = xqat.Emulator(raw, backend=backend).run([feeds[idx] for idx in order])
    want = [np.concatenate([e[k] for e in expected]) for k in range(len(expected[0]))]
    return len(got) == len(want) and all(np.array_equal(np.asarray(g), w) for g, w in zip(got, want))


def check_exact(r: ZooResult, qat: torch.nn.Module, path: Path, xs: tuple[torch.Tensor, ...],
                backends: tuple[str, ...]) -> None:
    """Per backend, the model in that backend's exact numerics against the interpreter, layerwise: the least share
    of identical codes over all tensors (1.0: every tensor identical); a refusal is recorded, not raised."""
    try:
        for b in backends:
            xqat.set_numerics(qat, b)
            rep = xqat.parity(qat, path, xs[0] if len(xs) == 1 else xs, backend=b, layerwise=True)
            r.exact[b] = min(t.identical for t in rep.outputs + rep.layers)
    except xqat.UnsupportedLayerError as e:  # the refused layers, one per line after the first
        r.exact_error = "; ".join(line.strip() for line in str(e).splitlines()[1:])[:300] or _first_line(e)
    finally:
        xqat.set_numerics(qat, "tf")


def check_model(z: ZooModel, size: tuple[int, int], workdir: str | os.PathLike, n_inputs: int = 8,
                backends: tuple[str, ...] = BACKENDS) -> ZooResult:
    """Run `z` at `size` through the chain; stop at the first failing stage and record why."""
    r = ZooResult(z.name, size)
    path = Path(workdir) / (z.name.replace("/", "_").replace(" ", "_") + f"_{size[0]}x{size[1]}.tflite")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.manual_seed(0)
            model = z.build().eval()
            r.stage = "prepare"
            qat = xqat.prepare_qat(model, z.example(size))
            r.stage = "train"
            train_a_few_steps(qat, z, size)
            r.stage = "export"
            xqat.export_tflite(qat, z.example(size), path)
            r.stage = "parity"
            xs = z.example(size, batch=n_inputs, seed=7)
            for b in backends:
                rep = xqat.parity(qat, path, xs[0] if len(xs) == 1 else xs, backend=b)
                worst = min(rep.outputs, key=lambda t: t.identical)
                r.identical[b] = min(t.identical for t in rep.outputs)
                r.max_abs[b] = max(t.max_abs for t in rep.outputs)
                r.top1[b] = worst.top1_agreement
            r.stage = "emulate"
            for b in backends:
                r.emulator_exact[b] = emulator_matches(path, xs, b)
            r.stage = "exact"
            check_exact(r, qat, path, xs, backends)
            r.stage = "edgetpu"
            tpu = xqat.check_edgetpu(path)
            r.edgetpu_mapped, r.edgetpu_fully_mapped = tpu.mapped_op_share, tpu.fully_mapped
            if z.edgetpu:
                try:
                    xqat.export_tflite(qat, z.example(size), path.with_suffix(".edgetpu.tflite"), edgetpu=True)
                    r.edgetpu_export = "ok"
                except xqat.XQATError as e:
                    r.edgetpu_export = _first_line(e)
            r.stage = "done"
        except Exception as e:  # recorded, not raised: the table shows every model's first failure
            r.error = _first_line(e)
    return r
