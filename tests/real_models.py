"""Real architectures for tests and benchmarks: torchvision and timm model code, random init, never downloads.

torchvision on PyPI is built against CUDA torch. Beside xqat's pinned CPU torch its compiled extension
(`torchvision/_C.so`: nms, roi_align, deform_conv2d, ...) does not load, and `import torchvision` then dies
while registering fake/meta kernels for those ops ("operator torchvision::nms does not exist"). The model
code itself is pure Python and needs none of them. `import_torchvision()` first imports torchvision as it
is; only if that fails that way does it declare the schemas of torchvision's compiled ops (declarations
only: calling one raises "no kernel") and import again. Nothing is patched inside torchvision, and with a
torchvision whose extension loads (a matching CPU build) this is a plain import.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

import torch

# torchvision 0.28's operator schemas (torchvision/csrc/ops/*.cpp), declared so its Python registrations succeed
_TORCHVISION_OP_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "int sampling_ratio, bool aligned) -> Tensor",
    "qroi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "int sampling_ratio, bool aligned) -> Tensor",
    "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "SymInt batch_size, SymInt channels, SymInt height, SymInt width, int sampling_ratio, bool aligned) -> Tensor",
    "ps_roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "int sampling_ratio) -> (Tensor, Tensor)",
    "_ps_roi_align_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, int sampling_ratio, SymInt batch_size, SymInt channels, "
    "SymInt height, SymInt width) -> Tensor",
    "roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) "
    "-> (Tensor, Tensor)",
    "_roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width) -> Tensor",
    "ps_roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) "
    "-> (Tensor, Tensor)",
    "_ps_roi_pool_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, "
    "SymInt width) -> Tensor",
    "deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, SymInt stride_h, "
    "SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, SymInt dilation_w, SymInt groups, "
    "SymInt offset_groups, bool use_mask) -> Tensor",
    "_deform_conv2d_backward(Tensor grad, Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, "
    "SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, SymInt dilation_w, "
    "SymInt groups, SymInt offset_groups, bool use_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    "box_iou_rotated(Tensor boxes1, Tensor boxes2) -> Tensor",
)
_declarations: list[torch.library.Library] = []  # kept alive: a Library's definitions vanish with it


def import_torchvision() -> ModuleType:
    """`torchvision`, importable beside CPU torch even when its compiled extension cannot load (see above)."""
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as e:
        if "torchvision::" not in str(e) or "does not exist" not in str(e):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]  # the half-imported package
    lib = torch.library.Library("torchvision", "DEF")
    for schema in _TORCHVISION_OP_SCHEMAS:
        lib.define(schema)
    _declarations.append(lib)
    return importlib.import_module("torchvision")


def torchvision_model(name: str, **kwargs) -> torch.nn.Module:
    """A torchvision architecture by builder name (random init: weights=None), e.g. ("resnet18", num_classes=10)."""
    tv = import_torchvision()
    return tv.models.get_model(name, weights=None, **kwargs)


def timm_model(name: str, **kwargs) -> torch.nn.Module:
    """A timm architecture by name, random init (pretrained=False: nothing is downloaded)."""
    import_torchvision()  # timm imports torchvision
    import timm

    return timm.create_model(name, pretrained=False, **kwargs)
