"""Static EdgeTPU readiness check of a .tflite file: what compiler 16 would refuse, and which ops it would map.

The compiler cannot be installed here, so `check_edgetpu` reproduces its decisions from the flatbuffer (op
codes and versions, tensor dtypes, quantization, shapes, options) with the rule tables of `rules`, then applies
the compiler's segment model: one TPU segment, starting at the first op that can map and ending at the next op
that cannot; everything outside it runs on the CPU (docs/edgetpu.md, "Segment model").
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
from .rules import CPU, FAIL, MODEL_RULES, OP_RULES, WARN

__all__ = ["Finding", "EdgeTPUReport", "check_edgetpu", "op_macs", "segment"]

_LEVEL_ORDER = {FAIL: 0, CPU: 1, WARN: 2}


@dataclass(frozen=True)
class Finding:
    """One broken rule: level FAIL | CPU | WARN, checklist code (docs/edgetpu.md), the op (None: whole model),
    what is wrong, and the fix."""

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
    """Findings plus the segment model: ops `segment_start` .. `first_cpu_op` - 1 form the one TPU segment,
    every other op (`cpu_ops`) runs on the CPU."""

    source: str
    num_ops: int
    findings: list[Finding] = field(default_factory=list)
    first_cpu_op: int | None = None  # the op that ends the TPU segment; None: the segment runs to the last op
    first_cpu_op_name: str | None = None
    mapped_op_share: float = 1.0  # share of ops inside the TPU segment
    mapped_mac_share: float | None = 1.0  # share of MACs inside the TPU segment; None when the model has no MACs
    total_macs: int = 0
    param_bytes: int = 0
    segment_start: int | None = 0  # first op of the TPU segment; None when no op can map
    cpu_ops: tuple[int, ...] = ()  # every op outside the segment: leading ones, the one that ends it, the rest
    segment_end_reason: str | None = None  # why `first_cpu_op` cannot map (its first FAIL/CPU finding)

    @property
    def ok(self) -> bool:
        """No FAIL finding: the compiler is expected to accept the model (parts may still run on the CPU)."""
        return not any(f.level == FAIL for f in self.findings)

    @property
    def fully_mapped(self) -> bool:
        """The model compiles and no op runs on the CPU."""
        return self.ok and not self.cpu_ops and self.segment_start is not None

    def by_level(self, level: str) -> list[Finding]:
        return [f for f in self.findings if f.level == level]

    def codes(self, level: str | None = None) -> set[str]:
        """Checklist codes found (at `level` if given), e.g. {"F5", "O2"}."""
        return {f.code for f in self.findings if level is None or f.level == level}

    def summary(self) -> str:
        counts = ", ".join(f"{len(self.by_level(lv))} {lv}" for lv in (FAIL, CPU, WARN))
        verdict = "FULLY MAPPED" if self.fully_mapped else ("OK (partly on the CPU)" if self.ok else "FAIL")
        return f"EdgeTPU readiness of {self.source}: {verdict} ({counts}); {self.segment_text()}"

    def segment_text(self) -> str:
        """Where the TPU segment starts and ends, and why it ends, in one line."""
        if self.segment_start is None:
            return f"no op maps: op {self.first_cpu_op} {self.first_cpu_op_name}: {self.segment_end_reason}"
        end = self.num_ops if self.first_cpu_op is None else self.first_cpu_op
        macs = "n/a" if self.mapped_mac_share is None else f"{self.mapped_mac_share:.0%}"
        text = (f"TPU segment ops {self.segment_start}-{end - 1} ({end - self.segment_start} of {self.num_ops} ops"
                f" = {self.mapped_op_share:.0%}, {macs} of MACs)")
        if self.segment_start:
            text += f", after {self.segment_start} leading CPU op(s)"
        if self.first_cpu_op is None:
            return text + ", to the last op"
        return text + (f"; it ends at op {self.first_cpu_op} {self.first_cpu_op_name}: {self.segment_end_reason}"
                       f"; {self.num_ops - self.first_cpu_op} op(s) from there on run on the CPU")

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
            "segment_start": self.segment_start, "segment_end_reason": self.segment_end_reason,
            "cpu_ops": list(self.cpu_ops),
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
    """Check a .tflite model against EdgeTPU compiler 16 (docs/edgetpu.md); a missing or corrupt file raises
    TFLiteFileError, and so does a structurally invalid one (the TFLite runtime would refuse it)."""
    m = validate_model(model if isinstance(model, TFLiteModel) else read_tflite(model))
    findings = [Finding(r.level, r.code, None, None, msg, r.fix) for r in MODEL_RULES
                if (msg := r.check(m)) is not None]
    blockers: dict[int, Finding] = {}  # op index -> its first FAIL/CPU finding: the op cannot map
    for op in m.ops:
        op_findings = [Finding(r.level, r.code, op.index, op.name, msg, r.fix) for r in OP_RULES
                       if r.applies(op) and (msg := r.check(m, op)) is not None]
        findings += op_findings
        stop = next((f for f in op_findings if f.level in (FAIL, CPU)), None)
        if stop is not None:
            blockers[op.index] = stop
    findings.sort(key=lambda f: (-1 if f.op_index is None else f.op_index, _LEVEL_ORDER[f.level], f.code))

    start, end = segment(len(m.ops), blockers)
    macs = [op_macs(m, op) for op in m.ops]
    total = sum(macs)
    first_cpu = 0 if start is None else (end if end < len(m.ops) else None)
    inside = range(0) if start is None else range(start, end)
    return EdgeTPUReport(
        source=m.source, num_ops=len(m.ops), findings=findings,
        first_cpu_op=first_cpu,
        first_cpu_op_name=None if first_cpu is None else m.ops[first_cpu].name,
        mapped_op_share=len(inside) / len(m.ops) if m.ops else 1.0,
        mapped_mac_share=sum(macs[i] for i in inside) / total if total else None,
        total_macs=total,
        param_bytes=sum(t.data.nbytes for t in m.tensors if t.is_constant),
        segment_start=start,
        cpu_ops=tuple(i for i in range(len(m.ops)) if i not in inside),
        segment_end_reason=None if first_cpu is None else blockers[first_cpu].message,
    )


def segment(num_ops: int, blockers: dict[int, Finding]) -> tuple[int | None, int]:
    """The compiler's one TPU segment over ops in execution order, as (start, end), end exclusive: it starts at
    the first op that can map (ops before it run on the CPU first) and ends at the next op that cannot; that op
    and every op after it run on the CPU. (None, 0) when no op can map; (0, 0) for a graph without ops."""
    start = next((i for i in range(num_ops) if i not in blockers), None if num_ops else 0)
    if start is None:
        return None, 0
    end = next((i for i in range(start, num_ops) if i in blockers), num_ops)
    return start, end
