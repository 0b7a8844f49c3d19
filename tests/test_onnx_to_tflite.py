"""ONNX (Q/DQ) -> onnx2tf with xqat's handlers -> TF FakeQuant graph -> full-integer TFLite.

Real torch.onnx export, onnx2tf 1.28.8, TFLite converter, LiteRT interpreter and onnxruntime; nothing
mocked. Each model converts once (module fixtures); every check reads the ONNX Q/DQ directly, so the
expectations do not come from the code under test. See docs/numerics.md#converter-qparams/#weights,
docs/numerics.md#export-pipeline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from tests.tflite_oracle import interpreter
from xqat.errors import ExportError, OnnxToTfVersionError
from xqat.export.torch_to_onnx import OPSET
from xqat.torch_side.qparams import snap_range

# ------------------------------------------------------------------------------------------------
# Q/DQ ONNX models built from tiny torch modules (the contract of the torch side's ONNX writer)
# ------------------------------------------------------------------------------------------------

# TFLite's fixed output grids (quantization_spec.md, docs/numerics.md#fixed-output-grids)
LOGISTIC_QP = (1.0 / 256.0, -128)
TANH_QP = (1.0 / 128.0, 0)


class QDQNet(nn.Module):
    """Float net whose forward marks activation points `q(name, x)` and weights `w(name, module)`.

    The first (observe) pass records ranges; `calibrate` then fixes a snapped (scale, zero point) per
    point, clamps weights to ±127·scale, and the forward emits torch fake-quants that export as Q/DQ.
    """

    fixed: dict[str, tuple[float, int]] = {}  # points with fixed grids (sigmoid / softmax / tanh outputs)
    tied: dict[str, str] = {}  # point -> point whose grid it reuses (same-scale ops: pools, concat, pad)
    # points whose zero point is built on a .5 tie before snapping (docs/numerics.md#converter-qparams)
    ties: tuple[str, ...] = ()
    uint8 = False  # export activation Q/DQ with uint8 zero points (TF's native grid) instead of int8

    def __init__(self):
        super().__init__()
        self.observed: dict[str, tuple[float, float]] = {}
        self.act_qp: dict[str, tuple[float, int]] | None = None
        self.w_scale: dict[str, torch.Tensor] = {}
        self.snapped_disagreed: list[str] = []

    def q(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if self.act_qp is None:
            lo, hi = float(x.min()), float(x.max())
            old = self.observed.get(name, (lo, hi))
            self.observed[name] = (min(old[0], lo), max(old[1], hi))
            return x
        s, z = self.act_qp[self.tied.get(name, name)]
        if self.uint8:
            return torch.fake_quantize_per_tensor_affine(x, s, z + 128, 0, 255)
        return torch.fake_quantize_per_tensor_affine(x, s, z, -128, 127)

    def w(self, name: str, m: nn.Module) -> torch.Tensor:
        if self.act_qp is None:
            return m.weight
        s = self.w_scale[name]
        if s.dim() == 0:  # Linear: per-tensor symmetric
            return torch.fake_quantize_per_tensor_affine(m.weight, float(s), 0, -128, 127)
        return torch.fake_quantize_per_channel_affine(m.weight, s, torch.zeros_like(s, dtype=torch.int32), 0,
                                                      -128, 127)


def _tie_range(lo: float, hi: float) -> tuple[float, float]:
    """Move `lo` so that TF's float zero point -lo/scale sits on k + 0.5 (where TF and the converter split)."""
    s = (hi - lo) / 255.0
    k = np.floor(-lo / s) + 0.5
    return -k * hi / (255.0 - k), hi


def calibrate(net: QDQNet, x: torch.Tensor) -> QDQNet:
    """Observe ranges on `x`, then fix snapped activation grids and symmetric int8 weight scales."""
    with torch.no_grad():
        net(x)
    act: dict[str, tuple[float, int]] = {}
    for name, (lo, hi) in net.observed.items():
        if name in net.fixed:
            act[name] = net.fixed[name]
            continue
        lo, hi = min(lo, 0.0) * 0.9, max(hi, 0.0) * 0.9 + 1e-3  # "learned" ranges clip a little
        if name in net.ties and lo < 0:
            lo, hi = _tie_range(lo, hi)
        r = snap_range(lo, hi)
        if r.converter_disagreed:
            net.snapped_disagreed.append(name)
        act[name] = (float(np.float32(r.scale)), int(r.zero_point) - 128)
    for name, m in net.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            amax = m.weight.detach().abs().flatten(1).max(1).values
            if isinstance(m, nn.Linear):
                s = torch.tensor(float(amax.max()) / 127.0, dtype=torch.float32)
            else:  # some channels clip (0.9), some leave headroom (1.1)
                fac = torch.where(torch.arange(amax.numel()) % 2 == 0, 0.9, 1.1)
                s = (amax * fac / 127.0).float()
            net.w_scale[name] = s
            lim = 127 * s if s.dim() == 0 else (127 * s).view(-1, *[1] * (m.weight.dim() - 1))
            with torch.no_grad():  # narrow range: codes in [-127, 127] (the torch side clamps the same way)
                m.weight.copy_(torch.maximum(torch.minimum(m.weight, lim), -lim))
    net.act_qp = act
    return net


