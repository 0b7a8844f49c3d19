"""Tiny models, one per class of layers that real architectures use (torchvision / timm patterns written out
so the unit tests need neither package): pass-through regularisers, timm's functional layers and dynamic
SAME padding, squeeze-excitation with SiLU, MobileNetV3's hard swish and hard-sigmoid SE gate, upsampling
with skip concats, grouped convs and channel shuffle, RegNet's chain of grouped residual blocks, Conv1d, several
outputs, adaptive pooling with unequal windows, and the degenerate shapes of small inputs."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tests.models import randomize_bn


def conv_bn(cin, cout, k=3, stride=1, groups=1, act: type[nn.Module] | None = nn.ReLU, dim: int = 2):
    conv, bn = (nn.Conv2d, nn.BatchNorm2d) if dim == 2 else (nn.Conv1d, nn.BatchNorm1d)
    layers = [conv(cin, cout, k, stride, k // 2, groups=groups, bias=False), bn(cout)]
    return nn.Sequential(*layers, *([act()] if act is not None else []))


class DropPath(nn.Module):
    """timm's DropPath (stochastic depth per sample): identity in eval."""

    def __init__(self, p: float = 0.2):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class PassThroughNet(nn.Module):
    """conv -> BN -> Identity -> ReLU (timm), a DropPath residual, Dropout, flatten -> Dropout -> Linear head
    with a zero-initialised bias (torchvision classifiers)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.Identity(), nn.ReLU())
        self.block = conv_bn(8, 8, act=None)
        self.drop_path = DropPath(0.2)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(8, 10))
        nn.init.zeros_(self.head[3].bias)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.drop_path(self.block(x)))
        return self.head(self.drop(x))


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d: functional batch norm, a drop placeholder, then the activation."""

    def __init__(self, c: int):
        super().__init__(c)
        self.drop, self.act = nn.Identity(), nn.ReLU6()

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                         self.momentum, self.eps)
        return self.act(self.drop(x))


class Conv2dSame(nn.Conv2d):
    """timm's Conv2dSame: TF 'SAME' padding computed from the input's shape at run time."""

    def forward(self, x):
        ih, iw = x.size()[-2:]
        kh, kw = self.weight.shape[-2:]
        ph = max((math.ceil(ih / self.stride[0]) - 1) * self.stride[0] + kh - ih, 0)
        pw = max((math.ceil(iw / self.stride[1]) - 1) * self.stride[1] + kw - iw, 0)
        if ph > 0 or pw > 0:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, (0, 0), self.dilation, self.groups)


