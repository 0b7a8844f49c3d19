"""Careless and hostile use of the CLI and the checkpoint/factory loader: every user error is one
line on stderr and exit code 2, found before the slow work; all outputs of a command or none; no code from
the working directory; damaged checkpoints refused; SIGTERM/SIGKILL leave no scratch folders; Ctrl-C ends
cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import xqat
from tests.models import INPUT_SHAPE, calibrate, make_model
from xqat.checkpoint import load_factory, load_qat

REPO = Path(__file__).resolve().parents[1]
FACTORY = "tests.models:plain"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A calibrated QAT checkpoint and its exported .tflite, plus broken variants of both."""
    d = tmp_path_factory.mktemp("cli")
    qat = calibrate(xqat.prepare_qat(make_model("plain"), torch.rand(INPUT_SHAPE)))
    xqat.save_qat(qat, d / "qat.pt", INPUT_SHAPE)
    xqat.export_tflite(qat, torch.rand(INPUT_SHAPE), d / "m.tflite")
    ckpt = torch.load(d / "qat.pt", weights_only=True)
    torch.save({**ckpt, "config": {**ckpt["config"], "no_such_knob": 1}}, d / "unknown_key.pt")
    torch.save({k: v for k, v in ckpt.items() if k != "state_dict"}, d / "no_state.pt")
    wrong = {k: (torch.zeros(7, *v.shape[1:]) if k.startswith("fc.") and v.dim() >= 1 and v.shape[0] == 10 else v)
             for k, v in ckpt["state_dict"].items()}
    torch.save({**ckpt, "state_dict": wrong, "sha256": xqat.checkpoint.state_hash(wrong)}, d / "classes7.pt")
    np.savez(d / "x.npz", x=np.zeros((2, 3, 16, 16), np.float32))
    np.save(d / "empty.npy", np.zeros((0, 3, 16, 16), np.float32))
    np.save(d / "strings.npy", np.array([["a", "b"]]))
    bad = np.random.rand(2, 3, 16, 16).astype(np.float32)
    bad[0, 0, 0, 0] = np.nan
    np.save(d / "nan.npy", bad)
    (d / "needs_args.py").write_text("def build(width):\n    raise AssertionError\n")
    (d / "syntax.py").write_text("def build(:\n")
    return d


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    from xqat.cli import main

    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    return rc, capsys.readouterr().err


# case -> (argv, text the one error line must contain)
USER_ERRORS = {
    "empty_module": (["export", ":DigitsCNN", "--weights", "{d}/qat.pt", "-o", "{d}/o.tflite"], "MODULE:FUNCTION"),
    "another_class_count": (["export", FACTORY, "--weights", "{d}/classes7.pt", "-o", "{d}/o.tflite"],
                            "tensor shapes differ"),
    "unknown_config_key": (["export", FACTORY, "--weights", "{d}/unknown_key.pt", "-o", "{d}/o.tflite"],
                           "no_such_knob"),
    "no_state_dict": (["export", FACTORY, "--weights", "{d}/no_state.pt", "-o", "{d}/o.tflite"], "no state_dict"),
    "factory_needs_args": (["export", "{d}/needs_args.py:build", "--weights", "{d}/qat.pt", "-o", "{d}/o.tflite"],
                           "without arguments"),
    "factory_syntax_error": (["export", "{d}/syntax.py:build", "--weights", "{d}/qat.pt", "-o", "{d}/o.tflite"],
                             "syntax error"),
    "huge_input_shape": (["export", FACTORY, "--weights", "{d}/qat.pt", "--input-shape", "1,3,100000,100000",
                          "-o", "{d}/o.tflite"], "elements"),
    "json_missing_folder": (["export", FACTORY, "--weights", "{d}/qat.pt", "-o", "{d}/o.tflite",
                             "--json", "{d}/nope/r.json"], "does not exist"),
    "data_npz": (["parity", "{d}/m.tflite", "--model", FACTORY, "--weights", "{d}/qat.pt", "--data", "{d}/x.npz"],
                 ".npz"),
    "data_empty": (["parity", "{d}/m.tflite", "--model", FACTORY, "--weights", "{d}/qat.pt", "--data",
                    "{d}/empty.npy"], "non-empty"),
    "data_strings": (["parity", "{d}/m.tflite", "--model", FACTORY, "--weights", "{d}/qat.pt", "--data",
                      "{d}/strings.npy"], "real numbers"),
    "data_nan": (["parity", "{d}/m.tflite", "--model", FACTORY, "--weights", "{d}/qat.pt", "--data",
                  "{d}/nan.npy"], "NaN or Inf"),
    "random_0": (["parity", "{d}/m.tflite", "--model", FACTORY, "--weights", "{d}/qat.pt", "--random", "0"],
                 "must be >= 1"),
    "random_negative": (["parity", "{d}/m.tflite", "--model", FACTORY, "--weights", "{d}/qat.pt", "--random", "-3"],
                        "must be >= 1"),
    "tolerance_negative": (["parity", "{d}/m.tflite", "--model", FACTORY, "--weights", "{d}/qat.pt",
                            "--tolerance", "-5"], "must be >= 0"),
    # checked before anything slow: the missing checkpoint would fail later, the folder is named first
    "plot_missing_folder": (["parity", "{d}/m.tflite", "--model", FACTORY, "--weights", "{d}/missing.pt",
                             "--plot", "{d}/nope/p.png"], "nope"),
    "parity_json_missing_folder": (["parity", "{d}/m.tflite", "--model", FACTORY, "--weights", "{d}/missing.pt",
                                    "--json", "{d}/nope/r.json"], "nope"),
}


