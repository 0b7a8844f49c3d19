"""QAT checkpoints and model factories: what the CLI needs to rebuild a trained QAT model in a new process.

A checkpoint is `torch.save` of {"format": "xqat-qat-v1", "config": QATConfig fields, "input_shape",
"state_dict", "sha256"}; a bare state_dict is accepted too (default QATConfig). "sha256" is a content hash
of the state tensors (names, dtypes, shapes, bytes), checked on load, so a damaged file that still unpickles
is refused instead of silently loading altered weights. The float architecture comes from a factory,
`MODULE:FUNCTION` (a module on the Python path or a .py file), as in `xqat export`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import math
import os
import sys
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from .errors import XQATError
from .torch_side.config import QATConfig
from .torch_side.prepare import qat_config, require_qat_model
from .verify.exact import prepare_qat  # QATConfig.numerics applied too

__all__ = ["save_qat", "load_qat", "load_factory", "state_hash"]

FORMAT = "xqat-qat-v1"
MAX_EXAMPLE_ELEMENTS = 1 << 26  # an input shape with more elements (256 MiB of float32) is a typo, not a model


def state_hash(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over every state tensor's name, dtype, shape and bytes, in sorted key order."""
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k]
        h.update(k.encode())
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(repr(v).encode())
    return h.hexdigest()


def save_qat(model: nn.Module, path: str | os.PathLike, input_shape: tuple[int, ...]) -> None:
    """Save a QAT model's full state (ranges, step counters, freeze flags, BN statistics), config and a
    content hash of the state."""
    require_qat_model(model, "be saved with xqat.save_qat (save a float model with torch.save)")
    state = model.state_dict()
    torch.save({"format": FORMAT, "config": dataclasses.asdict(qat_config(model)),
                "input_shape": list(input_shape), "state_dict": state, "sha256": state_hash(state)}, path)


def _import_file(p: Path):
    """Import a factory file; its folder goes to the END of sys.path (for its sibling imports), so nothing
    in it can shadow an installed package xqat imports later."""
    if not p.is_file():
        raise XQATError(f"model factory file {p} does not exist")
    folder = str(p.resolve().parent)
    if folder not in sys.path:
        sys.path.append(folder)
    s = importlib.util.spec_from_file_location(p.stem, p)
    if s is None or s.loader is None:
        raise XQATError(f"model factory file {p} is not a Python module (give path/to/file.py:FUNCTION)")
    module = importlib.util.module_from_spec(s)
    s.loader.exec_module(module)
    return module


def load_factory(spec: str):
    """Resolve `MODULE:FUNCTION` to the callable. MODULE is a dotted module on the Python path (the current
    folder is NOT searched, so a stray file there cannot shadow an import) or path/to/file.py."""
    mod_name, sep, fn_name = spec.rpartition(":")
    if not sep or not mod_name or not fn_name:
        raise XQATError(f"model factory {spec!r} must look like MODULE:FUNCTION, e.g. mypkg.models:build "
                        "or path/to/file.py:build")
    try:
        if mod_name.endswith(".py") or os.sep in mod_name or "/" in mod_name:
            module = _import_file(Path(mod_name))
        else:
            module = importlib.import_module(mod_name)
    except XQATError:
        raise
    except ImportError as e:
        raise XQATError(f"cannot import {mod_name!r} for the model factory: {e}; put its folder on PYTHONPATH "
                        "or give the file, e.g. path/to/nets.py:build") from e
    except SyntaxError as e:
        raise XQATError(f"model factory {mod_name!r} has a syntax error: {e.filename}:{e.lineno}: {e.msg}") from e
    except Exception as e:  # any error raised by the user's module at import time
        raise XQATError(f"importing the model factory {mod_name!r} failed: {type(e).__name__}: {e}") from e
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise XQATError(f"{mod_name!r} has no callable {fn_name!r} to build the float model")
    return fn


def _read_checkpoint(path: Path):
    if not path.is_file():
        raise XQATError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's own text suggests weights_only=False, which is wrong advice here
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise XQATError(f"cannot read checkpoint {path}: corrupt, truncated or not a torch file ({first[:200]}); "
                        "save it with xqat.save_qat") from e


