"""Exact numerics: a QAT model whose forward computes, bit for bit, the integer model export would produce for a
TFLite backend at that moment, in eval and in training, with the "tf" path's straight-through gradients
(docs/numerics.md#exact-training-numerics, docs/architecture.md).

`set_numerics(model, "xnnpack")` installs one `ExactPoint` hook after every fake-quant point (torch_side's point
hook seam); `set_numerics(model, "tf")` removes them. The kernels are the integer emulator's (`emulate/kernels`),
built from one-op TFLite models synthesized from the layers' current weights and grids.
"""

from __future__ import annotations

from torch import nn

from ...torch_side.config import NUMERICS, QATConfig, check_numerics
from ...torch_side.point_hooks import attach_point_hooks, detach_point_hooks, point_hooks
from ...torch_side.prepare import point_module, qat_config, require_qat_model
from ...torch_side.prepare import prepare_qat as _prepare_qat
from .layers import plan_layers

__all__ = ["set_numerics", "numerics", "prepare_qat", "NUMERICS"]

# The kernels (`.hook`: emulate, the flatbuffer schema, onnx via export) load on the first exact model only, so
# `xqat.prepare_qat` in "tf" numerics costs no more imports than torch_side's.


def numerics(model: nn.Module) -> str:
    """The numerics a QAT model computes now: "tf" or a TFLite backend name."""
    require_qat_model(model, "read its numerics")
    hooks = point_hooks(model)
    if not hooks:
        return "tf"
    from .hook import ExactPoint

    exact = [h for h in hooks.values() if isinstance(h, ExactPoint)]
    return exact[0].backend if exact else "tf"


def set_numerics(model: nn.Module, name: str) -> nn.Module:
    """Switch a QAT model (in place) to "tf" (TF's fake quant) or to a backend's exact integer numerics
    ("xnnpack", "builtin", "reference"); returns the model. Raises QATConfigError for another name and
    UnsupportedLayerError naming every layer that cannot be computed exactly. state_dict is not affected;
    the model's QATConfig records the choice (so save_qat / load_qat keep it)."""
    require_qat_model(model, "set its numerics")
    check_numerics(name)
    if name == "tf":
        detach_point_hooks(model)
    else:
        from .hook import ExactPoint

        detach_point_hooks(model)  # plan on the plain graph
        layers = plan_layers(model)
        hooks = {key: (ExactPoint(name, layer, point_module(model, key),
                                  [point_module(model, k) for k in layer.inputs]), layer.nodes)
                 for key, layer in layers.items()}
        for key, layer in layers.items():  # each hook reads its inputs' codes from the hooks that made them
            hooks[key][0].producers[:] = [hooks[k][0] for k in layer.inputs]
        attach_point_hooks(model, hooks)
    qat_config(model).numerics = name
    return model


def prepare_qat(model: nn.Module, example_inputs, config: QATConfig | None = None) -> nn.Module:
    """`xqat.prepare_qat`: torch_side's prepare_qat, then `config.numerics` applied (set_numerics)."""
    gm = _prepare_qat(model, example_inputs, config)
    name = qat_config(gm).numerics
    return set_numerics(gm, name) if name != "tf" else gm