# ------------------------------------------------------------------------------------------------
# Test-side verifier: each ONNX quantized tensor's (scale, zero point) next to the .tflite's
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QParamCheck:
    """One quantized tensor: what the ONNX Q/DQ says and what the .tflite stores."""

    onnx_name: str
    kind: str  # "activation" | "weight" | "bias"
    expected_scale: np.ndarray  # float32
    expected_zero_point: np.ndarray  # int64 (int8 code space)
    scale: np.ndarray | None
    zero_point: np.ndarray | None

    @property
    def equal(self) -> bool:
        """Bit-for-bit equal; a per-tensor value also matches a per-channel array of that value."""
        if self.scale is None or self.zero_point is None or not self.scale.size:
            return False
        return _same(self.scale, self.expected_scale) and _same(self.zero_point, self.expected_zero_point)


def _same(got: np.ndarray, expected: np.ndarray) -> bool:
    if got.size == expected.size:
        return bool(np.array_equal(got.ravel(), expected.ravel()))
    if got.size == 1 or expected.size == 1:  # per-tensor stored once vs repeated per channel
        return bool(np.all(got.ravel() == expected.ravel()[0]) and np.all(expected.ravel() == got.ravel()[0]))
    return False


def qparam_checks(c) -> list[QParamCheck]:
    """Per quantized tensor of a Conversion (activations, weights, biases): ONNX (scale, zero point) vs .tflite."""
    t = c.model.tensors
    rows: list[QParamCheck] = []

    def row(name, kind, idx, s, z):
        got = (None, None) if idx is None else (t[idx].scales, t[idx].zero_points)
        rows.append(QParamCheck(name, kind, s, z, *got))

    for name, a in c.plan.activations.items():
        idx = c.tensor_map.get(name)
        if name in c.fused:  # absorbed (PAD into CONV_2D): the grid of the data the op reads
            idx = c.model.ops[c.fused[name]].inputs[0]
        row(name, "activation", idx, np.float32([a.scale]), np.int64([a.zero_point_int8]))
    for w in c.plan.weights.values():
        row(w.name, "weight", c.weight_map.get(w.name), w.scales, np.zeros(w.scales.size, np.int64))
        if w.bias is not None and w.input_activation is not None:  # int32 bias, scale s_in * s_w
            s_in = c.plan.activations[w.input_activation].converter_scale
            row(w.bias, "bias", c.bias_map.get(w.bias), w.bias_scales(s_in), np.zeros(w.scales.size, np.int64))
    return rows


def export_qdq_onnx(net: nn.Module, x: torch.Tensor, opset: int = OPSET) -> onnx.ModelProto:
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), f, dynamo=False, opset_version=opset, input_names=["input"],
                          output_names=[f"out{i}" for i in range(getattr(net, "n_outputs", 1))])
    return onnx.load_from_string(f.getvalue())


class PlainNet(QDQNet):
    """conv+ReLU, conv stride 2 + ReLU6 (Clip), MaxPool, GlobalAveragePool, Flatten, Linear."""

    tied = {"mp": "c2"}
    ties = ("in", "c1")

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.q("in", x)
        x = self.q("c1", F.relu(F.conv2d(x, self.w("c1", self.c1), self.c1.bias, padding=1)))
        x = self.q("c2", F.relu6(F.conv2d(x, self.w("c2", self.c2), self.c2.bias, stride=2, padding=1)))
        x = self.q("mp", F.max_pool2d(x, 2))
        x = self.q("gap", F.adaptive_avg_pool2d(x, 1))
        return self.q("fc", F.linear(torch.flatten(x, 1), self.w("fc", self.fc), self.fc.bias))


class DwSepResidual(QDQNet):
    """Depthwise-separable block with residual Add, Concat, padded stride-2 conv, AvgPool, ReduceMean."""

    tied = {"cat": "a", "sum": "a", "ap": "c3"}
    ties = ("dw", "pw")

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 8, 1)
        self.c3 = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 6)

    def forward(self, x):
        x = self.q("in", x)
        a = self.q("a", F.relu(F.conv2d(x, self.w("c1", self.c1), self.c1.bias, padding=1)))
        b = self.q("dw", F.relu6(F.conv2d(a, self.w("dw", self.dw), self.dw.bias, padding=1, groups=8)))
        b = self.q("pw", F.conv2d(b, self.w("pw", self.pw), self.pw.bias))
        s = self.q("sum", F.relu(a + b))
        c = self.q("cat", torch.cat([s, a], 1))
        c = self.q("c3", F.relu(F.conv2d(c, self.w("c3", self.c3), self.c3.bias, stride=2, padding=1)))
        c = self.q("ap", F.avg_pool2d(c, 2))
        g = self.q("mean", c.mean((2, 3)))
        return self.q("fc", F.linear(g, self.w("fc", self.fc), self.fc.bias))


