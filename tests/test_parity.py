"""xqat.parity: torch simulation vs the TFLite interpreter on three backends, layer by layer."""

import copy

import numpy as np
import pytest
import torch

import xqat
from tests.models import INPUT_SHAPE, MODELS
from xqat.verify.interpreter import quantize_input

BACKENDS = ["xnnpack", "builtin", "reference"]


@pytest.fixture(scope="module")
def inputs():
    return torch.rand(24, *INPUT_SHAPE[1:], generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(MODELS))
def test_layerwise_parity_on_every_backend(exported, inputs, name, backend):
    qat, path, _ = exported[name]
    r = xqat.parity(qat, path, inputs, backend=backend, layerwise=True, tolerance=2)
    assert r.backend == backend and r.inputs == len(inputs)
    assert [t.name for t in r.layers] == [p.label for p in xqat.quant_points(qat)]
    assert r.layers[0].identical > 0.99  # the input: the backend's QUANTIZE rule vs TF's rounding (ties only)
    for t in r.layers:  # float simulation vs integer requantization: mostly identical, rarely a few LSB
        near = t.histogram["0"] + t.histogram["1"] + t.histogram["2"]
        assert near >= 0.99 * t.elements and t.max_abs <= 8 and abs(t.mean_delta) < 1.0, r.table()
    out = r.outputs[0]
    assert out.max_abs <= 1 and (out.histogram["0"] + out.histogram["1"]) == out.elements
    assert r.first_divergent is None, r.table()
    for t in r.layers:  # AVERAGE_POOL_2D's integer rounding is simulated: no bias, only inherited ±1 LSB
        if t.name in ("avg", "avg_pool2d"):
            assert t.identical >= 0.999 and abs(t.mean_delta) < 1e-3, r.table()


def test_perturbed_layer_is_named_as_first_divergence(exported, inputs):
    qat, path, _ = exported["mobilenet_v2"]
    broken = copy.deepcopy(qat)
    q = broken.xqat_quantizers["block1_dw_0"]
    q.max.mul_(0.5)  # the torch model now clips that layer at half its exported range
    r = xqat.parity(broken, path, inputs, layerwise=True)
    assert r.first_divergent == "block1.dw.0", r.table()
    clean = xqat.parity(qat, path, inputs, layerwise=True)
    assert clean.first_divergent is None


def test_backends_really_differ_somewhere(exported, inputs):
    """Requantization rounding differs by backend (docs/numerics.md#requantization): the reports must not all be
    identical."""
    qat, path, _ = exported["mobilenet_v2"]
    reports = [xqat.parity(qat, path, inputs, backend=b, layerwise=True) for b in BACKENDS]
    sig = [tuple(t.histogram["0"] for t in r.layers) for r in reports]
    assert len(set(sig)) > 1


def test_input_quantization_rules_per_backend():
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5], np.float32)
    ref = quantize_input(x, 1.0, 0, np.int8, "reference")
    xnn = quantize_input(x, 1.0, 0, np.int8, "xnnpack")
    assert ref.tolist() == [1, 2, 3, -1, -2]  # half away from zero
    assert xnn.tolist() == [0, 2, 2, 0, -2]  # half to even


def test_parity_errors_are_clear(exported, inputs, tmp_path):
    qat, path, _ = exported["plain"]
    other, _, _ = exported["mobilenet_v1"]
    with pytest.raises(xqat.ParityError, match="does not match this model"):
        xqat.parity(other, path, inputs)
    with pytest.raises(xqat.ParityError, match=r"do not fit"):
        xqat.parity(qat, path, torch.rand(2, 3, 8, 8))
    bad = tmp_path / "corrupt.tflite"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(xqat.TFLiteFileError, match="corrupt") as e:
        xqat.parity(qat, bad, inputs)
    assert "corrupt.tflite" in str(e.value)
    with pytest.raises(xqat.InputError, match="backend must be one of xnnpack, builtin, reference"):
        xqat.parity(qat, path, inputs, backend="gpu")
    with pytest.raises(xqat.NotQATModelError, match="not made by xqat.prepare_qat"):
        xqat.parity(torch.nn.Conv2d(3, 4, 1), path, inputs)
    stripped = tmp_path / "no_mapping.tflite"
    stripped.write_bytes(_without_metadata(path.read_bytes()))
    with pytest.raises(xqat.TFLiteFileError, match="no_mapping.tflite carries no xqat mapping"):
        xqat.parity(qat, stripped, inputs)


