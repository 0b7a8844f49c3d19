"""export_tflite on the model set: full-integer, every qparam and weight code equal to torch, no requantize
or layout ops, within 1 LSB of the simulation; determinism, atomic writes, snapping, errors, CLI."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import xqat
from tests.models import INPUT_SHAPE, MODELS, calibrate, make_model
from xqat.tflite.model import read_tflite


@pytest.mark.parametrize("name", list(MODELS))
def test_model_set_exports_full_integer_with_equal_qparams(exported, name):
    qat, path, report = exported[name]
    assert report.ok, report.problems()
    assert report.all_qparams_equal and len(report.tensors) > 5
    kinds = {r.kind for r in report.tensors}
    assert kinds == {"activation", "weight", "bias"}
    n_weighted = sum(1 for m in qat.modules() if hasattr(m, "weight_quant"))
    assert sum(r.kind == "weight" for r in report.tensors) == n_weighted  # every layer is checked
    assert sum(r.kind == "activation" for r in report.tensors) == len(xqat.quant_points(qat))
    assert all(r.codes_equal for r in report.tensors if r.kind == "weight")
    m = read_tflite(path)
    assert not [t.name for t in m.tensors if t.dtype == "FLOAT32"], "full-integer model expected"
    inner = [op.name for op in m.ops]
    assert "QUANTIZE" not in inner and "TRANSPOSE" not in inner and "DEQUANTIZE" not in inner
    assert m.tensors[m.inputs[0]].dtype == "INT8" and m.tensors[m.inputs[0]].shape == (1, 16, 16, 3)  # NHWC


@pytest.mark.parametrize("name", list(MODELS))
def test_fake_quant_points_are_exactly_the_int8_activation_tensors(exported, name):
    """Count from the real conversion: every point has a tensor, every int8 activation tensor has a point
    (PAD outputs that onnx2tf adds for asymmetric padding share the conv input's grid)."""
    qat, path, report = exported[name]
    m = read_tflite(path)
    activations = {t.index for t in m.tensors if t.data is None and t.dtype == "INT8"}
    pad_outputs = {op.outputs[0] for op in m.ops if op.name == "PAD"}
    mapped = set(report.point_tensors.values())
    assert len(report.point_tensors) == len(xqat.quant_points(qat))
    assert mapped | pad_outputs == activations


@pytest.mark.parametrize("name", list(MODELS))
def test_model_set_output_within_one_lsb_of_simulation(exported, name):
    qat, path, _ = exported[name]
    x = torch.rand(64, *INPUT_SHAPE[1:], generator=torch.Generator().manual_seed(7))
    r = xqat.parity(qat, path, x)
    out = r.outputs[0]
    within = (out.histogram["0"] + out.histogram["1"]) / out.elements
    assert within >= 0.99, r.table()
    if out.top1_agreement is not None and name != "functional":  # functional ends in a sigmoid
        assert out.top1_agreement == 1.0, r.table()


def test_export_is_deterministic(exported, tmp_path):
    qat, path, _ = exported["mobilenet_v2"]
    again = tmp_path / "again.tflite"
    xqat.export_tflite(qat, torch.rand(INPUT_SHAPE), again)
    assert Path(path).read_bytes() == again.read_bytes()


def test_io_dtypes_uint8_and_float(exported, tmp_path):
    qat, _, _ = exported["plain"]
    for io in ("uint8", "float32"):
        p = tmp_path / f"plain_{io}.tflite"
        rep = xqat.export_tflite(qat, torch.rand(INPUT_SHAPE), p, io_dtype=io)
        assert rep.ok, rep.problems()
        m = read_tflite(p)
        assert m.tensors[m.inputs[0]].dtype == io.upper() and m.tensors[m.outputs[0]].dtype == io.upper()
        r = xqat.parity(qat, p, torch.rand(16, *INPUT_SHAPE[1:]))
        assert r.outputs[0].max_abs <= 1


def test_snapping_keeps_the_trained_grid_on_zero_point_ties(tmp_path):
    """Ranges built to put TF's float zero point on k + 0.5: the converter alone would pick another zp. The
    export ships the snapped grids without touching the model; snap_model=True / xqat.snap_ranges snap it."""
    qat = calibrate(xqat.prepare_qat(make_model("mobilenet_v1"), torch.randn(INPUT_SHAPE)))
    rng = np.random.default_rng(0)
    tied = []
    for key, q in qat.xqat_quantizers.items():
        if q.fixed:
            continue
        s = np.float32(rng.uniform(0.01, 0.05))
        k = int(rng.integers(20, 200)) + 0.5 + 1e-7
        q.min.fill_(float(np.float32(-k * s)))
        q.max.fill_(float(np.float32((255 - k) * s)))
        tied.append(key)
    trained = {k: (float(q.min), float(q.max)) for k, q in qat.xqat_quantizers.items()}
    before = {k: qat.xqat_quantizers[k].scale_zero_point() for k in tied}
    converter = {k: xqat.tflite_qparams(*trained[k]) for k in tied}
    differs = {k for k in tied if int(converter[k].zero_point) != before[k][1]
               or float(converter[k].scale) != np.float32(before[k][0])}
    assert any(int(converter[k].zero_point) != before[k][1] for k in tied), "stress ranges must split zero points"
    report = xqat.export_tflite(qat, torch.rand(INPUT_SHAPE), tmp_path / "ties.tflite")
    assert report.ok, report.problems()
    assert {k: (float(q.min), float(q.max)) for k, q in qat.xqat_quantizers.items()} == trained  # not mutated
    snapped = {s.group for s in report.snaps if s.converter_disagreed}
    assert snapped == differs
    assert {s.group for s in report.snaps} <= set(tied) and all(s.old_range == trained[s.group] for s in report.snaps)
    again = xqat.export_tflite(qat, torch.rand(INPUT_SHAPE), tmp_path / "ties2.tflite", snap_model=True)
    assert (tmp_path / "ties.tflite").read_bytes() == (tmp_path / "ties2.tflite").read_bytes()
    assert again.snaps == report.snaps
    after = {k: qat.xqat_quantizers[k].scale_zero_point() for k in tied}
    assert all((float(qat.xqat_quantizers[s.group].min), float(qat.xqat_quantizers[s.group].max)) == s.new_range
               for s in report.snaps)  # snap_model=True: the model now holds the exported ranges
    assert all(s.delta <= 0.5 * after[s.group][0] * 1.001 for s in report.snaps)  # at most half a step
    assert all(after[k][1] == before[k][1] for k in tied)  # the TF grid training used is what ships
    assert xqat.snap_ranges(qat) == []  # already snapped: nothing left to change
    rows = {r.torch_name: r for r in report.tensors if r.kind == "activation"}
    for key in tied:  # the .tflite holds the TF grid training used
        label = next(p.label for p in xqat.quant_points(qat) if p.group == key)
        assert rows[label].tflite_zero_point == (before[key][1] - 128,)


def test_export_leaves_the_model_as_it_was(exported, tmp_path):
    """Export is a conversion of a copy: the QAT model's state, modules and train/eval mode do not change."""
    qat, _, _ = exported["mobilenet_v2"]
    was_training = qat.training
    qat.train()
    state = {k: v.clone() for k, v in qat.state_dict().items()}
    modules = {n: type(m) for n, m in qat.named_modules()}
    try:
        xqat.export_tflite(qat, torch.rand(INPUT_SHAPE), tmp_path / "copy.tflite")
        assert qat.training and modules == {n: type(m) for n, m in qat.named_modules()}
        assert all(torch.equal(v, state[k]) for k, v in qat.state_dict().items())
        assert not any(k.startswith("xqat_export") for k in qat.state_dict())
    finally:
        qat.train(was_training)


def test_unwritable_path_fails_before_any_work(tmp_path):
    qat = calibrate(xqat.prepare_qat(make_model("plain"), torch.randn(INPUT_SHAPE)))
    ranges = {k: (float(q.min), float(q.max)) for k, q in qat.xqat_quantizers.items()}
    with pytest.raises(xqat.ExportError, match="no_such_dir"):
        xqat.export_tflite(qat, torch.rand(INPUT_SHAPE), tmp_path / "no_such_dir" / "m.tflite")
    assert ranges == {k: (float(q.min), float(q.max)) for k, q in qat.xqat_quantizers.items()}  # nothing ran


def test_failed_export_leaves_no_file_and_no_stray_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    qat = calibrate(xqat.prepare_qat(make_model("plain"), torch.randn(INPUT_SHAPE)))
    with torch.no_grad():
        qat.get_submodule("conv3").conv.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(xqat.ExportError, match="conv3"):
        xqat.export_tflite(qat, torch.rand(INPUT_SHAPE), tmp_path / "m.tflite")
    assert os.listdir(tmp_path) == []


def test_export_errors_name_the_problem(tmp_path):
    with pytest.raises(xqat.NotQATModelError, match="not made by xqat.prepare_qat.*export"):
        xqat.export_tflite(make_model("plain"), torch.rand(INPUT_SHAPE), tmp_path / "a.tflite")
    with pytest.raises(xqat.NotQATModelError, match="not made by xqat.prepare_qat.*snap"):
        xqat.snap_ranges(make_model("plain"))
    fresh = xqat.prepare_qat(make_model("plain"), torch.randn(INPUT_SHAPE))
    with pytest.raises(xqat.ExportError, match="input:x is still at its initial value"):
        xqat.export_tflite(fresh, torch.rand(INPUT_SHAPE), tmp_path / "b.tflite")
    qat = calibrate(xqat.prepare_qat(make_model("plain"), torch.randn(INPUT_SHAPE)))
    qat.xqat_quantizers["gap"].max.fill_(float("inf"))
    with pytest.raises(xqat.ExportError, match="gap.*not finite"):
        xqat.export_tflite(qat, torch.rand(INPUT_SHAPE), tmp_path / "c.tflite")
    with pytest.raises(xqat.ExportError, match="io_dtype"):
        xqat.export_tflite(qat, torch.rand(INPUT_SHAPE), tmp_path / "d.tflite", io_dtype="int16")


def test_exported_model_set_passes_the_edgetpu_check(exported):
    for name, (_, path, _) in exported.items():
        r = xqat.check_edgetpu(path)
        assert r.ok and r.fully_mapped, f"{name}:\n{r.table()}"


def test_cli_export_prints_the_report(exported, tmp_path, capsys, monkeypatch):
    from xqat.cli import main

    qat, _, _ = exported["plain"]
    ckpt = tmp_path / "plain.pt"
    xqat.save_qat(qat, ckpt, INPUT_SHAPE)
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    out = tmp_path / "cli.tflite"
    rc = main(["export", "tests.models:plain", "--weights", str(ckpt), "--input-shape", "1,3,16,16",
               "-o", str(out), "--json", str(tmp_path / "r.json")])
    text = capsys.readouterr().out
    assert rc == 0 and out.is_file() and "every scale and zero point equals the torch side" in text
    assert "stem.0" in text and (tmp_path / "r.json").is_file()
    rc = main(["export", "tests.models:plain", "--weights", str(tmp_path / "missing.pt"), "-o", str(out)])
    assert rc == 2 and "missing.pt" in capsys.readouterr().err


def test_edgetpu_export_passes_for_the_model_set_defaults(exported, tmp_path):
    qat, _, _ = exported["mobilenet_v2"]
    report = xqat.export_tflite(qat, torch.rand(INPUT_SHAPE), tmp_path / "tpu.tflite", edgetpu=True)
    assert report.ok


def _imported_modules(path: Path, package: str) -> set[str]:
    """Absolute names of the modules a source file imports (relative imports resolved against `package`)."""
    import ast

    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[:len(base) - node.level + 1] if node.level else []
            out.add(".".join(base + ([node.module] if node.module else [])))
    return out


def test_export_layering():
    """export/ never imports verify/; torch_side/ knows nothing of export; stage 1 (torch -> ONNX) and the Q/DQ
    plan load without onnx2tf or TensorFlow."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1] / "xqat"
    for f in (root / "export").glob("*.py"):
        assert not [m for m in _imported_modules(f, "xqat.export") if m.startswith("xqat.verify")], f.name
    for f in (root / "torch_side").glob("*.py"):
        assert not [m for m in _imported_modules(f, "xqat.torch_side") if m.startswith("xqat.export")], f.name
        text = f.read_text()
        assert not [w for w in (".exporting", "xqat_export_", "_qdq_weight", "_export_mode") if w in text], f.name
    code = ("import sys, xqat.export.torch_to_onnx, xqat.export.qdq_plan, xqat.export.export_graph; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('onnx2tf', 'tensorflow', 'tf_keras')))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root.parent, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr[-2000:]


@pytest.mark.parametrize("name", ["plain", "mobilenet_v2", "inception"])
def test_export_graph_is_the_deployed_network(name):
    """The export pass's copy holds only Q/DQ points and functional+Q/DQ weight ops, with the snapped grids,
    and computes what the QAT simulation computes: the same output codes (models without average pools,
    whose TFLite rounding only the simulation models)."""
    from xqat.export.export_graph import ActivationQDQ, WeightQDQ, build_export_graph
    from xqat.torch_side.modules import WeightQuantizedModule
    from xqat.torch_side.quantizers import QuantPoint

    qat = calibrate(xqat.prepare_qat(make_model(name), torch.randn(INPUT_SHAPE))).eval()
    graph = build_export_graph(qat)
    mods = list(graph.module.modules())
    assert not [m for m in mods if isinstance(m, (QuantPoint, WeightQuantizedModule))]
    assert sum(isinstance(m, ActivationQDQ) for m in mods) == len(xqat.quant_points(qat)) == len(graph.points)
    assert sum(isinstance(m, WeightQDQ) for m in mods) == sum(isinstance(m, WeightQuantizedModule)
                                                              for m in qat.modules())
    for p in xqat.quant_points(qat):
        r = qat.xqat_points[p.key].quantizer.snapped()
        assert (graph.points[p.key].scale, graph.points[p.key].zero_point) == (r.scale, r.zero_point - 128)
    x = torch.rand(8, *INPUT_SHAPE[1:], generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y_sim, y_exp = qat(x), graph.module(x)
    out = graph.points[xqat.quant_points(qat)[-1].key]
    assert torch.equal(torch.round(y_exp / out.scale), torch.round(y_sim / out.scale))


class _TwoInTwoOut(torch.nn.Module):
    """Two image inputs of different sizes, two outputs: each input and output its own quantized tensor."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU())
        self.b = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, stride=2, padding=1), torch.nn.ReLU())
        self.up = torch.nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.head = torch.nn.Conv2d(4, 2, 1)
        self.fc = torch.nn.Linear(4 * 4 * 4, 3)

    def forward(self, x, y):
        a, b = self.a(x), self.b(y)
        s = a + torch.relu(self.up(b))
        return self.head(s), self.fc(torch.flatten(torch.nn.functional.max_pool2d(s, 2), 1))