class Heads(QDQNet):
    """Explicit Pad, SiLU-style Mul, and sigmoid / tanh / softmax heads (three outputs)."""

    n_outputs = 3
    fixed = {"sig": LOGISTIC_QP, "gate": LOGISTIC_QP, "tanh": TANH_QP, "soft": LOGISTIC_QP}
    tied = {"pad": "in"}

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.q("in", x)
        x = self.q("pad", F.pad(x, (1, 1, 1, 1)))
        a = self.q("a", F.conv2d(x, self.w("c1", self.c1), self.c1.bias))
        a = self.q("silu", a * self.q("gate", torch.sigmoid(a)))
        g = self.q("gap", F.adaptive_avg_pool2d(a, 1).flatten(1))
        y = self.q("fc", F.linear(g, self.w("fc", self.fc), self.fc.bias))
        return self.q("sig", torch.sigmoid(y)), self.q("tanh", torch.tanh(y)), self.q("soft", F.softmax(y, -1))


class TieChain(QDQNet):
    """Stress: a chain of 1x1 convs whose activation ranges all sit on zero-point ties
    (docs/numerics.md#converter-qparams)."""

    def __init__(self, n: int = 10):
        super().__init__()
        self.n = n
        for i in range(n):
            self.add_module(f"c{i}", nn.Conv2d(4, 4, 1))

    def forward(self, x):
        x = self.q("in", x)
        for i in range(self.n):
            x = self.q(f"t{i}", F.conv2d(x, self.w(f"c{i}", getattr(self, f"c{i}")), getattr(self, f"c{i}").bias))
        return x


def tie_chain(n: int = 10, seed: int = 7) -> QDQNet:
    """TieChain with ranges built directly on ties k + 0.5 (± 1e-6) and then snapped."""
    torch.manual_seed(seed)
    net = calibrate(TieChain(n).eval(), torch.rand(4, 4, 6, 6) * 2 - 1)
    rng = np.random.default_rng(seed)
    net.snapped_disagreed = []
    for i in range(n):
        s = float(rng.uniform(2e-3, 2e-2))
        k = int(rng.integers(20, 235)) + 0.5 + float(rng.uniform(-1e-6, 1e-6))
        r = snap_range(np.float32(-k * s), np.float32((255 - k) * s))
        net.snapped_disagreed += [f"t{i}"] if r.converter_disagreed else []
        net.act_qp[f"t{i}"] = (float(np.float32(r.scale)), int(r.zero_point) - 128)
    return net


class PlainNetUint8(PlainNet):
    uint8 = True


class Untied(QDQNet):
    """Grids that prepare_qat never produces, to check the conversion reports (or refuses) them. `mode`:
    "requant": MaxPool output on a wider grid than its input (the TF 2.21 converter keeps a requantizing
    QUANTIZE); "reject": a second, wider Q/DQ right after the first, then MaxPool (the converter merges
    the pair and refuses the MaxPool: same-scale constraint); "two_grids": one tensor on two grids (the
    converter leaves the producing conv in float)."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.tied = {"mp": "wide"} if mode != "requant" else {}
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = self.q("in", x)
        r = F.relu(F.conv2d(x, self.w("c1", self.c1), self.c1.bias, padding=1))
        a = self.q("a", r)
        if self.mode == "two_grids":
            m = self.q("mp", F.max_pool2d(self.q("wide", r), 2))
        elif self.mode == "reject":
            m = self.q("mp", F.max_pool2d(self.q("wide", a), 2))
        else:
            m = self.q("wide", F.max_pool2d(a, 2))
        g = torch.cat([m.mean((2, 3)), a.mean((2, 3))], 1)
        return self.q("fc", F.linear(self.q("gap", g), self.w("fc", self.fc), self.fc.bias))


SHAPES = {"plain": (1, 3, 16, 16), "dwsep": (1, 3, 12, 12), "heads": (1, 3, 10, 10), "ties": (1, 4, 6, 6),
          "plain_u8": (1, 3, 16, 16), "requant": (1, 3, 8, 8), "reject": (1, 3, 8, 8), "two_grids": (1, 3, 8, 8)}


def build(name: str) -> tuple[QDQNet, onnx.ModelProto]:
    """The named test model, calibrated, and its Q/DQ ONNX (same seed, same model every time)."""
    shape = SHAPES[name]
    if name == "ties":
        net = tie_chain()
    else:
        torch.manual_seed({"plain": 0, "dwsep": 1, "heads": 2, "plain_u8": 0}.get(name, 4))
        cls = {"plain": PlainNet, "dwsep": DwSepResidual, "heads": Heads, "plain_u8": PlainNetUint8}.get(
            name, functools.partial(Untied, name))
        net = calibrate(cls().eval(), torch.rand(16, *shape[1:]) * 2 - 1)
        if isinstance(net, Untied):
            r = snap_range(0.0, net.observed["a"][1] * 1.7)
            net.act_qp["wide"] = (float(np.float32(r.scale)), int(r.zero_point) - 128)
    return net, export_qdq_onnx(net, torch.rand(shape) * 2 - 1)


def sample(name: str, seed: int) -> np.ndarray:
    """Inputs like the calibration data: uniform in [-1, 1)."""
    return np.random.default_rng(seed).uniform(-1, 1, SHAPES[name]).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Independent readers of the ONNX Q/DQ (expectations) and runners (onnxruntime, LiteRT)
# ------------------------------------------------------------------------------------------------


def onnx_qdq(model: onnx.ModelProto):
    """(activations {DQ output: (scale f32, int8 zp)}, weights {initializer: (scales f32, int8 codes, op)})."""
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    producer = {o: n for n in model.graph.node for o in n.output}
    users = {}
    for n in model.graph.node:
        for i, x in enumerate(n.input):
            users.setdefault(x, []).append((n, i))
    acts, weights = {}, {}
    for n in model.graph.node:
        if n.op_type != "DequantizeLinear":
            continue
        s, z = consts[n.input[1]].astype(np.float32), consts[n.input[2]]
        q = producer[n.input[0]]
        if q.input[0] in consts:  # weight: ONNX QuantizeLinear, round half to even, float32 division
            w = consts[q.input[0]]
            shape = [-1] + [1] * (w.ndim - 1) if s.size > 1 else []
            codes = np.clip(np.rint(w / s.reshape(shape)), -128, 127).astype(np.int8)
            op = users[n.output[0]][0][0]
            weights[q.input[0]] = (s.reshape(-1), codes, op)
        else:
            zp = int(z) - 128 if z.dtype == np.uint8 else int(z)
            acts[n.output[0]] = (np.float32(s), zp)
    return acts, weights


def input_grid(model: onnx.ModelProto) -> tuple[np.float32, int]:
    """(scale, int8 zero point) of the Q/DQ right at the graph input."""
    acts, _ = onnx_qdq(model)
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "input")
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0])
    return acts[dq.output[0]]


def ort_run(model: onnx.ModelProto, x: np.ndarray, extra_outputs=()) -> dict[str, np.ndarray]:
    """onnxruntime on the Q/DQ model, no graph optimization: the float Q/DQ simulation itself."""
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for name in extra_outputs:
        if name not in have:
            m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {sess.get_inputs()[0].name: x})))


def nhwc(a: np.ndarray) -> np.ndarray:
    return a.transpose(0, 2, 3, 1) if a.ndim == 4 else a


def on_input_grid(x: np.ndarray, scale: float, zp: int) -> np.ndarray:
    """The float input both runtimes see identically: already on the input's int8 grid."""
    q = np.clip(np.rint(x / np.float32(scale)) + zp, -128, 127)
    return ((q - zp) * np.float32(scale)).astype(np.float32)


