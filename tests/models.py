"""The model set every stage is tested on: small versions of the architectures users deploy.

Each factory returns a float nn.Module in eval mode with non-trivial BN statistics, plus its input
shape (NCHW, batch 1). `EXPECTED_POINTS` lists, per model, the activation fake-quant points that
`prepare_qat` must create (labels in graph order): one per int8 tensor of the TFLite model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn(cin, cout, k=3, stride=1, groups=1, act: type[nn.Module] | None = nn.ReLU):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class PlainCNN(nn.Module):
    """Conv+BN+ReLU, max pool, conv with bias and ReLU, global average pool, Linear."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = _conv_bn(3, 8)
        self.conv2 = _conv_bn(8, 16, stride=2)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.relu3 = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.pool(self.conv2(self.stem(x)))
        x = self.gap(self.relu3(self.conv3(x)))
        return self.fc(torch.flatten(x, 1))


class MobileNetV1Style(nn.Module):
    """Depthwise-separable blocks with ReLU6 (MobileNetV1)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = _conv_bn(3, 8, stride=2, act=nn.ReLU6)
        self.blocks = nn.Sequential(
            _conv_bn(8, 8, groups=8, act=nn.ReLU6), _conv_bn(8, 16, k=1, act=nn.ReLU6),
            _conv_bn(16, 16, stride=2, groups=16, act=nn.ReLU6), _conv_bn(16, 24, k=1, act=nn.ReLU6),
        )
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(x.mean((2, 3)))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: expand 1x1 + ReLU6, depthwise 3x3 + ReLU6, linear projection, residual Add."""

    def __init__(self, c: int, expand: int = 4):
        super().__init__()
        h = c * expand
        self.expand = _conv_bn(c, h, k=1, act=nn.ReLU6)
        self.dw = _conv_bn(h, h, groups=h, act=nn.ReLU6)
        self.project = _conv_bn(h, c, k=1, act=None)

    def forward(self, x):
        return x + self.project(self.dw(self.expand(x)))


class MobileNetV2Style(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = _conv_bn(3, 16, stride=2, act=nn.ReLU6)
        self.block1 = InvertedResidual(16)
        self.block2 = InvertedResidual(16)
        self.head = _conv_bn(16, 32, k=1, act=nn.ReLU6)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.head(self.block2(self.block1(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class InceptionStyle(nn.Module):
    """Parallel branches joined by torch.cat (1x1, 3x3, max pool + 1x1), then a second concat."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = _conv_bn(3, 16, stride=2)
        self.b1 = _conv_bn(16, 8, k=1)
        self.b3 = nn.Sequential(_conv_bn(16, 8, k=1), _conv_bn(8, 8))
        self.bp = nn.Sequential(nn.MaxPool2d(3, 1, 1), _conv_bn(16, 8, k=1))
        self.mix = _conv_bn(24, 16, k=1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.stem(x)
        y = torch.cat([self.b1(x), self.b3(x), self.bp(x)], dim=1)
        z = torch.cat([self.mix(y), x], dim=1)
        return self.fc(z.mean((2, 3)))


class PoolHead(nn.Module):
    """Average pooling, then global average pooling, flatten and a Linear+ReLU, Linear head."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = _conv_bn(3, 16)
        self.avg = nn.AvgPool2d(2)
        self.conv2 = _conv_bn(16, 16)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(16, 32)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.conv2(self.avg(self.conv1(x)))
        x = torch.flatten(self.gap(x), 1)
        return self.fc2(self.act(self.fc1(x)))


class FunctionalNet(nn.Module):
    """A subclassed model written with functional calls: F.relu, `+`, torch.cat, mean, sigmoid head."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        a = F.relu(self.bn1(self.c1(x)))
        b = self.c3(F.relu(self.c2(a)))
        s = F.relu(a + b)
        c = torch.cat([s, a], dim=1)
        c = F.avg_pool2d(c, 2)
        return torch.sigmoid(self.fc(c.mean(dim=(2, 3))))


MODELS = {
    "plain": PlainCNN,
    "mobilenet_v1": MobileNetV1Style,
    "mobilenet_v2": MobileNetV2Style,
    "inception": InceptionStyle,
    "pool_head": PoolHead,
    "functional": FunctionalNet,
}

INPUT_SHAPE = (1, 3, 16, 16)


def make_model(name: str, seed: int = 0) -> nn.Module:
    """A float model of the set, eval mode, with randomised BN statistics so folding matters."""
    torch.manual_seed(seed)
    m = MODELS[name]()
    return randomize_bn(m, seed + 1)


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics, so folding matters; eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
    return model.eval()


# Activation fake-quant points per model, in graph order: (label, role). Role: "own" = observes its range
# group, "tied" = uses its group's range (concat inputs, avg pool), "pass" = same-scale op output already on
# the grid (max pool, reshape), "fixed" = TFLite's fixed output range (sigmoid/tanh/softmax).
EXPECTED_POINTS = {
    "plain": [("input:x", "own"), ("stem.0", "own"), ("conv2.0", "own"), ("pool", "pass"),
              ("conv3", "own"), ("gap", "own"), ("flatten", "pass"), ("fc", "own")],
    "mobilenet_v1": [("input:x", "own"), ("stem.0", "own"), ("blocks.0.0", "own"), ("blocks.1.0", "own"),
                     ("blocks.2.0", "own"), ("blocks.3.0", "own"), ("mean", "own"), ("fc", "own")],
    "mobilenet_v2": [("input:x", "own"), ("stem.0", "own"),
                     ("block1.expand.0", "own"), ("block1.dw.0", "own"), ("block1.project.0", "own"),
                     ("block1.add", "own"),
                     ("block2.expand.0", "own"), ("block2.dw.0", "own"), ("block2.project.0", "own"),
                     ("block2.add", "own"), ("head.0", "own"), ("adaptive_avg_pool2d", "own"),
                     ("flatten", "pass"), ("fc", "own")],
    "inception": [("input:x", "own"), ("stem.0", "tied"), ("b1.0", "tied"), ("b3.0.0", "own"), ("b3.1.0", "tied"),
                  ("bp.0", "pass"), ("bp.1.0", "tied"), ("cat", "own"), ("mix.0", "tied"), ("cat_1", "own"),
                  ("mean", "own"), ("fc", "own")],
    "pool_head": [("input:x", "own"), ("conv1.0", "own"), ("avg", "tied"), ("conv2.0", "own"), ("gap", "own"),
                  ("flatten", "pass"), ("fc1", "own"), ("fc2", "own")],
    "functional": [("input:x", "own"), ("c1", "tied"), ("c2", "own"), ("c3", "own"), ("add", "tied"),
                   ("cat", "own"), ("avg_pool2d", "tied"), ("mean", "own"), ("fc", "own"), ("sigmoid", "fixed")],
}


# Factories for the CLI tests (`xqat export tests.models:plain ...`).
def plain() -> nn.Module:
    return make_model("plain")


def functional() -> nn.Module:
    return make_model("functional")


def calibrate(qat: nn.Module, steps: int = 5, batch: int = 8, seed: int = 0) -> nn.Module:
    """A few train-mode forward passes on uniform [0, 1) images: ranges observed, BN statistics moved."""
    g = torch.Generator().manual_seed(seed)
    qat.train()
    with torch.no_grad():
        for _ in range(steps):
            qat(torch.rand(batch, *INPUT_SHAPE[1:], generator=g))
    return qat.eval()
