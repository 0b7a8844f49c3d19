"""Real architectures end to end (torchvision, timm, detection/segmentation heads, Conv1d): every zoo model
prepares, trains, exports strictly, matches the emulator bit for bit on three backends, computes in exact numerics
(`xqat.set_numerics`) the interpreter's codes on every tensor and, for the EdgeTPU
families, exports with edgetpu=True fully mapped. The same runs fill docs/model-zoo.md
(`python -m benchmarks.model_zoo`; a model too heavy for the CI machine runs as its stand-in,
`TEST_STAND_INS`). Marked `zoo` (slow); CI runs it: `pytest -m "not zoo"` skips it locally."""

from __future__ import annotations

import pytest

from tests.real_models import TEST_STAND_INS, ZOO, zoo_model
from tests.zoo_check import BACKENDS, check_model

pytestmark = pytest.mark.zoo

# Parity with the default "tf" numerics drifts in deep nets (rounding differences compound layer by layer);
# this bound catches a broken range or a wrong grid (tens of LSB), not that drift.
MAX_OUTPUT_LSB = 24

# (model, size) pairs beyond 64x64: every class of degenerate shape (1x1 final maps at 32 px, non-square)
OTHER_SIZES = [("resnet18", (32, 32)), ("mobilenet_v2", (32, 32)), ("squeezenet1_1", (32, 32)),
               ("mnasnet0_5", (32, 32)), ("timm/efficientnet_lite0", (32, 32)), ("mobilenet_v2", (48, 80)),
               ("small U-Net", (48, 80))]

# Known failures (causes in docs/model-zoo.md). Export-stage failures of big graphs are not run in CI (each costs a
# full conversion); the cheap ones run as xfails, so a fix shows up as XPASS.
KNOWN_FAILURES: dict[str, tuple[str, bool]] = {}


def _case(name: str, size: tuple[int, int]):
    known = KNOWN_FAILURES.get((name, size)) or KNOWN_FAILURES.get(name)
    case_id = f"{name}@{size[0]}x{size[1]}"
    if known is None:
        return pytest.param(name, size, id=case_id)
    reason, run = known
    return pytest.param(name, size, id=case_id, marks=pytest.mark.xfail(reason=reason, run=run, strict=False))


CASES = [_case(z.name, (64, 64)) for z in ZOO] + [_case(n, s) for n, s in OTHER_SIZES]


@pytest.mark.parametrize(("name", "size"), CASES)
def test_zoo_model_end_to_end(name, size, tmp_path):
    z = TEST_STAND_INS.get(name) or zoo_model(name)
    r = check_model(z, size, tmp_path, n_inputs=4)
    assert r.ok, f"{name} at {size}: fails at {r.stage}: {r.error}"
    assert all(r.emulator_exact[b] for b in BACKENDS), f"emulator differs from the interpreter: {r.emulator_exact}"
    assert max(r.max_abs.values()) <= MAX_OUTPUT_LSB, f"output parity {r.max_abs} LSB"
    assert not r.exact_error, f"exact numerics refused: {r.exact_error}"
    assert all(r.exact[b] == 1.0 for b in BACKENDS), f"exact numerics: least share of identical codes {r.exact}"
    if z.edgetpu:
        assert r.edgetpu_export == "ok", r.edgetpu_export
        assert r.edgetpu_fully_mapped, f"EdgeTPU segment covers {r.edgetpu_mapped:.0%} of ops"
