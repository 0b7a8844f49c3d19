"""Snapping: each learned activation range rewritten so TF's nudge and the TFLite converter derive the same
grid (docs/numerics.md, converter qparams & snapping). The export always ships snapped grids; whether the
user's model is snapped too is the caller's choice (`snap_ranges`, `export_tflite(..., snap_model=True)`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..torch_side.prepare import QUANTIZERS, quant_points, require_qat_model

__all__ = ["SnapRecord", "labels_by_group", "planned_snaps", "snap_ranges"]


@dataclass(frozen=True)
class SnapRecord:
    """One learned range whose deployable form differs from the stored one."""

    group: str
    labels: tuple[str, ...]
    old_range: tuple[float, float]
    new_range: tuple[float, float]
    converter_disagreed: bool  # the learned range would have given the converter another zero point
    scale_moved_ulps: int  # the TF grid itself moved (rare; the simulation of a snapped model moves with it)

    @property
    def delta(self) -> float:
        """Largest change of either end of the range."""
        return max(abs(self.new_range[0] - self.old_range[0]), abs(self.new_range[1] - self.old_range[1]))

    @property
    def notable(self) -> bool:
        """More than a rewrite of the same grid: the converter alone would have chosen another grid, the
        grid's scale moved, or an all-zero range got a deployable grid."""
        return self.converter_disagreed or bool(self.scale_moved_ulps)


def labels_by_group(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Range group key -> the op labels of its fake-quant points, in graph order."""
    out: dict[str, list[str]] = {}
    for p in quant_points(model):
        out.setdefault(p.group, []).append(p.label)
    return {k: tuple(v) for k, v in out.items()}


def planned_snaps(model: nn.Module) -> list[SnapRecord]:
    """Every learned range of a QAT model whose deployable (snapped) form differs from its stored value;
    the model is not changed."""
    require_qat_model(model, "snap its ranges")
    labels = labels_by_group(model)
    records = []
    for key, q in getattr(model, QUANTIZERS).items():
        if q.fixed:
            continue
        old = (float(q.min.detach()), float(q.max.detach()))
        zero = old == (0.0, 0.0)  # an all-zero tensor: deployed on another grid (see ActivationQuantizer.snapped)
        r = q.snapped()
        if (r.min, r.max) != old:
            records.append(SnapRecord(key, labels.get(key, ()), old, (r.min, r.max), zero or r.converter_disagreed,
                                      r.scale_moved_ulps))
    return records


@torch.no_grad()
def snap_ranges(model: nn.Module) -> list[SnapRecord]:
    """Write the deployable range into every learned quantizer of a QAT model (in place); returns the changes.

    The new range keeps TF's grid (what training simulated) but is written so the converter derives the same
    (scale, zero point). Only the representation changes, unless the grid has no agreeing representation, in
    which case its scale moves by a few float32 ulps (`scale_moved_ulps`). Afterwards the model's simulation
    uses exactly the grids its exported .tflite holds.
    """
    records = planned_snaps(model)
    quantizers = getattr(model, QUANTIZERS)
    for r in records:
        q = quantizers[r.group]
        q.min.data.fill_(r.new_range[0])
        q.max.data.fill_(r.new_range[1])
    return records