def run_tflite(it, x_nhwc: np.ndarray) -> dict[int, np.ndarray]:
    """Feed a float NHWC input (quantized per the input's dtype); dequantized outputs by tensor index."""
    d = it.get_input_details()[0]
    if d["dtype"] == np.float32:
        it.set_tensor(d["index"], x_nhwc)
    else:
        s, z = d["quantization"]
        info = np.iinfo(d["dtype"])
        it.set_tensor(d["index"], np.clip(np.rint(x_nhwc / s) + z, info.min, info.max).astype(d["dtype"]))
    it.invoke()
    outs = {}
    for o in it.get_output_details():
        y = it.get_tensor(o["index"])
        if o["dtype"] != np.float32:
            s, z = o["quantization"]
            y = (y.astype(np.float32) - z) * np.float32(s)
        outs[o["index"]] = y
    return outs


# ------------------------------------------------------------------------------------------------
# Fixtures: each model converts once, inside an empty working directory, with network use recorded
# ------------------------------------------------------------------------------------------------

_ENV_AT_IMPORT = os.environ.get("CUDA_VISIBLE_DEVICES")
_NETWORK_EVENTS: list[tuple] = []
_RECORDING = [False]


def _audit(event: str, args: tuple) -> None:
    if _RECORDING[0] and event in ("socket.connect", "socket.getaddrinfo", "urllib.Request"):
        _NETWORK_EVENTS.append((event, args))


sys.addaudithook(_audit)  # audit hooks cannot be removed; it records only while _RECORDING is set


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """An empty CWD and workdir for every conversion of this module."""
    cwd = tmp_path_factory.mktemp("cwd")
    work = tmp_path_factory.mktemp("work")
    return cwd, work


@contextlib.contextmanager
def in_sandbox(sandbox):
    """Run inside the sandbox CWD, recording any network attempt."""
    cwd, _ = sandbox
    _RECORDING[0] = True
    try:
        with contextlib.chdir(cwd):
            yield
    finally:
        _RECORDING[0] = False


@pytest.fixture(scope="module")
def convert(sandbox):
    """convert(name, io_dtype) -> (net, onnx model, Conversion), cached per (name, io_dtype)."""
    from xqat.export.tflite_convert import convert_qdq_onnx

    cache = {}

    def get(name: str, io_dtype: str = "int8"):
        if (name, io_dtype) not in cache:
            if name not in {k[0] for k in cache}:
                built = build(name)
            else:
                built = next(v[:2] for k, v in cache.items() if k[0] == name)
            with in_sandbox(sandbox):
                conv = convert_qdq_onnx(built[1], io_dtype=io_dtype, workdir=sandbox[1])
            cache[(name, io_dtype)] = (*built, conv)
        return cache[(name, io_dtype)]

    return get


