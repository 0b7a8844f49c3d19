"""What `edgetpu_compiler` actually did to a model, read from its output, next to what `check_edgetpu` predicts.

The compiler replaces the ops it maps by one `edgetpu-custom-op` and leaves every other op, unchanged and in
order, for the CPU. So the CPU ops of a compiled file are its ops other than that custom op, and the mapped share
is the rest of the original model's ops (docs/edgetpu.md, "Evidence from compiled pairs").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..tflite.model import TFLiteModel, read_tflite
from .check import EdgeTPUReport, check_edgetpu

__all__ = ["EDGETPU_OP", "CompilerComparison", "compiled_cpu_ops", "compare_with_compiled"]

EDGETPU_OP = "CUSTOM:edgetpu-custom-op"


def compiled_cpu_ops(compiled: str | Path | bytes | TFLiteModel) -> list[str]:
    """Names of the ops the compiler left for the CPU, in execution order."""
    m = compiled if isinstance(compiled, TFLiteModel) else read_tflite(compiled)
    return [op.name for op in m.ops if op.name != EDGETPU_OP]


@dataclass(frozen=True)
class CompilerComparison:
    """Predicted (checker) and actual (compiler) CPU ops and mapped share of one model."""

    name: str
    num_ops: int
    report: EdgeTPUReport
    predicted_cpu: tuple[str, ...]
    actual_cpu: tuple[str, ...]

    @property
    def predicted_share(self) -> float:
        return self.report.mapped_op_share

    @property
    def actual_share(self) -> float:
        return (self.num_ops - len(self.actual_cpu)) / self.num_ops if self.num_ops else 1.0

    @property
    def agrees(self) -> bool:
        """The compiler compiled it, so the checker must say `ok`, and both name the same CPU ops in order."""
        return self.report.ok and self.predicted_cpu == self.actual_cpu


def compare_with_compiled(model: str | Path, compiled: str | Path) -> CompilerComparison:
    """Run the checker on `model` and read what the compiler made of it from `compiled` (X_edgetpu.tflite)."""
    m = read_tflite(model)
    report = check_edgetpu(m)
    return CompilerComparison(
        name=Path(model).stem, num_ops=len(m.ops), report=report,
        predicted_cpu=tuple(m.ops[i].name for i in report.cpu_ops),
        actual_cpu=tuple(compiled_cpu_ops(compiled)),
    )
