"""Degenerate grids in an export: activation scales so large that the tensor's values can only land on a
couple of int8 codes. One absurd calibration batch (a 1e30 glitch) does this silently: the export verifies
(torch and TFLite agree on the useless grid) and the model outputs constants. Used by ExportReport.problems.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["grid_problems", "MAX_ACTIVATION_SCALE", "MAX_SCALE_RATIO"]

# An int8 activation grid this coarse spans more than +-1e6: no trained network computes such values.
MAX_ACTIVATION_SCALE = 1e4
# A grid this much coarser than the model's typical activation grid leaves its tensor a couple of codes.
MAX_SCALE_RATIO = 1e4


def grid_problems(rows: Sequence) -> list[str]:
    """One line per activation whose scale is absurd, absolutely or relative to the model's median activation
    scale. `rows`: the report's TensorRow list (kind, torch_name, torch_scale)."""
    acts = [(r.torch_name, float(r.torch_scale[0])) for r in rows if r.kind == "activation" and r.torch_scale]
    if not acts:
        return []
    median = float(np.median([s for _, s in acts]))
    out = []
    for name, s in acts:
        if not np.isfinite(s) or s > MAX_ACTIVATION_SCALE or (median > 0 and s > MAX_SCALE_RATIO * median):
            out.append(f"activation '{name}': degenerate grid, scale {s:.3g} (median of the model {median:.3g}); "
                       "its values fall into a couple of int8 codes. An absurd calibration batch moved its range: "
                       "recalibrate on clean data (QATConfig.range_outliers='skip' leaves such batches out)")
    return out