INT8_MODELS = ["plain", "dwsep", "heads", "ties", "plain_u8"]
ALL_VARIANTS = [(m, "int8") for m in INT8_MODELS] + [("plain", "uint8"), ("plain", "float32")]


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,io_dtype", ALL_VARIANTS)
def test_full_integer_no_requantize_no_transpose(convert, name, io_dtype):
    _, _, c = convert(name, io_dtype)
    m = c.model
    if io_dtype == "float32":  # only the model's own float I/O, behind a QUANTIZE / DEQUANTIZE
        assert sorted(c.float_tensors()) == sorted(m.inputs + m.outputs)
    else:
        assert c.float_tensors() == []
        assert {m.tensors[i].dtype for i in m.inputs + m.outputs} == {io_dtype.upper()}
    assert c.inner_ops("QUANTIZE") == [] and c.inner_ops("DEQUANTIZE") == []
    assert "TRANSPOSE" not in m.op_names()
    assert all(t.shape[0] == 1 and -1 not in t.shape_signature for t in (m.tensors[i] for i in m.inputs))
    assert m.tensors[m.inputs[0]].shape[-1] == SHAPES[name][1]  # NHWC


@pytest.mark.parametrize("name,io_dtype", ALL_VARIANTS)
def test_every_qparam_equals_the_onnx_qdq(convert, name, io_dtype):
    """Activations: (scale, zero point) bit for bit; weights: per-channel scales, zero point 0."""
    _, model, c = convert(name, io_dtype)
    acts, weights = onnx_qdq(model)
    assert set(c.tensor_map) | set(c.fused) == set(acts) and c.unmapped == ()
    t = c.model.tensors
    for onnx_name, (s, z) in acts.items():  # an absorbed tensor (PAD in CONV_2D): the op's input grid
        idx = c.tensor_map[onnx_name] if onnx_name in c.tensor_map else c.model.ops[c.fused[onnx_name]].inputs[0]
        tt = t[idx]
        assert tt.dtype == "INT8", onnx_name
        assert tt.scales.tolist() == [s] and tt.zero_points.tolist() == [z], (onnx_name, tt.name)
    assert set(c.weight_map) == set(weights)
    for wname, (s, _, _) in weights.items():
        tw = t[c.weight_map[wname]]
        assert tw.dtype == "INT8" and np.all(tw.zero_points == 0)
        assert np.array_equal(tw.scales, s) or (s.size == 1 and np.all(tw.scales == s[0])), wname
    assert all(r.equal for r in qparam_checks(c))


@pytest.mark.parametrize("name", INT8_MODELS)
def test_int8_weights_equal_onnx_codes_and_bias_scale(convert, name):
    _, model, c = convert(name)
    _, weights = onnx_qdq(model)
    t = c.model.tensors
    for wname, (s, codes, op) in weights.items():
        tw = t[c.weight_map[wname]]
        tfl_op = next(o for o in c.model.ops if len(o.inputs) > 1 and o.inputs[1] == tw.index)
        if tfl_op.name == "CONV_2D":
            ref = codes.transpose(0, 2, 3, 1)  # OIHW -> OHWI
        elif tfl_op.name == "DEPTHWISE_CONV_2D":
            ref = codes.transpose(1, 2, 3, 0)  # [C, 1, kh, kw] -> [1, kh, kw, C]
        else:
            assert tfl_op.name == "FULLY_CONNECTED" and op.op_type == "Gemm"
            ref = codes  # [out, in]
        assert np.array_equal(tw.data, ref), wname
        # int32 bias, scale s_in * s_w (within 1 float32 ulp of the rounded product; docs/numerics.md#bias)
        tb = t[tfl_op.inputs[2]]
        s_in = np.float64(t[tfl_op.inputs[0]].scales[0])
        expect = (s_in * np.broadcast_to(s, tb.scales.shape).astype(np.float64)).astype(np.float32)
        assert tb.dtype == "INT32" and np.all(tb.zero_points == 0)
        assert np.all(np.abs(tb.scales.view(np.int32) - expect.view(np.int32)) <= 1), wname
        assert c.bias_map[op.input[2]] == tb.index


@pytest.mark.parametrize("name,io_dtype", ALL_VARIANTS)
def test_outputs_within_one_lsb_of_onnxruntime(convert, name, io_dtype):
    """Over a batch of inputs: >= 99% of output elements within 1 LSB, identical argmax of class scores."""
    _, model, c = convert(name, io_dtype)
    acts, _ = onnx_qdq(model)
    it = interpreter(c.tflite, "builtin")
    outs = [o.name for o in model.graph.output]
    within, total, argmax_same, argmax_total = 0, 0, 0, 0
    for seed in range(8):
        x = on_input_grid(sample(name, seed), *input_grid(model))
        ref = ort_run(model, x)
        got = run_tflite(it, nhwc(x))
        for out_name in outs:
            y, r, lsb = got[c.io_tensor(out_name)], nhwc(ref[out_name]), acts[out_name][0]
            within += int(np.sum(np.abs(y - r) <= lsb * 1.0001))
            total += r.size
            if r.ndim == 2:  # class scores (feature maps have many equal codes: argmax is arbitrary)
                argmax_same += int(np.argmax(y) == np.argmax(r))
                argmax_total += 1
    assert within / total >= 0.99, (within, total)
    assert argmax_same == argmax_total


