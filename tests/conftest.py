"""Shared test setup: quiet TF logs, deterministic seeds, and tools to build oracle data."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(scope="session")
def tf():
    """TensorFlow, imported once; the real ops are the oracle for every numeric test."""
    import tensorflow

    return tensorflow


@pytest.fixture(scope="session")
def builder(tf):
    """FakeQuant graphs of the real TF, converted by the real TFLite converter (tests/tflite_oracle.py)."""
    from tests.tflite_oracle import FakeQuantBuilder

    return FakeQuantBuilder(tf)


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """Every model of the set, calibrated and exported once (int8 I/O): name -> (qat model, path, report)."""
    import xqat
    from tests.models import INPUT_SHAPE, MODELS, calibrate, make_model

    out = {}
    folder = tmp_path_factory.mktemp("exported")
    for name in MODELS:
        qat = calibrate(xqat.prepare_qat(make_model(name), torch.randn(INPUT_SHAPE)))
        path = folder / f"{name}.tflite"
        report = xqat.export_tflite(qat, torch.rand(INPUT_SHAPE), path)
        out[name] = (qat, path, report)
    return out