def _unpack(path: Path, ckpt) -> tuple[QATConfig, dict, list | None]:
    """(config, state_dict, input shape or None) of a checkpoint, its hash checked."""
    if isinstance(ckpt, dict) and ckpt.get("format") == FORMAT:
        state = ckpt.get("state_dict")
        if not isinstance(state, Mapping):
            raise XQATError(f"checkpoint {path} has no state_dict; save it with xqat.save_qat")
        want = ckpt.get("sha256")
        if want is None:
            warnings.warn(f"checkpoint {path} has no content hash (saved by an older xqat), so damage cannot be "
                          "detected; save it again with xqat.save_qat", stacklevel=3)
        elif want != state_hash(state):
            raise XQATError(f"checkpoint {path} is damaged: its tensors do not match the content hash stored at "
                            "save time (bit flips, partial copy or edited file); use an intact copy")
        fields = {f.name for f in dataclasses.fields(QATConfig)}
        config = ckpt.get("config") or {}
        if not isinstance(config, Mapping):
            raise XQATError(f"checkpoint {path}: 'config' is a {type(config).__name__}, not QATConfig fields")
        unknown = sorted(set(config) - fields)
        if unknown:
            raise XQATError(f"checkpoint {path} has unknown QATConfig keys {unknown[:3]}; was it saved by a newer "
                            "xqat, or edited?")
        try:
            cfg = QATConfig(**config)
        except (TypeError, ValueError) as e:
            raise XQATError(f"checkpoint {path} holds an invalid QATConfig: {e}") from e
        return cfg, dict(state), ckpt.get("input_shape")
    if not isinstance(ckpt, Mapping) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()) or not ckpt:
        raise XQATError(f"checkpoint {path} holds no state_dict (neither an xqat.save_qat file nor a "
                        "name -> tensor mapping); save it with xqat.save_qat")
    return QATConfig(), dict(ckpt), None


def _input_shape(path: Path, shape) -> tuple[int, ...]:
    if shape is None:
        raise XQATError(f"checkpoint {path} does not record the input shape: pass --input-shape N,C,H,W")
    try:
        shape = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        raise XQATError(f"checkpoint {path} records an invalid input shape {shape!r}") from None
    if not shape or any(d < 1 for d in shape) or math.prod(shape) > MAX_EXAMPLE_ELEMENTS:
        raise XQATError(f"input shape {list(shape)} must have positive dimensions and at most "
                        f"{MAX_EXAMPLE_ELEMENTS:,} elements")
    return shape


def load_qat(factory: str | Callable[[], nn.Module], checkpoint: str | os.PathLike,
             input_shape: tuple[int, ...] | None = None) -> tuple[nn.Module, tuple[int, ...]]:
    """Rebuild a trained QAT model: float model from the factory (MODULE:FUNCTION or the callable itself),
    prepare_qat, then the checkpoint's state."""
    path = Path(checkpoint)
    config, state, saved_shape = _unpack(path, _read_checkpoint(path))
    input_shape = _input_shape(path, input_shape or saved_shape)
    build = load_factory(factory) if isinstance(factory, str) else factory
    factory = factory if isinstance(factory, str) else f"{build.__module__}:{build.__qualname__}"
    try:
        float_model = build()
    except XQATError:
        raise
    except Exception as e:  # the user's factory: wrong signature, or its own error
        raise XQATError(f"calling the model factory {factory!r} failed ({type(e).__name__}: {e}); it must build "
                        "the float model without arguments") from e
    if not isinstance(float_model, nn.Module):
        raise XQATError(f"the factory {factory!r} returned {type(float_model).__name__}, not an nn.Module")
    qat = prepare_qat(float_model.eval(), torch.zeros(input_shape), config)
    ours = qat.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs model {tuple(ours[k].shape)}" for k, v in state.items()
             if k in ours and isinstance(v, torch.Tensor) and v.shape != ours[k].shape]
    if wrong:
        raise XQATError(f"checkpoint {path} does not fit the model from {factory!r}: tensor shapes differ "
                        f"({'; '.join(wrong[:3])}); another class count or width?")
    missing, unexpected = qat.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise XQATError(f"checkpoint {path} does not fit the model from {factory!r}: missing keys {missing[:5]}, "
                        f"unexpected keys {unexpected[:5]}")
    return qat.eval(), tuple(input_shape)