def _without_metadata(tflite: bytes) -> bytes:
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(tflite, 0)
    model.metadata = []
    builder = flatbuffers.Builder(len(tflite))
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def test_the_tflite_carries_a_typed_mapping(exported):
    """The mapping in the .tflite: every point in graph order with its tensor, label and group, I/O points."""
    from xqat.tflite.mapping import TFLiteMapping, read_mapping

    qat, path, report = exported["mobilenet_v2"]
    m = read_mapping(path.read_bytes(), str(path))
    points = xqat.quant_points(qat)
    assert [(p.key, p.label, p.group) for p in m.points] == [(p.key, p.label, p.group) for p in points]
    assert {p.key: p.tensor for p in m.points} == report.point_tensors
    assert m.input_points == (points[0].key,) and m.output_points == (points[-1].key,)
    assert m.io_dtype == "int8" and m.input_shapes == (tuple(INPUT_SHAPE),)
    assert TFLiteMapping.from_json(m.to_json()) == m
    v1 = {"format": "xqat-mapping-v1", "points": [{"key": p.key, "tensor": p.tensor} for p in m.points],
          "labels": {p.key: p.label for p in m.points}, "input_point": m.input_points[0],
          "output_point": m.output_points[0], "input_shape": list(INPUT_SHAPE), "io_dtype": "int8"}
    old = TFLiteMapping.from_dict(v1)
    assert [(p.key, p.tensor, p.label) for p in old.points] == [(p.key, p.tensor, p.label) for p in m.points]


def test_bad_mappings_are_refused_with_a_clear_error():
    from xqat.tflite.mapping import MappedPoint, TFLiteMapping

    good = TFLiteMapping((MappedPoint("x", 0, "input:x", "x"), MappedPoint("fc", 5, "fc", "fc")), ("x",), ("fc",),
                         "int8", ((1, 3, 16, 16),))
    d = good.to_dict()
    with pytest.raises(xqat.TFLiteFileError, match="model.tflite: xqat mapping format 'xqat-mapping' version 99"):
        TFLiteMapping.from_dict({**d, "version": 99}, "model.tflite")
    with pytest.raises(xqat.TFLiteFileError, match="incomplete or malformed.*input_points"):
        TFLiteMapping.from_dict({k: v for k, v in d.items() if k != "input_points"})
    with pytest.raises(xqat.TFLiteFileError, match="not valid JSON"):
        TFLiteMapping.from_json("{points")
    with pytest.raises(xqat.TFLiteFileError, match=r"input/output points \['nope'\]"):
        TFLiteMapping.from_dict({**d, "output_points": ["nope"]})
    with pytest.raises(xqat.TFLiteFileError, match="io_dtype 'int16'"):
        TFLiteMapping.from_dict({**d, "io_dtype": "int16"})


def test_cli_parity_layerwise_with_plot(exported, tmp_path, capsys, monkeypatch):
    from pathlib import Path

    from xqat.cli import main

    qat, path, _ = exported["plain"]
    ckpt = tmp_path / "plain.pt"
    xqat.save_qat(qat, ckpt, INPUT_SHAPE)
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((6, 3, 16, 16), dtype=np.float32))
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    plot = tmp_path / "p.png"
    rc = main(["parity", str(path), "--model", "tests.models:plain", "--weights", str(ckpt), "--data",
               str(tmp_path / "x.npy"), "--layerwise", "--backend", "reference", "--plot", str(plot)])
    out = capsys.readouterr().out
    assert rc == 0 and "layerwise" in out and "stem.0" in out and plot.stat().st_size > 1000
    assert "accumulate" in out and "teacher-forced" not in out
    rc = main(["parity", str(path), "--model", "tests.models:plain", "--weights", str(ckpt), "--random", "4",
               "--local"])
    out = capsys.readouterr().out
    assert rc == 0 and "teacher-forced" in out and "stem.0" in out
    rc = main(["parity", str(tmp_path / "nope.tflite"), "--model", "tests.models:plain", "--weights", str(ckpt)])
    err = capsys.readouterr().err
    assert rc == 2 and "nope.tflite" in err and "Traceback" not in err


