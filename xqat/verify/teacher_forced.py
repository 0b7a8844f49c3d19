"""Run a QAT model with every fake-quant point's output recorded, optionally teacher-forced: after each point
torch's own output is recorded and another tensor (the interpreter's, dequantized) is passed on instead, so
every layer sees the device's own inputs and a mismatch there is that layer's own (local parity).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import fx, nn

from ..torch_side.point_hooks import HOOKS, point_hooks
from ..torch_side.prepare import POINTS

__all__ = ["run_recording"]

# key, torch's own output at that point -> the tensor to pass on (None: pass torch's own on)
Teacher = Callable[[str, torch.Tensor], "torch.Tensor | None"]


class _Recorder(fx.Interpreter):
    def __init__(self, model: fx.GraphModule, keys: set[str], teacher: Teacher | None):
        super().__init__(model)
        self.keys, self.teacher, self.own = keys, teacher, {}
        self.hooked = set(point_hooks(model))

    def call_module(self, target, args, kwargs):
        out = super().call_module(target, args, kwargs)
        name = str(target)
        key = name[len(POINTS) + 1:] if name.startswith(POINTS + ".") else None
        if key in self.hooked:  # exact numerics: the point's hook that follows gives its value
            return out
        if key is None and name.startswith(HOOKS + "."):
            key = name[len(HOOKS) + 1:]
        if key is None or key not in self.keys:
            return out
        self.own[key] = out.clone()  # an in-place op downstream (torchvision's Hardswish(inplace=True)) must not
        # change the recorded value
        forced = self.teacher(key, out) if self.teacher is not None else None
        return out if forced is None else forced.to(dtype=out.dtype, device=out.device)


@torch.no_grad()
def run_recording(model: nn.Module, xs: Sequence[torch.Tensor], keys: set[str],
                  teacher: Teacher | None = None) -> dict[str, torch.Tensor]:
    """The output of every point in `keys` for inputs `xs`, the QAT model in eval mode (restored after).
    With `teacher`, each recorded point passes on what `teacher` returns (teacher-forced run)."""
    was_training = model.training
    model.eval()
    param = next(iter(model.parameters()), None)
    try:
        rec = _Recorder(model, keys, teacher)
        rec.run(*[x.to(param.device) if param is not None else x for x in xs])
        return rec.own
    finally:
        model.train(was_training)