def _qat_two_in_two_out():
    shapes = ((1, 3, 8, 8), (1, 1, 8, 8))
    g = torch.Generator().manual_seed(0)
    qat = xqat.prepare_qat(_TwoInTwoOut().eval(), tuple(torch.rand(s) for s in shapes))
    opt = torch.optim.SGD(qat.parameters(), lr=1e-3)
    qat.train()
    for _ in range(4):
        outs = qat(*(torch.rand(4, *s[1:], generator=g) for s in shapes))
        loss = sum(o.square().mean() for o in outs)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return qat.eval(), shapes


def test_every_input_and_output_is_quantized_and_checked(tmp_path):
    """Two inputs and two outputs; a ConvTranspose2d (TRANSPOSE_CONV weight codes and scales verified) and a
    channel-major flatten of a 4x4 map before a Linear (no TRANSPOSE: the weight columns are permuted)."""
    from xqat.tflite.mapping import read_mapping
    from xqat.verify.interpreter import make_interpreter

    qat, shapes = _qat_two_in_two_out()
    path = tmp_path / "two.tflite"
    report = xqat.export_tflite(qat, tuple(torch.rand(s) for s in shapes), path)
    assert report.ok, report.problems()
    m = read_tflite(path)
    # in the torch model's order (the converter may order the .tflite's inputs otherwise)
    assert set(report.input_indices) == set(m.inputs) and set(report.output_indices) == set(m.outputs)
    assert len(report.input_indices) == 2 and len(report.output_indices) == 2
    assert all(m.tensors[i].dtype == "INT8" for i in report.input_indices + report.output_indices)
    assert [m.tensors[i].shape for i in report.input_indices] == [(1, 8, 8, 3), (1, 8, 8, 1)]
    assert report.input_shapes == [tuple(s) for s in shapes]
    ops = [op.name for op in m.ops]
    assert "TRANSPOSE_CONV" in ops and "TRANSPOSE" not in ops
    weights = {r.torch_name: r for r in report.tensors if r.kind == "weight"}
    assert weights["up"].equal and len(weights["up"].torch_scale) == 4
    assert weights["fc"].equal  # int8 codes compared in the permuted column order
    mapping = read_mapping(path.read_bytes())
    assert [report.point_tensors[k] for k in mapping.input_points] == report.input_indices
    assert [report.point_tensors[k] for k in mapping.output_points] == report.output_indices
    # the .tflite computes what the simulation does: feed the torch input codes, compare the output codes
    xs = [torch.rand(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
    it = make_interpreter(path.read_bytes(), "reference")
    for x, idx in zip(xs, report.input_indices):
        t = m.tensors[idx]
        codes = torch.clamp(torch.round(x / float(t.scales[0])) + int(t.zero_points[0]), -128, 127)
        it.set_tensor(idx, codes.permute(0, 2, 3, 1).numpy().astype(np.int8))
    it.invoke()
    for out, idx in zip(qat(*xs), report.output_indices):
        t = m.tensors[idx]
        want = torch.round(out.detach() / float(t.scales[0])) + int(t.zero_points[0])
        want = want.permute(0, 2, 3, 1) if want.dim() == 4 else want
        assert np.abs(it.get_tensor(idx).astype(np.int64) - want.numpy().astype(np.int64)).max() <= 1


def _stem(relu: bool) -> torch.nn.Module:
    """A ResNet stem: conv, BN, (ReLU), padded 3x3/2 max pool; then a 1x1 conv head."""
    layers = [torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.BatchNorm2d(8)]
    layers += [torch.nn.ReLU()] if relu else []
    layers += [torch.nn.MaxPool2d(3, 2, 1), torch.nn.Conv2d(8, 4, 1), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers).eval()


@pytest.mark.parametrize("relu", [True, False])
def test_padded_max_pool_after_relu_pads_with_the_zero_point(tmp_path, relu):
    """After a ReLU the padded max pool's grid starts at 0: its zero point is the lowest code, so PAD (fills
    with the zero point) gives the max pool the same result as PADV2 (fills with -128) and maps to the
    EdgeTPU. A grid that reaches below 0 keeps PADV2. The .tflite output equals the simulation's."""
    from xqat.verify.interpreter import make_interpreter

    shape = (1, 3, 16, 16)
    g = torch.Generator().manual_seed(1)
    qat = xqat.prepare_qat(_stem(relu), torch.rand(shape))
    qat.train()
    for _ in range(3):
        qat(torch.rand(8, *shape[1:], generator=g) * 2 - 1)
    qat.eval()
    path = tmp_path / "stem.tflite"
    report = xqat.export_tflite(qat, torch.rand(shape), path, edgetpu=relu)
    assert report.ok, report.problems()
    ops = [op.name for op in read_tflite(path).ops]
    assert ("PAD" in ops and "PADV2" not in ops) if relu else "PADV2" in ops
    if relu:
        assert xqat.check_edgetpu(path.read_bytes()).fully_mapped
    m = read_tflite(path)
    x = torch.rand(shape, generator=g) * 2 - 1
    it = make_interpreter(path.read_bytes(), "reference")
    t_in, t_out = m.tensors[report.input_index], m.tensors[report.output_index]
    codes = torch.clamp(torch.round(x / float(t_in.scales[0])) + int(t_in.zero_points[0]), -128, 127)
    it.set_tensor(report.input_index, codes.permute(0, 2, 3, 1).numpy().astype(np.int8))
    it.invoke()
    want = (torch.round(qat(x).detach() / float(t_out.scales[0])) + int(t_out.zero_points[0])).permute(0, 2, 3, 1)
    assert np.abs(it.get_tensor(report.output_index).astype(np.int64) - want.numpy().astype(np.int64)).max() <= 1


@pytest.mark.parametrize("name", ["shuffle", "conv1d"])
def test_channels_last_rewrites_compute_the_same_onnx(name):
    """The ONNX rewrites for onnx2tf (channel shuffle, flatten before a Linear with its weight columns
    permuted, Slice bounds) leave what the Q/DQ ONNX computes unchanged, bit for bit."""
    import onnxruntime

    from tests.op_models import make_op_model
    from xqat.export.onnx_fold import fold_constants
    from xqat.export.onnx_layout import channels_last_flatten, channels_last_shuffle, slice_bounds_as_initializers
    from xqat.export.torch_to_onnx import export_onnx

    model, shape = make_op_model(name)
    qat = xqat.prepare_qat(model, torch.rand(shape))
    qat.train()
    for _ in range(2):
        qat(torch.rand(4, *shape[1:], generator=torch.Generator().manual_seed(0)))
    before = fold_constants(export_onnx(qat.eval(), (torch.rand(shape),)).model)
    after, columns = channels_last_flatten(channels_last_shuffle(slice_bounds_as_initializers(before)))
    ops = [n.op_type for n in after.graph.node]
    assert ops.count("Transpose") > [n.op_type for n in before.graph.node].count("Transpose")  # rewritten
    assert bool(columns) == (name == "conv1d")
    x = torch.rand(shape, generator=torch.Generator().manual_seed(5)).numpy()
    feed = {before.graph.input[0].name: x}
    run = [onnxruntime.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
           for m in (before, after)]
    want, got = run[0][0], run[1][0]
    assert np.array_equal(want, got)