@pytest.mark.parametrize("name", INT8_MODELS + ["requant", "two_grids"])
def test_tensor_map_verified_on_every_activation(convert, name):
    """The recorded ONNX -> TFLite tensor map is right for every activation: qparams equal and values
    within 1 LSB of onnxruntime's DQ outputs on a probe input (all tensors preserved)."""
    _, model, c = convert(name)
    acts, _ = onnx_qdq(model)
    it = interpreter(c.tflite, "builtin", preserve=True)
    x = on_input_grid(sample(name, 11), *input_grid(model))
    ref = ort_run(model, x, extra_outputs=list(acts))
    run_tflite(it, nhwc(x))
    assert set(c.tensor_map) | set(c.fused) == set(acts) and c.unmapped == ()
    for onnx_name, idx in c.tensor_map.items():
        s, z = acts[onnx_name]
        got = (it.get_tensor(idx).astype(np.float32) - z) * s
        r = nhwc(ref[onnx_name])
        if c.located_by[onnx_name] != "producer" and got.size == r.size:  # through a dropped reshape
            got = got.reshape(r.shape)
        assert got.shape == r.shape, onnx_name
        diff = np.abs(got - r) / s
        assert np.mean(diff <= 1.0001) >= 0.99 and diff.max() <= 2.0001, (onnx_name, float(diff.max()))


def test_requantize_is_reported(convert):
    """A same-scale op with untied grids, where the converter requantizes: inner_ops sees the QUANTIZE."""
    _, model, c = convert("requant")
    assert len(c.inner_ops("QUANTIZE")) == 1 and c.float_tensors() == []
    q = c.model.ops[c.inner_ops("QUANTIZE")[0]]
    assert c.located_by[next(k for k, v in c.tensor_map.items() if v == q.outputs[0])] == "fake_quant"
    assert all(r.equal for r in qparam_checks(c)) and c.unmapped == ()


def test_two_grids_on_one_tensor_are_reported(convert):
    """One tensor on two grids: TF 2.21's converter leaves its producer (the conv) in float and adds
    QUANTIZE ops; the conversion's float-tensor and requantize lists show it, and every Q/DQ is located."""
    _, model, c = convert("two_grids")
    assert len(c.inner_ops("QUANTIZE")) >= 2 and len(c.float_tensors()) >= 1
    assert "CONV_2D" in [c.model.ops[c.model.producers[i].index].name for i in c.float_tensors()
                         if i in c.model.producers]
    acts, _ = onnx_qdq(model)
    assert set(c.tensor_map) == set(acts) and c.unmapped == ()
    assert all(r.equal for r in qparam_checks(c) if r.kind == "activation")


def test_untied_same_scale_op_fails_clearly(sandbox):
    """MaxPool whose output grid differs from its input's: the converter refuses; the error says what to do."""
    from xqat.export.tflite_convert import convert_qdq_onnx

    _, model = build("reject")
    with in_sandbox(sandbox), pytest.raises(ExportError, match="MAX_POOL_2D.*same.*tie"):
        convert_qdq_onnx(model, workdir=sandbox[1])


def test_zero_point_ties_carried_exactly(convert):
    """Stress: ranges on .5 ties whose raw (unsnapped) form TF and the converter read differently."""
    net, model, c = convert("ties")
    assert len(net.snapped_disagreed) >= 3, net.snapped_disagreed  # the stress really hits ties
    acts, _ = onnx_qdq(model)
    for name, (s, z) in acts.items():
        assert c.model.tensors[c.tensor_map[name]].scales[0] == s
        assert c.model.tensors[c.tensor_map[name]].zero_points[0] == z


def test_conversion_is_deterministic(convert, sandbox):
    from xqat.export.tflite_convert import convert_qdq_onnx

    _, model, c = convert("dwsep")
    with in_sandbox(sandbox):
        again = convert_qdq_onnx(model, workdir=sandbox[1])
    assert again.tflite == c.tflite
    assert again.tensor_map == c.tensor_map and again.weight_map == c.weight_map


def test_uint8_qdq_and_prequantized_weights_give_the_same_tflite(convert, sandbox):
    """The same grids written as uint8 Q/DQ, or with weights stored as int8 initializers read by a
    DequantizeLinear, convert to the very same bytes."""
    from xqat.export.tflite_convert import convert_qdq_onnx

    _, model, c = convert("plain")
    _, model_u8, c_u8 = convert("plain_u8")
    assert any(n.op_type == "DequantizeLinear" and n.input[2] for n in model_u8.graph.node)
    assert c_u8.tflite == c.tflite

    pre = onnx.ModelProto()
    pre.CopyFrom(model)
    _, weights = onnx_qdq(model)
    producer = {o: n for n in pre.graph.node for o in n.output}
    for n in [n for n in pre.graph.node if n.op_type == "DequantizeLinear"]:
        q = producer[n.input[0]]
        if q.input[0] in weights:  # DQ(int8 codes) instead of DQ(Q(float weight))
            pre.graph.initializer.append(numpy_helper.from_array(weights[q.input[0]][1], q.input[0] + "_int8"))
            n.input[0] = q.input[0] + "_int8"
    with in_sandbox(sandbox):
        c_pre = convert_qdq_onnx(pre, workdir=sandbox[1])
    assert c_pre.tflite == c.tflite