@pytest.mark.parametrize("case", list(USER_ERRORS))
def test_user_errors_are_one_line_and_exit_2(case, files, capsys):
    argv, named = USER_ERRORS[case]
    rc, err = _cli([a.format(d=files) for a in argv], capsys)
    assert rc == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert named in err, err
    assert not (files / "o.tflite").exists()  # all outputs or none (the --json case)


def test_parity_api_refuses_non_finite_inputs(files):
    qat, _ = load_qat(FACTORY, files / "qat.pt")
    x = torch.rand(2, *INPUT_SHAPE[1:])
    x[1, 0, 0, 0] = float("inf")
    with pytest.raises(xqat.ParityError, match="NaN or Inf"):
        xqat.parity(qat, files / "m.tflite", x)


def test_parity_exit_codes(files, capsys):
    base = ["parity", str(files / "m.tflite"), "--model", FACTORY, "--weights", str(files / "qat.pt"),
            "--random", "4"]
    assert _cli(base, capsys)[0] == 0
    assert _cli(base + ["--backend", "reference", "--layerwise", "--tolerance", "0"], capsys)[0] in (0, 1)


# -- checkpoints --------------------------------------------------------------------------------------------
def test_bit_flipped_checkpoint_is_refused_naming_the_file(files, tmp_path):
    raw = bytearray((files / "qat.pt").read_bytes())
    qat, _ = load_qat(FACTORY, files / "qat.pt")
    w = qat.state_dict()["stem.0.conv.weight"].contiguous().numpy().tobytes()
    at = bytes(raw).find(w)
    assert at > 0
    raw[at + 5] ^= 0x10  # one bit of one weight
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(bytes(raw))
    with pytest.raises(xqat.XQATError, match=r"flipped\.pt is damaged"):
        load_qat(FACTORY, bad)


def test_checkpoint_without_hash_loads_with_a_warning(files, tmp_path):
    ckpt = torch.load(files / "qat.pt", weights_only=True)
    old = tmp_path / "old.pt"
    torch.save({k: v for k, v in ckpt.items() if k != "sha256"}, old)
    with pytest.warns(UserWarning, match=r"old\.pt has no content hash"):
        load_qat(FACTORY, old)


def test_export_cli_imports_a_factory_file_once(files, tmp_path, capsys):
    counter = tmp_path / "imports.txt"
    (tmp_path / "counted.py").write_text(
        f"open({str(counter)!r}, 'a').write('x')\nfrom tests.models import plain as build\n")
    rc, err = _cli(["export", f"{tmp_path / 'counted.py'}:build", "--weights", str(files / "qat.pt"),
                    "-o", str(tmp_path / "c.tflite")], capsys)
    assert rc == 0, err
    assert counter.read_text() == "x"


