"""QAT checkpoints and model factories: what the CLI needs to rebuild a trained QAT model in a new process.

A checkpoint is `torch.save` of {"format": "xqat-qat-v1", "config": QATConfig fields, "input_shape",
"state_dict"}; a bare state_dict is accepted too (default QATConfig). The float architecture comes from a
factory, `MODULE:FUNCTION` (a module on the Python path or a .py file), as in `xqat export`.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import sys
from pathlib import Path

import torch
from torch import nn

from .errors import XQATError
from .torch_side.config import QATConfig
from .torch_side.prepare import is_qat_model, prepare_qat, qat_config

__all__ = ["save_qat", "load_qat", "load_factory"]

FORMAT = "xqat-qat-v1"


def save_qat(model: nn.Module, path: str | os.PathLike, input_shape: tuple[int, ...]) -> None:
    """Save a QAT model's full state (ranges, step counters, freeze flags, BN statistics) and config."""
    if not is_qat_model(model):
        raise XQATError(f"{type(model).__name__} was not made by xqat.prepare_qat; save it with torch.save instead")
    torch.save({"format": FORMAT, "config": dataclasses.asdict(qat_config(model)),
                "input_shape": list(input_shape), "state_dict": model.state_dict()}, path)


def load_factory(spec: str):
    """Resolve `MODULE:FUNCTION` (dotted module or path/to/file.py) to the callable."""
    if ":" not in spec:
        raise XQATError(f"model factory {spec!r} must look like MODULE:FUNCTION, e.g. mypkg.models:build")
    mod_name, _, fn_name = spec.rpartition(":")
    try:
        if mod_name.endswith(".py") or os.sep in mod_name:
            p = Path(mod_name)
            if not p.is_file():
                raise XQATError(f"model factory file {p} does not exist")
            s = importlib.util.spec_from_file_location(p.stem, p)
            module = importlib.util.module_from_spec(s)
            s.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(mod_name)
    except ImportError as e:
        raise XQATError(f"cannot import {mod_name!r} for the model factory: {e}") from e
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise XQATError(f"{mod_name!r} has no callable {fn_name!r} to build the float model")
    return fn


def load_qat(factory: str, checkpoint: str | os.PathLike, input_shape: tuple[int, ...] | None = None) -> tuple[
        nn.Module, tuple[int, ...]]:
    """Rebuild a trained QAT model: float model from the factory, prepare_qat, then the checkpoint's state."""
    path = Path(checkpoint)
    if not path.is_file():
        raise XQATError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's own text suggests weights_only=False, which is wrong advice here
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise XQATError(f"cannot read checkpoint {path}: corrupt, truncated or not a torch file ({first[:200]}); "
                        "save it with xqat.save_qat") from e
    if isinstance(ckpt, dict) and ckpt.get("format") == FORMAT:
        config, state = QATConfig(**ckpt["config"]), ckpt["state_dict"]
        input_shape = tuple(input_shape or ckpt["input_shape"])
    else:
        config, state = QATConfig(), ckpt
    if input_shape is None:
        raise XQATError(f"checkpoint {path} does not record the input shape: pass --input-shape N,C,H,W")
    float_model = load_factory(factory)() if isinstance(factory, str) else factory()
    if not isinstance(float_model, nn.Module):
        raise XQATError(f"the factory {factory!r} returned {type(float_model).__name__}, not an nn.Module")
    qat = prepare_qat(float_model.eval(), torch.zeros(input_shape), config)
    missing, unexpected = qat.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise XQATError(f"checkpoint {path} does not fit the model from {factory!r}: missing keys {missing[:5]}, "
                        f"unexpected keys {unexpected[:5]}")
    return qat.eval(), tuple(input_shape)