class TwoInTwoOut(torch.nn.Module):
    """Two inputs (an image and a 1-channel map) fused by an Add; two outputs: a 4-D map and class logits."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8))
        self.b = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.relu = torch.nn.ReLU()
        self.seg = torch.nn.Conv2d(8, 2, 1)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x, m):
        z = self.relu(self.a(x) + self.b(m))
        return self.seg(z), self.fc(z.mean((2, 3)))


def _two_inputs(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 16, 16, generator=g), 3 * torch.rand(n, 1, 16, 16, generator=g) - 1


@pytest.fixture(scope="module", params=["int8", "float32"])
def two_io(request, tmp_path_factory):
    """The two-input two-output model, calibrated and exported (strict) with int8 or float I/O."""
    from xqat.errors import UnsupportedLayerError

    try:
        qat = xqat.prepare_qat(TwoInTwoOut(), _two_inputs(1, 0))
    except UnsupportedLayerError as e:
        pytest.skip(f"prepare_qat does not take this two-input two-output model yet: {e}")
    qat.train()
    with torch.no_grad():
        for s in range(4):
            qat(*_two_inputs(8, s))
    qat.eval()
    path = tmp_path_factory.mktemp("two_io") / f"two_io_{request.param}.tflite"
    xqat.export_tflite(qat, _two_inputs(1, 0), path, io_dtype=request.param)
    return qat, path, request.param


@pytest.mark.parametrize("backend", BACKENDS)
def test_several_inputs_and_outputs_each_get_a_row(two_io, backend):
    from xqat.tflite.mapping import read_mapping
    from xqat.tflite.model import read_tflite

    qat, path, io = two_io
    if io == "float32" and backend != "xnnpack":
        pytest.skip("float I/O: one backend is enough to check the QUANTIZE/DEQUANTIZE matching")
    m = read_mapping(path.read_bytes())
    tfl = read_tflite(path)
    assert len(m.input_points) == 2 and len(m.output_points) == 2 and len(tfl.inputs) == 2
    # the converter orders the file's inputs/outputs its own way: parity matches them by tensor index
    x = _two_inputs(16, 7)
    r = xqat.parity(qat, path, x, backend=backend, layerwise=True)
    assert [t.name for t in r.outputs] == ["seg", "fc"], r.table()
    seg, fc = r.outputs
    assert seg.elements == 16 * 2 * 16 * 16 and fc.elements == 16 * 5
    assert seg.top1_agreement is None and fc.top1_agreement is not None  # top-1 only for the 2-D classifier
    for t in r.outputs:
        assert t.identical > 0.95 and t.max_abs <= 1, r.table()
    assert r.first_divergent is None, r.table()
    assert "one row per model output" in r.table()
    as_list = xqat.parity(qat, path, list(x), backend=backend)  # a list works like a tuple
    assert [t.identical for t in as_list.outputs] == [t.identical for t in r.outputs]


def test_evaluate_scores_each_output(two_io):
    """xqat.evaluate on a two-input two-output model: inputs by tensor index, one score per labelled output."""
    qat, path, _ = two_io
    x = _two_inputs(32, 5)
    with torch.no_grad():
        _, logits = qat.eval()(*x)
    batches = [((x[0][i:i + 8], x[1][i:i + 8]), (None, logits[i:i + 8].argmax(1))) for i in range(0, 32, 8)]
    sim = xqat.evaluate(qat, batches)
    device = xqat.evaluate(path, batches, backend="reference")
    assert sim.count == device.count == 32 and list(sim.per_output) == list(device.per_output) == ["fc"]
    assert sim.value == 1.0 and device.value >= 0.9, device  # the device agrees with the simulation's top-1
    with pytest.raises(xqat.InputError, match=r"2 outputs \(seg, fc\)"):
        xqat.evaluate(path, [(x, logits.argmax(1))])
    with torch.no_grad():
        seg_classes = qat(*x)[0].argmax(1)  # (N, H, W): per-pixel top-1 of the segmentation output
    pixels = [(x, (seg_classes, None))]
    seg_sim, seg_device = xqat.evaluate(qat, pixels), xqat.evaluate(path, pixels)
    assert seg_sim.value == 1.0 and seg_device.value > 0.9 and list(seg_device.per_output) == ["seg"], seg_device
    with pytest.raises(xqat.InputError, match="output 'seg' predicts"):
        xqat.evaluate(path, [(x, (logits.argmax(1), None))])


def test_several_inputs_are_checked(two_io):
    qat, path, _ = two_io
    x, m = _two_inputs(4, 1)
    with pytest.raises(xqat.InputError, match=r"has 2 inputs \(x, m\); got 1 tensors"):
        xqat.parity(qat, path, x)
    with pytest.raises(xqat.ParityError, match="do not fit .* input 1 \\('m'\\)"):
        xqat.parity(qat, path, (x, x))
    with pytest.raises(xqat.InputError, match="different sizes"):
        xqat.parity(qat, path, (x, m[:2]))


def test_layouts_follow_the_tflite_shape():
    from xqat.verify.io_match import to_tflite_layout, to_torch_layout

    nchw = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    assert to_tflite_layout(nchw, (1, 4, 5, 3)).shape == (2, 4, 5, 3)
    assert (to_torch_layout(to_tflite_layout(nchw, (1, 4, 5, 3)), nchw.shape) == nchw).all()
    nct = np.arange(2 * 3 * 7).reshape(2, 3, 7)  # a Conv1d sequence: TFLite keeps it (N, T, C)
    assert (to_tflite_layout(nct, (1, 7, 3)) == nct.transpose(0, 2, 1)).all()
    assert (to_tflite_layout(nct, (1, 3, 7)) == nct).all()  # a tensor TFLite keeps as is
    assert (to_torch_layout(nct.transpose(0, 2, 1), nct.shape) == nct).all()
    assert to_tflite_layout(np.zeros((2, 6)), (1, 6)).shape == (2, 6)
    nct3 = np.arange(2 * 3 * 3).reshape(2, 3, 3)  # C == T: channels-last, as onnx2tf converts Conv1d
    assert (to_tflite_layout(nct3, (1, 3, 3)) == nct3.transpose(0, 2, 1)).all()
    assert (to_torch_layout(to_tflite_layout(nct3, (1, 3, 3)), nct3.shape) == nct3).all()
    # a Conv1d tensor kept 4-D by the converter (N, 1, T, C), and a pooled map flattened to (N, C)
    assert (to_tflite_layout(nct, (1, 1, 7, 3)) == nct.transpose(0, 2, 1)[:, None]).all()
    assert (to_torch_layout(nct.transpose(0, 2, 1)[:, None], nct.shape) == nct).all()
    pooled = np.arange(2 * 5).reshape(2, 5, 1, 1)
    assert (to_tflite_layout(pooled, (1, 5)) == pooled[:, :, 0, 0]).all()
    assert (to_torch_layout(pooled[:, :, 0, 0], pooled.shape) == pooled).all()


def _cbr(cin, cout, stride=1, act=True):
    layers = [torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False), torch.nn.BatchNorm2d(cout)]
    return torch.nn.Sequential(*(layers + [torch.nn.ReLU()] if act else layers))


class _Residual(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c1, self.c2, self.relu = _cbr(c, c), _cbr(c, c, act=False), torch.nn.ReLU()

    def forward(self, x):
        return self.relu(x + self.c2(self.c1(x)))


class DeepResidual(torch.nn.Module):
    """9 convolutions: a stride-2 stem and 4 residual blocks (conv-BN-ReLU, conv-BN, Add, ReLU), 8 channels."""

    def __init__(self):
        super().__init__()
        self.stem = _cbr(3, 8, 2)
        self.blocks = torch.nn.Sequential(*[_Residual(8) for _ in range(4)])
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    torch.manual_seed(0)
    model = DeepResidual()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    qat = xqat.prepare_qat(model, torch.rand(1, 3, 16, 16))
    g = torch.Generator().manual_seed(0)
    qat.train()
    with torch.no_grad():
        for _ in range(5):
            qat(torch.rand(8, 3, 16, 16, generator=g))
    qat.eval()
    path = tmp_path_factory.mktemp("deep") / "deep.tflite"
    xqat.export_tflite(qat, torch.rand(1, 3, 16, 16), path)
    return qat, path, torch.rand(16, 3, 16, 16, generator=g)


def _perturb_range(qat, label):
    q = qat.xqat_quantizers[next(p.group for p in xqat.quant_points(qat) if p.label == label)]
    q.min.mul_(0.8)
    q.max.mul_(0.8)  # torch now uses a grid 20% finer than the exported one: that layer's codes disagree


def _perturb_weight(qat, label):
    qat.get_submodule(label).conv.weight.mul_(1.5)  # torch's folded weight differs from the file's codes


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("perturb, label", [(_perturb_range, "blocks.1.c1.0"), (_perturb_weight, "blocks.2.c1.0")])
def test_local_parity_names_the_perturbed_layer(deep, backend, perturb, label):
    qat, path, x = deep
    broken = copy.deepcopy(qat)
    with torch.no_grad():
        perturb(broken, label)  # after export: the .tflite keeps the original layer
    local = xqat.parity(broken, path, x, backend=backend, layerwise=True, local=True)
    e2e = xqat.parity(broken, path, x, backend=backend, layerwise=True)
    names = [t.name for t in local.layers]
    assert local.mode == "local" and e2e.mode == "end-to-end"
    assert local.first_divergent == label, local.table()
    # teacher-forced: every other layer gets the device's own inputs and keeps its own mismatch: within 1 LSB
    others = [t for t in local.layers if t.name != label]
    assert all(t.max_abs <= 1 and not t.diverges(0.5) for t in others if t.name != "mean"), local.table()
    assert all(t.max_abs <= 1 for t in others), local.table()  # MEAN: the optimized kernel's own rounding
    # end to end: the perturbed layer or a later one, and the error propagates to the layers after it
    assert e2e.first_divergent is not None and names.index(e2e.first_divergent) >= names.index(label), e2e.table()
    after = slice(names.index(label) + 1, None)
    assert sum(t.identical for t in e2e.layers[after]) < sum(t.identical for t in local.layers[after]), e2e.table()
    assert "teacher-forced" in local.table() and "accumulate" in e2e.table()


def test_local_parity_removes_accumulated_differences(deep):
    """Unperturbed: end to end the ±1 LSB differences can grow with depth; locally each layer is near exact and
    never further from the file than end to end (on xnnpack this net is now exact end to end: with the int32
    bias simulated, docs/numerics.md#bias, little is left to accumulate)."""
    qat, path, x = deep
    local = xqat.parity(qat, path, x, local=True, tolerance=0)  # local implies layerwise
    e2e = xqat.parity(qat, path, x, layerwise=True, tolerance=0)
    assert local.layers and local.first_divergent is None, local.table()
    assert all(t.identical >= 0.995 and t.max_abs <= 1 for t in local.layers), local.table()
    assert sum(t.identical for t in local.layers) >= sum(t.identical for t in e2e.layers), e2e.table()
    assert [t.identical for t in local.outputs] == [t.identical for t in e2e.outputs]  # outputs: end to end


class Sequence1d(torch.nn.Module):
    """Conv1d over (N, C, T) sequences: onnx2tf keeps them channels-last, (N, T, C), in the .tflite."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Sequential(torch.nn.Conv1d(3, 8, 3, padding=1), torch.nn.ReLU())
        self.c2 = torch.nn.Conv1d(8, 4, 1)

    def forward(self, x):
        return self.c2(self.c1(x))


def test_sequence_tensors_compare_across_layouts(tmp_path):
    from xqat.errors import UnsupportedLayerError

    g = torch.Generator().manual_seed(0)
    try:
        qat = xqat.prepare_qat(Sequence1d(), torch.rand(1, 3, 12))
    except UnsupportedLayerError as e:
        pytest.skip(f"prepare_qat does not take Conv1d yet: {e}")
    qat.train()
    with torch.no_grad():
        for _ in range(4):
            qat(torch.rand(8, 3, 12, generator=g))
    qat.eval()
    path = tmp_path / "seq.tflite"
    xqat.export_tflite(qat, torch.rand(1, 3, 12), path)
    r = xqat.parity(qat, path, torch.rand(8, 3, 12, generator=g), layerwise=True)
    assert r.outputs[0].elements == 8 * 4 * 12
    assert all(t.identical > 0.95 and t.max_abs <= 1 for t in r.layers + r.outputs), r.table()
