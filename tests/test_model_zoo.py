"""Real architectures end to end (torchvision, timm, detection/segmentation heads, Conv1d): every zoo model
prepares, trains, exports strictly, matches the emulator bit for bit on three backends and, for the EdgeTPU
families, exports with edgetpu=True fully mapped. The same runs fill docs/model-zoo.md
(`python -m benchmarks.model_zoo`). Marked `zoo` (slow); CI runs it: `pytest -m "not zoo"` skips it locally."""

from __future__ import annotations

import pytest

from tests.real_models import ZOO, zoo_model
from tests.zoo_check import BACKENDS, check_model

pytestmark = pytest.mark.zoo

# Parity with the default "tf" numerics drifts in deep nets (rounding differences compound layer by layer);
# this bound catches a broken range or a wrong grid (tens of LSB), not that drift.
MAX_OUTPUT_LSB = 24

# (model, size) pairs beyond 64x64: every class of degenerate shape (1x1 final maps at 32 px, non-square)
OTHER_SIZES = [("resnet18", (32, 32)), ("mobilenet_v2", (32, 32)), ("squeezenet1_1", (32, 32)),
               ("mnasnet0_5", (32, 32)), ("timm/efficientnet_lite0", (32, 32)), ("mobilenet_v2", (48, 80)),
               ("small U-Net", (48, 80))]

CASES = [(z.name, (64, 64)) for z in ZOO] + OTHER_SIZES


@pytest.mark.parametrize(("name", "size"), CASES, ids=[f"{n}@{s[0]}x{s[1]}" for n, s in CASES])
def test_zoo_model_end_to_end(name, size, tmp_path):
    z = zoo_model(name)
    r = check_model(z, size, tmp_path, n_inputs=4)
    assert r.ok, f"{name} at {size}: fails at {r.stage}: {r.error}"
    assert all(r.emulator_exact[b] for b in BACKENDS), f"emulator differs from the interpreter: {r.emulator_exact}"
    assert max(r.max_abs.values()) <= MAX_OUTPUT_LSB, f"output parity {r.max_abs} LSB"
    if z.edgetpu:
        assert r.edgetpu_export == "ok", r.edgetpu_export
        assert r.edgetpu_fully_mapped, f"EdgeTPU segment covers {r.edgetpu_mapped:.0%} of ops"
