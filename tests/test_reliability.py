"""Reliability: checkpoint/resume in a new process is bit-identical, exporting from a checkpoint in a
fresh process gives the same .tflite bytes, NaN/Inf never poison ranges or BN statistics, all-zero tensors
export, and wrong shapes/dtypes or corrupt files give clear errors (CLI: exit code 2, no traceback)."""

from __future__ import annotations

import copy
import io
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import xqat
from tests.models import INPUT_SHAPE, calibrate, make_model
from xqat.torch_side.quantizers import ActivationQuantizer

REPO = Path(__file__).resolve().parents[1]
FACTORY = "tests.models:plain"
# quant_delay, a BN freeze and the range-learning switch all fall after the checkpoint; learned ranges put
# the range parameters into the optimizer state too
CONFIG = dict(quant_delay=1, freeze_bn_delay=4, learn_ranges=True, range_warmup_steps=2)
STEPS, CUT = 6, 3


# -- a tiny training run, shared with the resume script (it imports these) ---------------------------------
def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [(torch.rand(8, *INPUT_SHAPE[1:], generator=g) * 1.5 - 0.25, torch.randint(0, 10, (8,), generator=g))
            for _ in range(STEPS)]


def make_optimizer(qat: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(qat.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)


def train(qat: nn.Module, opt: torch.optim.Optimizer, start: int, stop: int = STEPS) -> None:
    qat.train()
    for i, (x, y) in enumerate(batches()[start:stop], start):
        if i == 1:
            qat.xqat_quantizers["x"].freeze()  # a freeze flag set before the checkpoint must survive it
        loss = F.cross_entropy(qat(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


RESUME = """\
import sys
sys.path.insert(0, {repo!r})
import torch
import xqat
from tests.test_reliability import CUT, make_optimizer, train

torch.set_num_threads({threads})
qat, shape = xqat.load_qat({factory!r}, {ckpt!r})
opt = make_optimizer(qat)
opt.load_state_dict(torch.load({opt_state!r}, weights_only=True))
train(qat, opt, CUT)
torch.save({{"state": qat.state_dict(), "opt": opt.state_dict()}}, {out!r})
"""


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO)}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Uninterrupted training in this process, with a checkpoint (model + optimizer) after step CUT, the final
    checkpoint, and the in-process export of the final model."""
    d = tmp_path_factory.mktemp("ckpt")
    qat = xqat.prepare_qat(make_model("plain"), torch.zeros(INPUT_SHAPE), xqat.QATConfig(**CONFIG))
    opt = make_optimizer(qat)
    train(qat, opt, 0, CUT)
    xqat.save_qat(qat, d / "mid.pt", INPUT_SHAPE)
    torch.save(opt.state_dict(), d / "opt.pt")
    mid = {k: v.clone() for k, v in qat.state_dict().items()}
    train(qat, opt, CUT)
    final = {k: v.clone() for k, v in qat.state_dict().items()}
    xqat.save_qat(qat, d / "final.pt", INPUT_SHAPE)
    report = xqat.export_tflite(qat, torch.zeros(INPUT_SHAPE), d / "inproc.tflite")
    return {"dir": d, "mid": mid, "final": final, "opt": opt.state_dict(), "report": report}


def test_resume_in_a_new_process_continues_bit_identically(run):
    d = run["dir"]
    script = d / "resume.py"
    script.write_text(RESUME.format(repo=str(REPO), threads=torch.get_num_threads(), factory=FACTORY,
                                    ckpt=str(d / "mid.pt"), opt_state=str(d / "opt.pt"), out=str(d / "resumed.pt")))
    p = _run([sys.executable, str(script)], cwd=d)
    assert p.returncode == 0, p.stderr[-3000:]
    resumed = torch.load(d / "resumed.pt", weights_only=True)
    final, mid = run["final"], run["mid"]
    assert resumed["state"].keys() == final.keys()
    assert [k for k in final if not torch.equal(resumed["state"][k], final[k])] == []
    momentum = {i: s["momentum_buffer"] for i, s in run["opt"]["state"].items()}
    assert momentum and all(torch.equal(resumed["opt"]["state"][i]["momentum_buffer"], m) for i, m in momentum.items())
    # the comparison is not vacuous: after the checkpoint, weights, EMA and learned ranges, counters and the BN
    # freeze all moved, and the frozen input range did not
    moved = [k for k in final if not torch.equal(mid[k], final[k])]
    assert {"stem.0.conv.weight", "xqat_quantizers.stem_0.max", "conv3.step",
            "stem.0.bn_frozen"} <= set(moved)
    assert not bool(mid["stem.0.bn_frozen"]) and bool(final["stem.0.bn_frozen"])
    assert bool(final["xqat_quantizers.x.frozen"]) and "xqat_quantizers.x.max" not in moved


def test_export_from_a_checkpoint_in_a_fresh_process_gives_the_same_bytes(run):
    d = run["dir"]
    p = _run([sys.executable, "-m", "xqat", "export", FACTORY, "--weights", str(d / "final.pt"),
              "-o", str(d / "cli.tflite")], cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    assert run["report"].ok
    a, b = (d / "inproc.tflite").read_bytes(), (d / "cli.tflite").read_bytes()
    assert len(a) > 1000 and a == b


# -- NaN / Inf ----------------------------------------------------------------------------------------------
def test_non_finite_values_are_skipped_counted_and_warned():
    q = ActivationQuantizer().train()
    clean = ActivationQuantizer().train()
    x = torch.linspace(-1.5, 2.5, 101)
    bad = x.clone()
    bad[[3, 50, 90]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    finite = torch.isfinite(bad)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        y = q(bad)
    clean(bad[finite])
    assert int(q.nan_count) == 1 and int(q.step) == 1
    assert torch.equal(q.min, clean.min) and torch.equal(q.max, clean.max)  # the finite values' range
    assert torch.isfinite(y[finite]).all()
    with pytest.warns(RuntimeWarning, match="2 batches"):
        q(torch.full((10,), float("nan")))  # nothing finite: no update at all
    assert int(q.nan_count) == 2 and int(q.step) == 1 and torch.equal(q.max, clean.max)


def test_nan_batch_in_a_model_poisons_neither_ranges_nor_bn_statistics():
    qat = xqat.prepare_qat(make_model("plain"), torch.zeros(INPUT_SHAPE)).train()
    g = torch.Generator().manual_seed(3)
    clean = [torch.rand(4, *INPUT_SHAPE[1:], generator=g) for _ in range(3)]
    qat(clean[0])
    bad = clean[1].clone()
    bad[0, 0, 2, 3] = float("nan")
    bad[1, 2, 5, 5] = float("inf")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qat(bad)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert any("quantizer" in m for m in messages) and any("BN batch statistics" in m for m in messages)
    qat(clean[2])
    state = qat.state_dict()
    assert all(torch.isfinite(v).all() for k, v in state.items() if v.is_floating_point())
    assert int(state["xqat_quantizers.x.nan_count"]) == 1
    assert int(state["xqat_quantizers.stem_0.nan_count"]) == 1  # the NaN spread through the BN fold
    assert int(state["xqat_quantizers.x.step"]) == 3  # the input range used the finite part of the bad batch
    qat.eval()
    assert torch.isfinite(qat(clean[0])).all()


def test_inf_only_stays_at_the_input_quantizer():
    """+-Inf is clamped by the input fake quant, so only the input quantizer ever sees it."""
    qat = xqat.prepare_qat(make_model("plain"), torch.zeros(INPUT_SHAPE)).train()
    x = torch.rand(4, *INPUT_SHAPE[1:])
    x[0, 1, 1, 1], x[2, 0, 7, 7] = float("inf"), -float("inf")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        y = qat(x)
    counts = {k: int(q.nan_count) for k, q in qat.xqat_quantizers.items()}
    assert counts.pop("x") == 1 and set(counts.values()) == {0}
    assert torch.isfinite(y).all()


# -- zero-range (all-constant) activations ------------------------------------------------------------------
class DeadBranch(nn.Module):
    """A ReLU of a negative constant: the `dead` branch is all zeros (range [0, 0]) and is added back."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.dead = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)
        with torch.no_grad():
            self.dead.weight.zero_()
            self.dead.bias.fill_(-1.0)

    def forward(self, x):
        a = self.stem(x)
        z = F.relu(self.dead(a))
        y = F.relu(self.head(a + z))
        return self.fc(y.mean((2, 3)))


@pytest.fixture(scope="module")
def dead(tmp_path_factory):
    torch.manual_seed(0)
    qat = xqat.prepare_qat(DeadBranch().eval(), torch.zeros(1, 3, 8, 8)).train()
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        qat(torch.rand(4, 3, 8, 8, generator=g))
    q = qat.xqat_quantizers["dead"]
    assert (float(q.min), float(q.max), int(q.step)) == (0.0, 0.0, 3)  # observed, all-zero
    unsnapped = {k: v.clone() for k, v in qat.state_dict().items()}  # what save_qat would have written
    path = tmp_path_factory.mktemp("dead") / "dead.tflite"
    report = xqat.export_tflite(qat.eval(), torch.rand(1, 3, 8, 8), path, snap_model=True)  # qat: as deployed
    fresh = xqat.prepare_qat(DeadBranch().eval(), torch.zeros(1, 3, 8, 8))
    fresh.load_state_dict(unsnapped)
    return qat, path, report, fresh.eval()


def test_zero_range_tensor_exports_and_runs(dead):
    qat, path, report, fresh = dead
    assert report.ok and path.is_file()
    row = next(r for r in report.tensors if r.kind == "activation" and r.torch_name == "dead")
    # scale 1 (docs/numerics.md#converter-qparams), 0 at the top
    assert row.tflite_scale == (1.0,) and row.tflite_zero_point == (127,)
    snap = next(s for s in report.snaps if s.group == "dead")
    assert snap.old_range == (0.0, 0.0) and snap.new_range == (-255.0, 0.0)
    x = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    # the exported (snapped) model, and one loaded from the pre-export state as `xqat parity --weights` does
    assert fresh.xqat_quantizers["dead"].scale_zero_point() == (1.0, 255)
    for model in (qat, fresh):
        par = xqat.parity(model, path, x, layerwise=True)
        layer = next(t for t in par.layers if t.name == "dead")
        assert layer.identical == 1.0  # the interpreter's dead tensor is exactly 0, as TF's fake quant of [0, 0]
        assert par.outputs[0].max_abs <= 1


def test_zero_range_grid_still_maps_every_non_negative_value_to_zero(dead):
    q = dead[0].xqat_quantizers["dead"]  # snapped by export_tflite(..., snap_model=True)
    x = torch.tensor([0.0, 0.3, 1.0, 7.5, 300.0])
    assert torch.equal(xqat.fake_quant(x, q.min, q.max), torch.zeros(5))  # same as TF's [0, 0] special case
    assert torch.equal(xqat.fake_quant(x, torch.tensor(0.0), torch.tensor(0.0)), torch.zeros(5))


# -- wrong shapes and dtypes --------------------------------------------------------------------------------
def test_prepare_qat_names_what_is_wrong_with_the_example():
    m = make_model("plain")
    with pytest.raises(xqat.InputError, match=r"does not fit PlainCNN at 'stem.0' \(Conv2d\).*3 channels"):
        xqat.prepare_qat(m, torch.zeros(1, 4, 16, 16))
    with pytest.raises(xqat.InputError, match="example input 'x' is a 4-D torch.int64 tensor.*float"):
        xqat.prepare_qat(m, torch.zeros(1, 3, 16, 16, dtype=torch.int64))
    with pytest.raises(xqat.InputError, match="numpy array.*torch.from_numpy"):
        xqat.prepare_qat(m, np.zeros((1, 3, 16, 16), np.float32))
    with pytest.raises(xqat.InputError, match=r"takes the inputs \['x'\], but 2 example input"):
        xqat.prepare_qat(m, (torch.zeros(INPUT_SHAPE), torch.zeros(INPUT_SHAPE)))


def test_qat_forward_names_the_input_and_what_it_needs():
    qat = xqat.prepare_qat(make_model("plain"), torch.zeros(INPUT_SHAPE)).train()
    need = r"needs 4-D float32 with 3 in dim 1"
    for bad in (torch.rand(3, 16, 16), torch.rand(2, 5, 16, 16), torch.rand(2, 3, 16, 16, dtype=torch.float64),
                torch.randint(0, 255, (2, 3, 16, 16))):
        with pytest.raises(xqat.InputError, match=re.escape(f"input 'x' has shape {tuple(bad.shape)}") + ".*" + need):
            qat(bad)
    assert qat(torch.rand(2, 3, 24, 20)).shape == (2, 10)  # batch and spatial sizes may differ
    buf = io.BytesIO()
    torch.save(qat, buf)  # the check lives in the graph: it survives copies, pickling (and DDP)
    buf.seek(0)
    for copied in (copy.deepcopy(qat), torch.load(buf, weights_only=False)):
        with pytest.raises(xqat.InputError, match="input 'x'"):
            copied.eval()(torch.rand(1, 1, 16, 16))
    assert int(qat.xqat_quantizers["x"].step) == 1  # the rejected batches touched no state


def test_export_and_parity_reject_unfit_inputs(dead, tmp_path):
    qat, path = dead[:2]
    out = tmp_path / "bad.tflite"
    with pytest.raises(xqat.ExportError, match="example input 0 must be a float tensor.*int64"):
        xqat.export_tflite(qat, torch.zeros(1, 3, 8, 8, dtype=torch.int64), out)
    with pytest.raises(xqat.InputError, match="input 'x' has shape \\(1, 4, 8, 8\\)"):
        xqat.export_tflite(qat, torch.zeros(1, 4, 8, 8), out)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary file
    with pytest.raises(xqat.ParityError, match=r"inputs of shape \(2, 3, 9, 9\) do not fit"):
        xqat.parity(qat, path, torch.rand(2, 3, 9, 9))
    with pytest.raises(xqat.ParityError, match="do not fit"):
        xqat.parity(qat, path, torch.rand(3, 8, 8))


# -- corrupt and truncated files in every CLI command -------------------------------------------------------
@pytest.fixture(scope="module")
def broken_files(run):
    d = run["dir"]
    good_ckpt, good_tfl = (d / "final.pt").read_bytes(), (d / "inproc.tflite").read_bytes()
    files = {"ckpt_truncated": good_ckpt[: len(good_ckpt) // 2], "ckpt_garbage": os.urandom(4096),
             "ckpt_empty": b"", "tflite_truncated": good_tfl[: len(good_tfl) // 3],
             "tflite_garbage": b"TFL3" + os.urandom(2000), "npy_truncated": b"\x93NUMPY\x01\x00v\x00{'descr"}
    for name, data in files.items():
        (d / name).write_bytes(data)
    return d


# case -> (argv, what the one-line error must name)
CLI_CASES = {
    "export_truncated_ckpt": (["export", FACTORY, "--weights", "{d}/ckpt_truncated", "-o", "{d}/o.tflite"],
                              "ckpt_truncated"),
    "export_garbage_ckpt": (["export", FACTORY, "--weights", "{d}/ckpt_garbage", "-o", "{d}/o.tflite"],
                            "ckpt_garbage"),
    "export_empty_ckpt": (["export", FACTORY, "--weights", "{d}/ckpt_empty", "-o", "{d}/o.tflite"], "ckpt_empty"),
    "export_wrong_shape": (["export", FACTORY, "--weights", "{d}/final.pt", "--input-shape", "1,4,16,16",
                            "-o", "{d}/o.tflite"], "(1, 4, 16, 16)"),
    "parity_truncated_ckpt": (["parity", "{d}/inproc.tflite", "--model", FACTORY, "--weights",
                               "{d}/ckpt_truncated"], "ckpt_truncated"),
    "parity_truncated_tflite": (["parity", "{d}/tflite_truncated", "--model", FACTORY, "--weights",
                                 "{d}/final.pt"], "corrupt"),  # names <bytes>, not the file: see report
    "parity_garbage_tflite": (["parity", "{d}/tflite_garbage", "--model", FACTORY, "--weights", "{d}/final.pt"],
                              "corrupt"),
    "parity_truncated_npy": (["parity", "{d}/inproc.tflite", "--model", FACTORY, "--weights", "{d}/final.pt",
                              "--data", "{d}/npy_truncated"], "npy_truncated"),
    "check_edgetpu_truncated": (["check-edgetpu", "{d}/tflite_truncated"], "tflite_truncated"),
    "check_edgetpu_garbage": (["check-edgetpu", "{d}/tflite_garbage"], "tflite_garbage"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_reports_broken_files_in_one_line_with_exit_code_2(case, broken_files, capsys):
    from xqat.cli import main

    argv, named = CLI_CASES[case]
    assert main([a.format(d=broken_files) for a in argv]) == 2  # any non-XQATError exception would escape
    err = capsys.readouterr().err
    assert "Traceback" not in err
    first = err.splitlines()[0]
    assert first.startswith(f"xqat {argv[0]}: error:") and named in first, err
    assert not (broken_files / "o.tflite").exists()


# -- absurd but finite batches -------------------------------------------------------------------
def _calibrated(**kw) -> ActivationQuantizer:
    q = ActivationQuantizer(**kw).train()
    g = torch.Generator().manual_seed(5)
    for _ in range(5):
        q(torch.rand(64, generator=g) * 2 - 0.5)
    return q


def test_one_absurd_batch_is_left_out_counted_and_warned():
    q = _calibrated()
    before = (q.min.clone(), q.max.clone(), int(q.step))
    with pytest.warns(RuntimeWarning, match="left out of the range statistics"):
        q(torch.full((64,), 1e30))
    assert (torch.equal(q.min, before[0]), torch.equal(q.max, before[1]), int(q.step)) == (True, True, before[2])
    assert int(q.outlier_count) == 1
    with pytest.warns(RuntimeWarning, match="left out"):
        q(torch.full((64,), -1e30))
    with pytest.warns(RuntimeWarning, match="used in"):  # a third in a row: the distribution really moved
        q(torch.full((64,), 1e30))
    assert int(q.outlier_count) == 3 and float(q.max) > 1e20

    warned = _calibrated(outliers="warn")
    with pytest.warns(RuntimeWarning, match="used in"):
        warned(torch.full((64,), 1e30))
    assert float(warned.max) > 1e20 and int(warned.outlier_count) == 1
    off = _calibrated(outliers="off")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        off(torch.full((64,), 1e30))
    assert int(off.outlier_count) == 0


def test_outlier_policy_is_a_checked_config_field():
    assert xqat.QATConfig().range_outliers == "skip"
    qat = xqat.prepare_qat(make_model("plain"), torch.zeros(INPUT_SHAPE),
                           xqat.QATConfig(range_outliers="warn", range_outlier_factor=50.0))
    assert {(q.outliers, q.outlier_factor) for q in qat.xqat_quantizers.values()} == {("warn", 50.0)}
    with pytest.raises(xqat.QATConfigError, match="range_outliers"):
        xqat.QATConfig(range_outliers="ignore")
    with pytest.raises(xqat.QATConfigError, match="range_outlier_factor"):
        xqat.QATConfig(range_outlier_factor=0.5)


def test_state_without_outlier_count_still_loads():
    q = _calibrated()
    state = {k: v for k, v in q.state_dict().items() if k != "outlier_count"}
    fresh = ActivationQuantizer()
    assert fresh.load_state_dict(state, strict=True) is not None and torch.equal(fresh.max, q.max)


def test_export_report_flags_a_degenerate_grid(tmp_path):
    qat = xqat.prepare_qat(make_model("plain"), torch.zeros(INPUT_SHAPE)).train()
    with torch.no_grad():
        qat(torch.rand(4, *INPUT_SHAPE[1:]))
        qat.xqat_quantizers["x"].max.fill_(1e28)  # what a 1e30 batch did to the input range before the policy
    report = xqat.export_tflite(qat.eval(), torch.zeros(INPUT_SHAPE), tmp_path / "dead.tflite", strict=False)
    problems = [p for p in report.problems() if "degenerate grid" in p]
    assert not report.ok and len(problems) == 1 and "'input:x'" in problems[0], report.problems()


def test_a_1e30_batch_does_not_ruin_the_model():
    """The issue's case: one batch of 1e30 used to move the input range to 1e28 (a dead model)."""
    qat = calibrate(xqat.prepare_qat(make_model("plain"), torch.zeros(INPUT_SHAPE))).train()
    x = qat.xqat_quantizers["x"]
    before = (float(x.min), float(x.max))
    with pytest.warns(RuntimeWarning, match="left out of the range statistics"):
        qat(torch.full((4, *INPUT_SHAPE[1:]), 1e30))
    assert (float(x.min), float(x.max)) == before and int(x.outlier_count) == 1
    # the input fake quant clamps the batch onto the kept grid: nothing absurd reaches the later ranges
    assert all(abs(float(q.min)) < 1e3 and abs(float(q.max)) < 1e3 for q in qat.xqat_quantizers.values())
