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
    with pytest.raises(xqat.ParityError, match="backend"):
        xqat.parity(qat, path, inputs, backend="gpu")


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