def test_uint8_io_keeps_int8_graph(convert):
    _, model, c = convert("plain", "uint8")
    m = c.model
    inp = m.tensors[m.inputs[0]]
    s, z = input_grid(model)
    assert inp.dtype == "UINT8" and inp.scales[0] == s and inp.zero_points[0] == z + 128
    assert [m.ops[0].name, m.ops[-1].name] == ["QUANTIZE", "QUANTIZE"]


def test_saved_model_kept_when_asked(convert, sandbox, tmp_path, tf):
    from xqat.export.tflite_convert import convert_qdq_onnx

    _, model, c = convert("heads")
    target = tmp_path / "tf_graph"
    with in_sandbox(sandbox):
        again = convert_qdq_onnx(model, saved_model_dir=target, workdir=sandbox[1])
    assert again.tflite == c.tflite and target.is_dir()
    fn = tf.saved_model.load(str(target)).signatures["serving_default"]
    spec = list(fn.structured_input_signature[1].values())[0]
    assert spec.shape.as_list() == [1, 10, 10, 3]
    lib = fn.graph.as_graph_def().library.function
    fq = [n.op for f in lib for n in f.node_def if n.op.startswith("FakeQuant")]
    assert fq.count("FakeQuantWithMinMaxVars") == len(c.plan.activations) + 1  # + the per-tensor FC weight
    assert fq.count("FakeQuantWithMinMaxVarsPerChannel") == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def installed_state() -> dict:
    """The onnx2tf callables xqat's handlers replace during a conversion, as currently installed."""
    import onnx2tf.onnx2tf as impl
    import onnx2tf.ops.Conv
    import onnx2tf.ops.DequantizeLinear
    import onnx2tf.ops.Gemm
    import onnx2tf.ops.QuantizeLinear

    ops = {"QuantizeLinear": onnx2tf.ops.QuantizeLinear, "DequantizeLinear": onnx2tf.ops.DequantizeLinear,
           "Conv": onnx2tf.ops.Conv, "Gemm": onnx2tf.ops.Gemm}
    state = {f"{k}.make_node": m.make_node for k, m in ops.items()}
    state["Conv.get_weights_constant_or_variable"] = ops["Conv"].get_weights_constant_or_variable
    state["download_test_image_data"] = impl.download_test_image_data
    return state


def test_failed_conversion_restores_onnx2tf_and_leaves_nothing(convert, sandbox):
    """An op onnx2tf cannot convert: clear error naming the node; handlers restored; no files left."""
    from xqat.export.tflite_convert import convert_qdq_onnx

    _, model, _ = convert("plain")
    before = installed_state()
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    relu = next(n for n in bad.graph.node if n.op_type == "Relu")
    out = relu.output[0]
    relu.output[0] = out + "_pre"
    bad.graph.node.append(onnx.helper.make_node("NoSuchOp", [out + "_pre"], [out], name="odd_layer",
                                                domain="xqat.test"))
    bad.opset_import.append(onnx.helper.make_opsetid("xqat.test", 1))
    with in_sandbox(sandbox), pytest.raises(ExportError, match="odd_layer.*NoSuchOp"):
        convert_qdq_onnx(bad, workdir=sandbox[1])
    assert installed_state() == before


def test_no_stray_files_and_no_network(convert, sandbox):
    for variant in ALL_VARIANTS + [("requant", "int8"), ("two_grids", "int8")]:  # every conversion has run
        convert(*variant)
    cwd, work = sandbox
    assert list(cwd.iterdir()) == [] and list(work.iterdir()) == []
    assert _NETWORK_EVENTS == []
    assert not Path("calibration_image_sample_data_20x128x128x3_float32.npy").exists()


def test_handlers_are_not_installed_outside_a_conversion(convert):
    import onnx2tf.ops.Conv
    import onnx2tf.ops.DequantizeLinear

    convert("plain")
    state = installed_state()
    assert state["DequantizeLinear.make_node"].__module__ == "onnx2tf.ops.DequantizeLinear"
    assert state["Conv.make_node"] is onnx2tf.ops.Conv.make_node
    assert state["Conv.get_weights_constant_or_variable"].__module__ == "onnx2tf.utils.common_functions"
    assert state["download_test_image_data"].__module__ == "onnx2tf.utils.common_functions"
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == _ENV_AT_IMPORT  # onnx2tf sets it to -1; restored


def test_version_check_fails_clearly(monkeypatch):
    import onnx2tf

    from xqat.export.onnx2tf_adapter import check_onnx2tf, installed_handlers
    from xqat.export.qdq_plan import analyze_qdq

    assert check_onnx2tf() == "1.28.8"
    monkeypatch.setattr(onnx2tf, "__version__", "1.99.0")
    with pytest.raises(OnnxToTfVersionError, match=r"1\.99\.0.*onnx2tf==1\.28\.8"):
        check_onnx2tf()
    plan = analyze_qdq(onnx.helper.make_model(onnx.helper.make_graph([], "empty", [], [])))
    with pytest.raises(OnnxToTfVersionError), installed_handlers(plan):
        pass


