"""Static EdgeTPU readiness check of a .tflite file: what compiler 16 would reject or leave on the CPU.

The compiler cannot be installed here, so `check_edgetpu` reproduces its decisions from the flatbuffer (op
codes and versions from the file, tensor dtypes, quantization, shapes, options) using the rule table of
`edgetpu_rules` (edgetpu-readiness.md §5), and estimates the single TPU segment (§5 P1).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..table import format_table
from ..tflite.model import TFLiteModel, TFLiteOp, read_tflite
from ..tflite.validate import validate_model
from .rules import CPU, FAIL, MODEL_RULES, OP_RULES, WARN, is_boundary_op

__all__ = ["Finding", "EdgeTPUReport", "check_edgetpu", "op_macs"]

_LEVEL_ORDER = {FAIL: 0, CPU: 1, WARN: 2}


@dataclass(frozen=True)
class Finding:
    """One broken rule: level FAIL | CPU | WARN, checklist code (§5), the op (None: whole model), what, fix."""

    level: str
    code: str
    op_index: int | None
    op_name: str | None
    message: str
    fix: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EdgeTPUReport:
    """Findings plus the mapped-prefix estimate: ops before `first_cpu_op` form the one TPU segment (§5 P1)."""

    source: str
    num_ops: int
    findings: list[Finding] = field(default_factory=list)
    first_cpu_op: int | None = None  # index of the first op that leaves the TPU; None: every op maps
    first_cpu_op_name: str | None = None
    mapped_op_share: float = 1.0  # share of ops before first_cpu_op
    mapped_mac_share: float | None = 1.0  # share of MACs before first_cpu_op; None when the model has no MACs
    total_macs: int = 0
    param_bytes: int = 0

    @property
    def ok(self) -> bool:
        """No FAIL finding: the compiler is expected to accept the model (parts may still run on the CPU)."""
        return not any(f.level == FAIL for f in self.findings)

    @property
    def fully_mapped(self) -> bool:
        """No FAIL and no CPU finding: every op is expected on the EdgeTPU."""
        return not any(f.level in (FAIL, CPU) for f in self.findings)

    def by_level(self, level: str) -> list[Finding]:
        return [f for f in self.findings if f.level == level]

    def codes(self, level: str | None = None) -> set[str]:
        """Checklist codes found (at `level` if given), e.g. {"F5", "O2"}."""
        return {f.code for f in self.findings if level is None or f.level == level}

    def summary(self) -> str:
        counts = ", ".join(f"{len(self.by_level(lv))} {lv}" for lv in (FAIL, CPU, WARN))
        verdict = "FULLY MAPPED" if self.fully_mapped else ("OK (partly on the CPU)" if self.ok else "FAIL")
        if self.first_cpu_op is None:
            prefix = f"all {self.num_ops} ops on the EdgeTPU"
        else:
            macs = "n/a" if self.mapped_mac_share is None else f"{self.mapped_mac_share:.0%}"
            prefix = (f"TPU segment ends at op {self.first_cpu_op} {self.first_cpu_op_name}: "
                      f"{self.mapped_op_share:.0%} of ops, {macs} of MACs before it")
        return f"EdgeTPU readiness of {self.source}: {verdict} ({counts}); {prefix}"

    def table(self) -> str:
        """Summary line, findings table and one fix hint per code, for the CLI and logs."""
        lines = [self.summary()]
        if not self.findings:
            return "\n".join(lines + ["no findings"])
        rows = [(f.level, f.code, "-" if f.op_index is None else f.op_index, f.op_name or "(model)", f.message)
                for f in self.findings]
        lines += ["", format_table(["level", "code", "op", "name", "message"], rows)]
        fixes: dict[tuple[str, str], None] = {}
        for f in self.findings:
            fixes.setdefault((f.code, f.fix), None)
        lines += ["", "How to fix:"] + [f"  {code}: {fix}" for code, fix in fixes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source, "ok": self.ok, "fully_mapped": self.fully_mapped, "num_ops": self.num_ops,
            "first_cpu_op": self.first_cpu_op, "first_cpu_op_name": self.first_cpu_op_name,
            "mapped_op_share": self.mapped_op_share, "mapped_mac_share": self.mapped_mac_share,
            "total_macs": self.total_macs, "param_bytes": self.param_bytes,
            "counts": {lv: len(self.by_level(lv)) for lv in (FAIL, CPU, WARN)},
            "findings": [f.to_dict() for f in self.findings],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


def op_macs(m: TFLiteModel, op: TFLiteOp) -> int:
    """Multiply-accumulates of conv-like ops (0 for the rest), for the MAC share of the TPU segment."""
    def shape(k: int) -> tuple[int, ...]:
        return m.tensors[k].shape if 0 <= k < len(m.tensors) else ()

    if not op.outputs:
        return 0
    out = shape(op.outputs[0])
    n_out = math.prod(out) if out else 0  # Python ints: a large model's total must not wrap around
    w = shape(op.inputs[1]) if len(op.inputs) > 1 else ()
    if op.name == "CONV_2D" and len(w) == 4:
        return n_out * w[1] * w[2] * w[3]
    if op.name == "DEPTHWISE_CONV_2D" and len(w) == 4:
        return n_out * w[1] * w[2]
    if op.name == "FULLY_CONNECTED" and len(w) == 2:
        return n_out * w[1]
    if op.name == "TRANSPOSE_CONV" and len(w) == 4 and len(op.inputs) > 2:
        return math.prod(shape(op.inputs[2])) * w[0] * w[1] * w[2]
    return 0


def check_edgetpu(model: str | Path | bytes | TFLiteModel) -> EdgeTPUReport:
    """Check a .tflite model against EdgeTPU compiler 16 (§5); a missing or corrupt file raises
    TFLiteFileError (checklist F1), and so does a structurally invalid one (the runtime would refuse it)."""
    m = validate_model(model if isinstance(model, TFLiteModel) else read_tflite(model))
    findings = [Finding(r.level, r.code, None, None, msg, r.fix) for r in MODEL_RULES
                if (msg := r.check(m)) is not None]
    first_cpu: TFLiteOp | None = None
    for op in m.ops:
        op_findings = [Finding(r.level, r.code, op.index, op.name, msg, r.fix) for r in OP_RULES
                       if r.applies(op) and (msg := r.check(m, op)) is not None]
        findings += op_findings
        leaves = any(f.level in (FAIL, CPU) for f in op_findings) and not is_boundary_op(m, op)
        if first_cpu is None and leaves:
            first_cpu = op
    findings.sort(key=lambda f: (-1 if f.op_index is None else f.op_index, _LEVEL_ORDER[f.level], f.code))

    macs = [op_macs(m, op) for op in m.ops]
    total = sum(macs)
    cut = len(m.ops) if first_cpu is None else first_cpu.index
    return EdgeTPUReport(
        source=m.source, num_ops=len(m.ops), findings=findings,
        first_cpu_op=None if first_cpu is None else first_cpu.index,
        first_cpu_op_name=None if first_cpu is None else first_cpu.name,
        mapped_op_share=cut / len(m.ops) if m.ops else 1.0,
        mapped_mac_share=sum(macs[:cut]) / total if total else None,
        total_macs=total,
        param_bytes=sum(t.data.nbytes for t in m.tensors if t.is_constant),
    )
