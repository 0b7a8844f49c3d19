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
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

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


# -- small nets of the classes detectors, segmenters and sequence models use -----------------------------------
class SmallUNet(nn.Module):
    """U-Net with skip concats: conv blocks, max-pool down, nearest-upsample and transposed-conv up."""

    def __init__(self, num_classes: int = 4, width: int = 8) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        w = width
        self.enc1, self.enc2, self.mid = block(3, w), block(w, 2 * w), block(2 * w, 4 * w)
        self.pool = nn.MaxPool2d(2)
        self.up2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2)
        self.dec2 = block(4 * w, 2 * w)
        self.up1 = nn.Upsample(scale_factor=2, mode="nearest")
        self.dec1 = block(3 * w, w)
        self.head = nn.Conv2d(w, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        m = self.mid(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return self.head(d1)


class KeywordSpotter(nn.Module):
    """Conv1d + BN + ReLU over (batch, features, time), global average pool over time, Linear head."""

    def __init__(self, features: int = 10, num_classes: int = 6) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv1d(features, 16, 5, padding=2, bias=False), nn.BatchNorm1d(16), nn.ReLU(),
            nn.Conv1d(16, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm1d(16), nn.ReLU())
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).mean(-1))


class TwoInTwoOut(nn.Module):
    """Two image inputs fused by an add, two heads: class logits and a bilinear-upsampled map."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU())
        self.mix = nn.Sequential(nn.Conv2d(8, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU6())
        self.cls = nn.Linear(16, num_classes)
        self.seg = nn.Conv2d(16, 2, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.mix(self.a(x) + self.b(y))
        logits = self.cls(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))
        mask = F.interpolate(self.seg(h), scale_factor=2, mode="bilinear", align_corners=False)
        return logits, mask


class SSDLiteHead(nn.Module):
    """torchvision ssdlite320_mobilenet_v3_large without anchors decoding or NMS (those stay float
    post-processing, as on Coral): backbone feature maps -> box regression and class logits."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        tv = import_torchvision()
        det = tv.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                num_classes=num_classes)
        self.backbone, self.head = det.backbone, det.head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.head(list(self.backbone(x).values()))
        return out["bbox_regression"], out["cls_logits"]


# -- the zoo: what benchmarks/model_zoo.py and tests/test_model_zoo.py run --------------------------------------
@dataclass(frozen=True)
class ZooModel:
    """One architecture of the coverage table: how to build it and what it is expected to do."""

    name: str
    build: Callable[[], nn.Module]
    edgetpu: bool = False  # an EdgeTPU-friendly family: must also export with edgetpu=True, fully mapped
    inputs: int = 1  # image inputs, all of the same shape
    sequence: bool = False  # (batch, features, time) instead of images: `size` is the sequence length
    channels: int = 3

    def example(self, size: tuple[int, int], batch: int = 1, seed: int = 0) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(seed)
        shape = (batch, self.channels, size[1]) if self.sequence else (batch, self.channels, *size)
        return tuple(torch.rand(shape, generator=g) for _ in range(self.inputs))


def _tv(name: str, **kw) -> Callable[[], nn.Module]:
    return lambda: torchvision_model(name, num_classes=10, **kw)


def _timm(name: str) -> Callable[[], nn.Module]:
    return lambda: timm_model(name, num_classes=10)


def _lraspp() -> nn.Module:
    tv = import_torchvision()
    return tv.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=4)


ZOO: tuple[ZooModel, ...] = (
    ZooModel("mobilenet_v2", _tv("mobilenet_v2"), edgetpu=True),
    ZooModel("mobilenet_v3_small", _tv("mobilenet_v3_small")),
    ZooModel("mobilenet_v3_large", _tv("mobilenet_v3_large")),
    ZooModel("resnet18", _tv("resnet18"), edgetpu=True),
    ZooModel("resnet50", _tv("resnet50"), edgetpu=True),
    ZooModel("efficientnet_b0", _tv("efficientnet_b0")),
    ZooModel("shufflenet_v2_x0_5", _tv("shufflenet_v2_x0_5")),
    ZooModel("regnet_x_400mf", _tv("regnet_x_400mf")),
    ZooModel("vgg11_bn", _tv("vgg11_bn")),
    ZooModel("squeezenet1_1", _tv("squeezenet1_1")),
    ZooModel("mnasnet0_5", _tv("mnasnet0_5")),
    ZooModel("timm/efficientnet_lite0", _timm("efficientnet_lite0"), edgetpu=True),
    ZooModel("timm/tf_efficientnet_lite0", _timm("tf_efficientnet_lite0"), edgetpu=True),
    ZooModel("timm/mobilenetv3_large_100", _timm("mobilenetv3_large_100")),
    ZooModel("timm/mobilenet_edgetpu_100", _timm("mobilenet_edgetpu_100"), edgetpu=True),
    ZooModel("timm/efficientnet_es", _timm("efficientnet_es"), edgetpu=True),
    ZooModel("timm/resnet18d", _timm("resnet18d"), edgetpu=True),
    ZooModel("ssdlite320_mobilenet_v3_large (backbone+head)", SSDLiteHead),
    ZooModel("lraspp_mobilenet_v3_large", _lraspp),
    ZooModel("small U-Net", SmallUNet, edgetpu=True),
    ZooModel("two inputs, two outputs", TwoInTwoOut, inputs=2),
    ZooModel("keyword spotter (Conv1d)", KeywordSpotter, sequence=True, channels=10),
)


def _vgg11_bn_narrow_classifier() -> nn.Module:
    """torchvision vgg11_bn with its classifier's 4096-wide layers cut to 256: the same classes of layers (the
    2x2 -> 7x7 adaptive pool at 64 px, flatten, Linear, ReLU, Dropout) at a fraction of the memory. The full
    model's export peaks at ~20 GB (the TFLite converter on its 25088x4096 Linear), too close to the CI
    machine's 24 GB; the benchmark (docs/model-zoo.md) runs the full model."""
    m = torchvision_model("vgg11_bn", num_classes=10)
    m.classifier[0], m.classifier[3], m.classifier[6] = nn.Linear(512 * 7 * 7, 256), nn.Linear(256, 256), \
        nn.Linear(256, 10)
    return m


# What the zoo test runs in place of a zoo entry too heavy for the CI machine (the benchmark runs the entry itself)
TEST_STAND_INS: dict[str, ZooModel] = {
    "vgg11_bn": ZooModel("vgg11_bn (256-wide classifier)", _vgg11_bn_narrow_classifier),
}


def zoo_model(name: str) -> ZooModel:
    """The zoo entry called `name`."""
    for m in ZOO:
        if m.name == name:
            return m
    raise KeyError(f"no zoo model {name!r}; known: {[m.name for m in ZOO]}")