class Linear(nn.Linear):
    """timm's Linear: F.linear on its own parameters."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class TimmStyleNet(nn.Module):
    """Dynamic SAME padding (not fx-traceable symbolically), functional BN+act, functional linear."""

    def __init__(self):
        super().__init__()
        self.conv_stem = Conv2dSame(3, 8, 3, stride=2, bias=False)
        self.bn1 = BatchNormAct2d(8)
        self.dw = Conv2dSame(8, 8, 3, stride=2, groups=8, bias=False)
        self.bn2 = BatchNormAct2d(8)
        self.classifier = Linear(8, 10)

    def forward(self, x):
        x = self.bn2(self.dw(self.bn1(self.conv_stem(x))))
        return self.classifier(x.mean((2, 3)))


class SENet(nn.Module):
    """EfficientNet-style block: SiLU, squeeze-excitation gate (mean -> conv -> SiLU -> conv -> sigmoid -> mul)."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8, stride=2, act=nn.SiLU)
        self.reduce, self.expand = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.act = nn.SiLU()
        self.proj = conv_bn(8, 8, k=1, act=None)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        s = torch.sigmoid(self.expand(self.act(self.reduce(x.mean((2, 3), keepdim=True)))))
        x = self.proj(x * s)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class HardActivations(nn.Module):
    """Hardswish and Hardsigmoid as modules and as functions, on feature maps and after a global pool."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8, stride=2, act=nn.Hardswish)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.gate = nn.Hardsigmoid()
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        y = F.hardswish(self.conv(x))
        z = torch.cat([self.gate(y), F.hardsigmoid(x)], 1)
        return F.hardswish(self.fc(z.mean((2, 3))))


class SqueezeExcitation(nn.Module):
    """torchvision's SqueezeExcitation with MobileNetV3's gate: pool -> conv -> ReLU -> conv -> Hardsigmoid."""

    def __init__(self, c: int, squeeze: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(c, squeeze, 1), nn.Conv2d(squeeze, c, 1)
        self.activation, self.scale_activation = nn.ReLU(), nn.Hardsigmoid()

    def forward(self, x):
        return self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x))))) * x


class MobileNetV3Block(nn.Module):
    """MobileNetV3's inverted residual: expand (Hardswish), depthwise (Hardswish), SE gate, project, residual."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8, stride=2, act=nn.Hardswish)
        self.expand = conv_bn(8, 16, k=1, act=nn.Hardswish)
        self.dw = conv_bn(16, 16, groups=16, act=nn.Hardswish)
        self.se = SqueezeExcitation(16, 8)
        self.project = conv_bn(16, 8, k=1, act=None)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.project(self.se(self.dw(self.expand(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class UNet(nn.Module):
    """A small U-Net: strided encoder, nearest and bilinear upsampling, skip concats, a segmentation output."""

    def __init__(self):
        super().__init__()
        self.enc1, self.enc2 = conv_bn(3, 8), conv_bn(8, 16, stride=2)
        self.mid = conv_bn(16, 16, stride=2)
        self.up1 = nn.Upsample(scale_factor=2, mode="nearest")
        self.dec1 = conv_bn(32, 8)
        self.dec2 = conv_bn(16, 8)
        self.out = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        d = self.dec1(torch.cat([self.up1(self.mid(e2)), e2], 1))
        d = F.interpolate(d, scale_factor=2, mode="bilinear", align_corners=False)
        d = self.dec2(torch.cat([d, e1], 1))
        return self.out(d)


class Decoder(nn.Module):
    """The common transposed-conv decoder forms, each + BN + ReLU: kernel 3, stride 2, padding 1, output_padding 1
    and kernel 4, stride 2, padding 1 (TRANSPOSE_CONV then a crop), and kernel 2, stride 2 (no crop)."""

    def __init__(self):
        super().__init__()
        self.enc = conv_bn(3, 8, stride=2)
        self.up1 = nn.Sequential(nn.ConvTranspose2d(8, 6, 3, 2, padding=1, output_padding=1), nn.BatchNorm2d(6),
                                 nn.ReLU())
        self.down = conv_bn(6, 6, stride=2)
        self.up2 = nn.Sequential(nn.ConvTranspose2d(6, 4, 4, 2, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU6())
        self.up3 = nn.ConvTranspose2d(4, 3, 2, 2)

    def forward(self, x):
        return self.up3(self.up2(self.down(self.up1(self.enc(x)))))


class ShuffleNet(nn.Module):
    """Grouped conv + BN + ReLU, channel shuffle (view/transpose/view as torchvision), chunk, a lonely BN."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8, stride=2)
        self.group = conv_bn(8, 8, k=3, groups=2)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.group(self.stem(x))
        b, c, h, w = x.size()
        x = x.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, -1, h, w)
        a, y = x.chunk(2, dim=1)
        x = torch.cat([a, F.relu(y)], 1)
        return self.fc(self.bn(x).mean((2, 3)))


class Conv1dNet(nn.Module):
    """Audio / time series: Conv1d + BN1d + ReLU, strided Conv1d, flatten, Linear."""

    def __init__(self):
        super().__init__()
        self.c1 = conv_bn(2, 8, k=5, dim=1)
        self.c2 = conv_bn(8, 8, k=3, stride=2, dim=1)
        self.fc = nn.Linear(8 * 16, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.c2(self.c1(x)), 1))


class TwoHeads(nn.Module):
    """Detection-style: one backbone, a class head (softmax) and a box head (raw regression): two outputs."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(conv_bn(3, 8, stride=2), conv_bn(8, 16, stride=2))
        self.cls = nn.Conv2d(16, 8, 1)
        self.box = nn.Conv2d(16, 4, 1)

    def forward(self, x):  # torchvision SSD head layouts: (N, A*K, H, W) -> (N, H*W*A, K)
        f = self.body(x)
        n, _, h, w = f.shape
        scores = self.cls(f).view(n, -1, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4)  # SSDScoringHead
        return torch.softmax(scores, dim=-1), self.box(f).permute(0, 2, 3, 1).reshape(n, -1, 4)


class GroupedResidual(nn.Module):
    """RegNet's X block, three in a row: 1x1 conv, grouped 3x3 conv (group width 4), 1x1 conv, residual add.
    Each block's per-group split is a chunk whose bounds torch.onnx computes from the shape of a tensor after
    the previous block's chunk."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16, stride=2)
        self.blocks = nn.ModuleList(nn.Sequential(conv_bn(16, 16, k=1), conv_bn(16, 16, groups=4),
                                                  conv_bn(16, 16, k=1, act=None)) for _ in range(3))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = F.relu(x + block(x))
        return self.fc(x.mean((2, 3)))


class Degenerate(nn.Module):
    """The shapes of small inputs: a 1x1 last map (global pool = identity), a pad of 0, a concat of one, a max
    pool whose stride exceeds the map, a keepdim mean over one pixel, an adaptive pool to the same size, a resize
    to the same size, a no-op reshape."""

    def __init__(self):
        super().__init__()
        self.c1 = conv_bn(3, 8, stride=2)
        self.c2 = conv_bn(8, 8, stride=2)
        self.c3 = conv_bn(8, 16, stride=4)
        self.pool = nn.MaxPool2d(1, 4)
        self.same = nn.AdaptiveAvgPool2d(1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.pad(self.c1(x), [0, 0, 0, 0])
        x = torch.cat([self.c2(x)], 1)
        x = self.pool(self.c3(x)).mean((2, 3), keepdim=True)  # 1x1 -> 1x1, a mean over one pixel (timm SE)
        x = F.interpolate(self.same(x), size=x.shape[-2:], mode="nearest")
        x = self.gap(x).reshape(x.shape[0], 16, 1, 1)
        return self.fc(torch.flatten(x, 1))


class AdaptivePools(nn.Module):
    """torchvision VGG's AdaptiveAvgPool2d(7) -> flatten -> Linear at a small input (a 2x2 map: windows of 1 or 2
    pixels), the functional form from a 3x5 map to 4x7, and overlapping equal windows (4x4 -> 3x3): each one runs
    as GATHER + AVERAGE_POOL_2D; from a 1x1 map (VGG at 32 px) the GATHERs alone are the pooling."""

    def __init__(self):
        super().__init__()
        self.c1 = conv_bn(3, 8, stride=2)
        self.c2 = conv_bn(8, 8, stride=4)
        self.c3 = conv_bn(8, 8, stride=2)
        self.c4 = nn.Sequential(nn.Conv2d(8, 8, (6, 4), bias=False), nn.BatchNorm2d(8), nn.ReLU())  # 8x8 -> 3x5
        self.c5 = conv_bn(8, 8, stride=4)  # 2x2 -> 1x1
        self.avgpool = nn.AdaptiveAvgPool2d(7)
        self.fc = nn.Linear(8 * 7 * 7, 10)
        self.head = conv_bn(8, 4, k=1)

    def forward(self, x):
        a = self.c1(x)
        b = self.c2(a)
        logits = self.fc(torch.flatten(self.avgpool(b), 1))
        return (logits, self.head(F.adaptive_avg_pool2d(self.c4(a), (4, 7))), F.adaptive_avg_pool2d(self.c3(a), 3),
                F.adaptive_avg_pool2d(self.c5(b), 3))


# name -> (factory, input shape)
OP_MODELS = {
    "pass_through": (PassThroughNet, (1, 3, 16, 16)),
    "timm_style": (TimmStyleNet, (1, 3, 15, 15)),
    "squeeze_excitation": (SENet, (1, 3, 16, 16)),
    "hard_activations": (HardActivations, (1, 3, 16, 16)),
    "mobilenet_v3_block": (MobileNetV3Block, (1, 3, 16, 16)),
    "unet": (UNet, (1, 3, 16, 16)),
    "decoder": (Decoder, (1, 3, 16, 16)),
    "shuffle": (ShuffleNet, (1, 3, 16, 16)),
    "grouped_residual": (GroupedResidual, (1, 3, 16, 16)),
    "conv1d": (Conv1dNet, (1, 2, 32)),
    "two_heads": (TwoHeads, (1, 3, 16, 16)),
    "degenerate": (Degenerate, (1, 3, 16, 16)),
    "adaptive_pools": (AdaptivePools, (1, 3, 16, 16)),
}


def make_op_model(name: str, seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(seed)
    factory, shape = OP_MODELS[name]
    return randomize_bn(factory(), seed), shape


class TwoInputs(nn.Module):
    """Image + auxiliary map (e.g. depth): two stems, summed, one head."""

    def __init__(self):
        super().__init__()
        self.rgb, self.aux = conv_bn(3, 8, stride=2), conv_bn(1, 8, stride=2)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, image, aux):
        return self.head(self.rgb(image) + self.aux(aux))


def train_random(qat: nn.Module, shape: tuple[int, ...], steps: int = 4, seed: int = 0, lr: float = 1e-3) -> nn.Module:
    """A few SGD steps on random data (ranges observed, BN statistics and biases moved), then eval."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(qat.parameters(), lr=lr)
    qat.train()
    for _ in range(steps):
        out = qat(torch.rand(8, *shape[1:], generator=g))
        outs = out if isinstance(out, tuple) else (out,)
        loss = sum(o.float().square().mean() for o in outs)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return qat.eval()
