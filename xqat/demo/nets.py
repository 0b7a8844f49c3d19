"""Reference float architectures (no torchvision needed) for the examples, benchmarks and demo:
MobileNetV2 with a width multiplier, a small ResNet, and the demo's small CNN. All trace with torch.fx
and map to EdgeTPU-friendly int8 ops (ReLU/ReLU6, depthwise conv, Add, mean, Linear)."""

from __future__ import annotations

from torch import nn


def _make_divisible(v: float, divisor: int = 8) -> int:
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def conv_bn_act(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1,
                act: type[nn.Module] | None = nn.ReLU6) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand + ReLU6, 3x3 depthwise + ReLU6, 1x1 linear projection, Add if shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers = [conv_bn_act(cin, hidden, 1)] if expand != 1 else []
        layers += [conv_bn_act(hidden, hidden, 3, stride, groups=hidden), conv_bn_act(hidden, cout, 1, act=None)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al. 2018) with width multiplier; global average pool via mean."""

    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1)]

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, in_channels: int = 3):
        super().__init__()
        cin = _make_divisible(32 * width_mult)
        last = _make_divisible(1280 * max(1.0, width_mult))
        layers: list[nn.Module] = [conv_bn_act(in_channels, cin, 3, 2)]
        for t, c, n, s in self.SETTINGS:
            cout = _make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        layers.append(conv_bn_act(cin, last, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv+BN, identity or 1x1 projection shortcut, Add, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = conv_bn_act(cin, cout, 3, stride, act=nn.ReLU)
        self.conv2 = conv_bn_act(cout, cout, 3, 1, act=None)
        self.shortcut = conv_bn_act(cin, cout, 1, stride, act=None) if (stride != 1 or cin != cout) else nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class ResNetSmall(nn.Module):
    """A ResNet-style net: stem, `depth` basic blocks per stage over 3 stages, mean, Linear."""

    def __init__(self, num_classes: int = 10, width: int = 16, depth: int = 2, in_channels: int = 3):
        super().__init__()
        self.stem = conv_bn_act(in_channels, width, 3, 1, act=nn.ReLU)
        blocks, cin = [], width
        for stage in range(3):
            cout = width * 2 ** stage
            for i in range(depth):
                blocks.append(BasicBlock(cin, cout, 2 if (i == 0 and stage > 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.layers(self.stem(x)).mean((2, 3)))


class DigitsCNN(nn.Module):
    """The demo's small CNN for 1x16x16 digits: three conv+BN+ReLU, mean, Linear."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(conv_bn_act(1, 16, 3, 1, act=nn.ReLU), conv_bn_act(16, 32, 3, 2, act=nn.ReLU),
                                      conv_bn_act(32, 32, 3, 2, act=nn.ReLU))
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))