def test_load_factory_does_not_search_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "cwd_only_factory.py").write_text("def build():\n    raise AssertionError('ran')\n")
    monkeypatch.chdir(tmp_path)
    before = list(sys.path)
    assert load_factory(FACTORY).__name__ == "plain"
    with pytest.raises(xqat.XQATError, match="PYTHONPATH"):
        load_factory("cwd_only_factory:build")
    assert sys.path == before  # a module factory adds nothing
    assert callable(load_factory(str(tmp_path / "cwd_only_factory.py") + ":build"))  # a path factory may
    assert sys.path[-1] == str(tmp_path) and sys.path[:-1] == before
    sys.path.pop()


def test_empty_training_batch_is_a_clear_error():
    qat = xqat.prepare_qat(make_model("plain"), torch.rand(INPUT_SHAPE)).train()
    with pytest.raises(xqat.InputError, match="empty"):
        qat(torch.zeros(0, *INPUT_SHAPE[1:]))


# -- processes: the working directory, SIGTERM, SIGKILL, Ctrl-C ------------------------------------------------
TRAP = "open({marker!r}, 'w').write('imported'); raise SystemExit(97)\n"


def _spawn(argv: list[str], cwd: Path, tmpdir: Path) -> subprocess.Popen:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO), "TMPDIR": str(tmpdir)}
    return subprocess.Popen([sys.executable, "-m", "xqat", *argv], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_terminal_signals)


def _terminal_signals() -> None:
    """SIGINT as in a terminal: a test run launched as a background job (`cmd &`) ignores it, the child inherits
    that, and the CLI rightly keeps an ignored SIGINT ignored (nohup semantics)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_until_importing_torch(proc: subprocess.Popen, limit: float = 120) -> None:
    """Until the CLI loads torch's library (inside `main`, after its start): a fixed sleep lands earlier, in the
    interpreter's own start-up, on a loaded machine. Without /proc, a second."""
    maps = Path(f"/proc/{proc.pid}/maps")
    if not maps.exists():
        time.sleep(1.0)
        return
    end = time.monotonic() + limit
    while time.monotonic() < end and proc.poll() is None:
        try:
            if "libtorch" in maps.read_text():
                return
        except OSError:
            pass
        time.sleep(0.02)
    raise AssertionError(f"the CLI never loaded torch (rc {proc.poll()})")


def _wait_for_scratch(tmpdir: Path, proc: subprocess.Popen, limit: float = 240) -> list[Path]:
    end = time.monotonic() + limit
    while time.monotonic() < end and proc.poll() is None:
        found = list(tmpdir.glob(f"xqat-onnx2tf-{proc.pid}-*"))
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"no scratch folder appeared (rc {proc.poll()})")


def test_export_ignores_the_working_directory_and_cleans_up_after_sigterm_and_sigkill(files, tmp_path):
    work, tmp = tmp_path / "work", tmp_path / "tmp"
    work.mkdir()
    tmp.mkdir()
    marker = tmp_path / "shadowed"
    for name in ("onnx2tf", "tensorflow", "onnx"):
        (work / f"{name}.py").write_text(TRAP.format(marker=str(marker)))
    argv = ["export", FACTORY, "--weights", str(files / "qat.pt"), "-o", str(work / "m.tflite")]
    p = _spawn(argv, work, tmp)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0 and not marker.exists(), err[-2000:]
    assert (work / "m.tflite").read_bytes() == (files / "m.tflite").read_bytes()

    p = _spawn(argv, work, tmp)  # SIGKILL: the scratch folder stays ...
    _wait_for_scratch(tmp, p)
    p.kill()
    p.wait(timeout=60)
    killed = list(tmp.glob("xqat-onnx2tf-*"))
    assert killed and str(p.pid) in killed[0].name

    p = _spawn(argv, work, tmp)  # ... until the next run sweeps it; SIGTERM cleans up its own
    mine = _wait_for_scratch(tmp, p)
    assert mine and not any(k.exists() for k in killed)
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM
    assert list(tmp.glob("xqat-onnx2tf-*")) == []


def test_ctrl_c_at_start_exits_130_in_one_line(files, tmp_path):
    p = _spawn(["export", FACTORY, "--weights", str(files / "qat.pt"), "-o", str(tmp_path / "m.tflite")],
               tmp_path, tmp_path)
    _wait_until_importing_torch(p)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1].endswith("interrupted")
