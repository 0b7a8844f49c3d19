"""The torch <-> TFLite mapping a .tflite carries (metadata entry 'xqat'): every fake-quant point of the QAT
model in graph order with its TFLite tensor, which points are the model's inputs and outputs, the I/O type and
the input shapes. The exporter writes it; parity and emulation read it, so nothing matches tensors by name.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import TFLiteFileError
from .metadata import XQAT_KEY, read_metadata, with_metadata
from .qtypes import IO_DTYPES

__all__ = ["MAPPING_FORMAT", "MAPPING_VERSION", "MappedPoint", "TFLiteMapping", "read_mapping", "write_mapping"]

MAPPING_FORMAT = "xqat-mapping"
MAPPING_VERSION = 2  # 1: {"format": "xqat-mapping-v1", points [{key, tensor}], labels, input_point, output_point}


@dataclass(frozen=True)
class MappedPoint:
    """One fake-quant point: its key in the QAT model's `xqat_points`, its TFLite tensor, label and range group."""

    key: str
    tensor: int | None  # TFLite tensor index; None if the export could not locate it (non-strict export)
    label: str  # torch op label (module path)
    group: str  # range group (key in `xqat_quantizers`)


@dataclass(frozen=True)
class TFLiteMapping:
    """What a .tflite says about the QAT model it was exported from."""

    points: tuple[MappedPoint, ...]  # graph (execution) order
    input_points: tuple[str, ...]  # point key on each model input, in input order
    output_points: tuple[str, ...]  # point key on each model output, in output order
    io_dtype: str  # "int8" | "uint8" | "float32"
    input_shapes: tuple[tuple[int, ...], ...]  # NCHW (torch) shape of each input at export
    sequence_layout: bool = False  # 3-D tensors are in torch's (N, T, F) order, not channels-last (no Conv1d)

    def __post_init__(self) -> None:
        keys = [p.key for p in self.points]
        problems = []
        if len(set(keys)) != len(keys):
            problems.append("a point key appears twice")
        unknown = [k for k in self.input_points + self.output_points if k not in keys]
        if unknown:
            problems.append(f"input/output points {unknown[:3]} are not among its points")
        if self.io_dtype not in IO_DTYPES:
            problems.append(f"io_dtype {self.io_dtype!r} is not one of {IO_DTYPES}")
        if len(self.input_shapes) != len(self.input_points):
            problems.append(f"{len(self.input_shapes)} input shapes for {len(self.input_points)} input points")
        if problems:
            raise TFLiteFileError(f"invalid xqat mapping: {'; '.join(problems)}; re-export the model")

    def point(self, key: str) -> MappedPoint:
        """The point stored under `key`."""
        for p in self.points:
            if p.key == key:
                return p
        raise TFLiteFileError(f"the xqat mapping has no fake-quant point '{key}'")

    def to_dict(self) -> dict[str, Any]:
        return {"format": MAPPING_FORMAT, "version": MAPPING_VERSION, **asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: Any, where: str = "the mapping") -> TFLiteMapping:
        """Parse a stored mapping (this version or version 1); TFLiteFileError naming `where` if it is not one."""
        if not isinstance(d, dict):
            raise TFLiteFileError(f"{where}: the xqat mapping is not a JSON object; re-export the model")
        try:
            if d.get("format") == "xqat-mapping-v1":
                return cls._from_v1(d)
            if d.get("format") != MAPPING_FORMAT or d.get("version") != MAPPING_VERSION:
                raise TFLiteFileError(
                    f"{where}: xqat mapping format {d.get('format')!r} version {d.get('version')!r} is not "
                    f"{MAPPING_FORMAT!r} version {MAPPING_VERSION}: re-export it with this xqat")
            return cls(tuple(MappedPoint(str(p["key"]), None if p["tensor"] is None else int(p["tensor"]),
                                         str(p["label"]), str(p["group"])) for p in d["points"]),
                       tuple(d["input_points"]), tuple(d["output_points"]), str(d["io_dtype"]),
                       tuple(tuple(int(n) for n in s) for s in d["input_shapes"]),
                       bool(d.get("sequence_layout", False)))
        except (KeyError, TypeError, ValueError) as e:
            raise TFLiteFileError(f"{where}: the xqat mapping is incomplete or malformed ({type(e).__name__}: {e}); "
                                  "re-export the model") from e

    @classmethod
    def _from_v1(cls, d: dict) -> TFLiteMapping:
        labels = d["labels"]
        return cls(tuple(MappedPoint(p["key"], int(p["tensor"]), labels[p["key"]], "") for p in d["points"]),
                   (d["input_point"],), (d["output_point"],), d["io_dtype"], (tuple(d["input_shape"]),))

    @classmethod
    def from_json(cls, text: str, where: str = "the mapping") -> TFLiteMapping:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise TFLiteFileError(f"{where}: the xqat mapping is not valid JSON ({e}); re-export the model") from e
        return cls.from_dict(d, where)


def write_mapping(tflite: bytes, mapping: TFLiteMapping) -> bytes:
    """A copy of the .tflite carrying `mapping` as its 'xqat' metadata."""
    return with_metadata(tflite, XQAT_KEY, mapping.to_dict())


def read_mapping(tflite: bytes, where: str = "the .tflite") -> TFLiteMapping:
    """The mapping a .tflite carries; TFLiteFileError naming `where` if it has none or an unreadable one."""
    d = read_metadata(tflite, XQAT_KEY)
    if d is None:
        raise TFLiteFileError(f"{where} carries no xqat mapping (torch point -> TFLite tensor): export it with "
                              "xqat.export_tflite / `xqat export`")
    return TFLiteMapping.from_dict(d, where)