# ---- bad input: clear errors before any slow work ----------------------------------------------


class _Single(QDQNet):
    def __init__(self, linear_per_channel=False, nan=False):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 3)
        self.linear_per_channel, self.nan = linear_per_channel, nan

    def forward(self, x):
        x = self.q("in", x)
        x = self.q("c", F.relu(F.conv2d(x, self.w("c", self.c), self.c.bias)))
        x = x.mean((2, 3))
        w = self.fc.weight
        if self.act_qp is not None and self.linear_per_channel:
            s = torch.full((3,), 0.01)
            w = torch.fake_quantize_per_channel_affine(w, s, torch.zeros(3, dtype=torch.int32), 0, -128, 127)
        elif self.act_qp is not None:
            w = self.w("fc", self.fc)
        return self.q("fc", F.linear(x, w, self.fc.bias))


def _small(**kw) -> onnx.ModelProto:
    torch.manual_seed(3)
    net = calibrate(_Single(**kw).eval(), torch.rand(4, 3, 6, 6))
    return export_qdq_onnx(net, torch.rand(1, 3, 6, 6))


def test_errors_name_the_tensor_and_the_fix():
    from xqat.export.qdq_plan import analyze_qdq
    from xqat.export.tflite_convert import convert_qdq_onnx

    with pytest.raises(ExportError, match="Gemm.*per channel.*per tensor"):
        analyze_qdq(_small(linear_per_channel=True))

    good = _small()
    plan = analyze_qdq(good)
    assert len(plan.activations) == 3 and {w.kind for w in plan.weights.values()} == {"conv", "fc"}

    def edited(fn):
        m = onnx.ModelProto()
        m.CopyFrom(good)
        fn(m)
        return m

    def nan_weight(m):
        init = next(i for i in m.graph.initializer if i.name == "c.weight")
        a = numpy_helper.to_array(init).copy()
        a.flat[0] = np.nan
        init.CopyFrom(numpy_helper.from_array(a, "c.weight"))

    with pytest.raises(ExportError, match="NaN/Inf"):
        analyze_qdq(edited(nan_weight))

    def wide_weight(m):  # a code of -128: not narrow range
        init = next(i for i in m.graph.initializer if i.name == "c.weight")
        a = numpy_helper.to_array(init).copy()
        a.flat[0] = -1e3
        init.CopyFrom(numpy_helper.from_array(a, "c.weight"))

    with pytest.raises(ExportError, match=r"c\.weight.*-128.*\[-127, 127\]"):
        analyze_qdq(edited(wide_weight))

    def float_weight(m):  # Conv reads the float initializer directly: no learned weight range
        conv = next(n for n in m.graph.node if n.op_type == "Conv")
        conv.input[1] = "c.weight"

    with pytest.raises(ExportError, match="Conv.*c.weight.*no QuantizeLinear"):
        analyze_qdq(edited(float_weight))

    def zero_scale(m):
        dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear")
        for n in m.graph.node:
            if n.op_type == "Constant" and n.output[0] == dq.input[1]:
                n.attribute[0].t.CopyFrom(numpy_helper.from_array(np.float32(0.0)))

    with pytest.raises(ExportError, match="scale must be > 0"):
        analyze_qdq(edited(zero_scale))

    with pytest.raises(ExportError, match="io_dtype"):
        convert_qdq_onnx(good, io_dtype="int16")
    with pytest.raises(ExportError, match="no such ONNX file"):
        convert_qdq_onnx("/nonexistent/model.onnx")


def test_atomic_writes(tmp_path):
    from xqat.export.atomic import atomic_write_bytes, check_writable

    target = tmp_path / "m.tflite"
    atomic_write_bytes(target, b"first")
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # fails mid-write
    assert target.read_bytes() == b"first" and sorted(p.name for p in tmp_path.iterdir()) == ["m.tflite"]
    with pytest.raises(ExportError, match="does not exist"):
        check_writable(tmp_path / "missing" / "m.tflite")
    with pytest.raises(ExportError, match="is a directory"):
        check_writable(tmp_path)
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(ExportError):
        check_writable(tmp_path / "file" / "m.tflite")


def test_slice_bounds_computed_at_run_time_are_refused_by_name():
    """onnx2tf takes the channel axis of a Slice whose bounds are not constants as already channels-last (a
    channel slice of [N, 8, 4, 4] comes out as [0, 4, 2, 0]); the export names the Slice before onnx2tf runs.
    Here the bounds depend on the batch size, which is left dynamic, so no constant folding resolves them."""
    from onnx import TensorProto, helper

    from xqat.export.tflite_convert import convert_qdq_onnx

    ints = {"one": [1], "zero": [0], "two": [2]}
    graph = helper.make_graph(
        [helper.make_node("Shape", ["x"], ["shape"]),
         helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
         helper.make_node("Div", ["batch", "two"], ["half"]),
         helper.make_node("Slice", ["x", "zero", "half", "one"], ["y"], name="chunk")],
        "dynamic_chunk", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array(v, np.int64), k) for k, v in ints.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    with pytest.raises(ExportError, match="Slice 'chunk' of tensor 'x'.*'half' is computed at run time.*Div"):
        convert_qdq_onnx(model)
