"""Named metadata entries inside a .tflite flatbuffer (Model.metadata), so a model carries xqat's
torch<->TFLite tensor mapping with it. Op and tensor indices are untouched; the result is deterministic."""

from __future__ import annotations

import json

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema

from ..errors import TFLiteFileError

__all__ = ["with_metadata", "read_metadata", "XQAT_KEY"]

XQAT_KEY = "xqat"


def with_metadata(tflite: bytes, name: str, value: dict) -> bytes:
    """A copy of the model with metadata entry `name` set to `value` as JSON (replacing an old one)."""
    model = schema.ModelT.InitFromPackedBuf(tflite, 0)
    model.metadata = [m for m in (model.metadata or []) if _name(m) != name]
    buf = schema.BufferT()
    buf.data = np.frombuffer(json.dumps(value, sort_keys=True).encode(), np.uint8)
    model.buffers.append(buf)
    entry = schema.MetadataT()
    entry.name = name
    entry.buffer = len(model.buffers) - 1
    model.metadata.append(entry)
    builder = flatbuffers.Builder(len(tflite) + 4096)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def read_metadata(tflite: bytes, name: str) -> dict | None:
    """The JSON metadata entry `name` of a model, or None if it has none."""
    try:
        model = schema.Model.GetRootAs(tflite, 0)
        for i in range(model.MetadataLength()):
            m = model.Metadata(i)
            if m.Name().decode() == name:
                return json.loads(model.Buffers(m.Buffer()).DataAsNumpy().tobytes().decode())
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, IndexError) as e:
        raise TFLiteFileError(f"the .tflite's '{name}' metadata is unreadable ({e}); re-export the model") from e
    return None


def _name(m) -> str:
    return m.name.decode() if isinstance(m.name, bytes) else str(m.name)
