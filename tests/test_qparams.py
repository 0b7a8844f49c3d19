"""xqat.nudge / xqat.tflite_qparams against the real TFLite converter (docs/numerics.md#nudge, #converter-qparams)."""

import numpy as np
import pytest

import xqat
from tests.tflite_oracle import converter_qparams


def _near_tie_ranges(rng, n):
    """Ranges whose float zero point sits within 1e-6 of k + 0.5: where TF and the converter disagree."""
    out = []
    for _ in range(n):
        s = np.float32(rng.uniform(1e-3, 0.1))
        k = int(rng.integers(1, 254)) + 0.5 + rng.uniform(-1e-6, 1e-6)
        out.append((np.float32(-k * s), np.float32((255 - k) * s)))
    return out


@pytest.fixture(scope="module")
def stress_ranges():
    rng = np.random.default_rng(2024)
    ranges = _near_tie_ranges(rng, 80)
    ranges += [(np.float32(rng.uniform(-5, 0)), np.float32(rng.uniform(0, 5))) for _ in range(30)]
    ranges += [(np.float32(0.5), np.float32(2.0)), (np.float32(-2), np.float32(-0.5)),
               (np.float32(0), np.float32(3)), (np.float32(-3), np.float32(0)), (np.float32(-1e-3), np.float32(7)),
               (np.float32(-0.26289), np.float32(10.0506))]  # docs/numerics.md#converter-qparams example
    return ranges


@pytest.fixture(scope="module")
def converted(tf, stress_ranges):
    return converter_qparams(tf, stress_ranges)


def test_tflite_qparams_equals_real_converter(stress_ranges, converted):
    for (mn, mx), (scale, zp) in zip(stress_ranges, converted):
        q = xqat.tflite_qparams(mn, mx)
        assert np.float32(scale) == q.scale, (mn, mx)
        assert zp == int(q.zero_point_signed), (mn, mx)
        assert int(q.zero_point) - 128 == int(q.zero_point_signed)


def test_tf_nudge_and_converter_disagree_near_ties(stress_ranges, converted):
    """docs/numerics.md#converter-qparams: the reason the exporter must snap ranges. The stress set must show the
    disagreement."""
    differ = 0
    for (mn, mx), (_, zp) in zip(stress_ranges, converted):
        differ += int(int(xqat.nudge(mn, mx).zero_point) - 128 != zp)
    assert differ > 0


def test_tflite_qparams_vectorised_and_degenerate():
    q = xqat.tflite_qparams(np.array([-1.0, 0.0, -2.0]), np.array([1.0, 0.0, 2.0]), narrow_range=True)
    assert q.scale.shape == (3,)
    assert q.scale[1] == 1.0 and q.zero_point[1] == 1  # min == max: scale 1, zp = qmin
    assert q.zero_point_signed[0] == 0 and q.scale[0] == np.float32(2 / 254)


def test_nudge_returns_float32_and_handles_per_channel():
    g = xqat.nudge(np.array([-1.0, 0.5]), np.array([1.0, 2.0]))
    assert all(t.shape == (2,) for t in g)
    assert g.nudged_min[1].item() == 0.0  # 0 < min < max -> range shifts to [0, max - min]
    assert g.nudged_max[1].item() == pytest.approx(1.5)
