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
