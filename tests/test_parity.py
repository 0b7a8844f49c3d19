"""xqat.parity: torch simulation vs the TFLite interpreter on three backends, layer by layer (issue 5)."""

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
    """Requantization rounding differs by backend (§5.3): the reports must not all be identical."""
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
    rc = main(["parity", str(tmp_path / "nope.tflite"), "--model", "tests.models:plain", "--weights", str(ckpt)])
    err = capsys.readouterr().err
    assert rc == 2 and "nope.tflite" in err and "Traceback" not in err
