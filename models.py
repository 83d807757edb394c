"""Architectures used in the paper. Every model takes images in [0, 1] and returns logits.

Per-dataset normalisation lives inside the model as buffers, so attacks, AutoAttack and
checkpoints all work in pixel space and nobody has to remember to normalise:

    model = get_model("wrn-34-10", num_classes=10, mean=CIFAR10_MEAN, std=CIFAR10_STD)

- `smallcnn`: the 7-layer CNN of TRADES (Zhang et al. 2019) for 28x28 grey images (MNIST).
- `wrn-D-W`: WideResNet of depth D and widen factor W (Zagoruyko & Komodakis 2016), e.g.
  `wrn-34-10` (CIFAR) and `wrn-28-10` (CIFAR with extra data).
- `resnet18`: the CIFAR ResNet-18 (He et al. 2016) of Appendix A.
"""
import re

import torch
import torch.nn as nn
import torch.nn.functional as F


class Normalize(nn.Module):
    """(x - mean) / std with mean and std stored as buffers (saved in the state dict)."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class SmallCNN(nn.Module):
    """TRADES' MNIST network: conv 32, 32, pool, conv 64, 64, pool, fc 1024-200-200-10."""

    def __init__(self, num_classes=10, in_channels=1, drop=0.5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3), nn.ReLU(),
            nn.Conv2d(32, 32, 3), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3), nn.ReLU(),
            nn.Conv2d(64, 64, 3), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(64 * 4 * 4, 200), nn.ReLU(), nn.Dropout(drop),
            nn.Linear(200, 200), nn.ReLU(),
            nn.Linear(200, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        # TRADES initialises the last layer to zero: all classes start equally likely.
        nn.init.zeros_(self.classifier[-1].weight)
        nn.init.zeros_(self.classifier[-1].bias)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class WideBasic(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-conv3x3, with a 1x1 shortcut if shapes change."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False)

    def forward(self, x):
        o = F.relu(self.bn1(x))
        # The shortcut branches from the activated input when the shape changes (as in TRADES' WRN).
        shortcut = x if self.shortcut is None else self.shortcut(o)
        o = self.conv1(o)
        o = self.conv2(F.relu(self.bn2(o)))
        return o + shortcut


class WideResNet(nn.Module):
    def __init__(self, depth=34, widen=10, num_classes=10, in_channels=3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        layers, c_in = [], widths[0]
        for i, stride in enumerate([1, 2, 2]):
            for j in range(n):
                layers.append(WideBasic(c_in, widths[i + 1], stride if j == 0 else 1))
                c_in = widths[i + 1]
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(c_in)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x):
        o = F.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(o, 1), 1))


class BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x):
        o = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(o)) + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18: 3x3 stem, no max-pool, four stages of two basic blocks."""

    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(64), nn.ReLU())
        layers, c_in = [], 64
        for c_out, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
            c_in = c_out
        self.blocks = nn.Sequential(*layers)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        o = self.blocks(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(o, 1), 1))


MODEL_NAMES = ("smallcnn", "resnet18", "wrn-D-W (e.g. wrn-34-10, wrn-28-10)")
# Bounds of a WideResNet name: the paper's networks are WRN-34-10 and WRN-28-10, and the largest
# in adversarial training papers are about WRN-106-16; WRN-256-32 has about 4 billion parameters.
WRN_MAX_DEPTH, WRN_MAX_WIDEN = 256, 32


def check_model_name(name):
    """Raise ValueError unless `name` is a model get_model can build (without building it)."""
    wrn = re.fullmatch(r"wrn-(\d+)-(\d+)", name)
    if wrn:
        depth, widen = int(wrn.group(1)), int(wrn.group(2))
        if depth < 10 or depth > WRN_MAX_DEPTH or (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4 in [10, {WRN_MAX_DEPTH}] (10, 16, 22, 28, "
                             f"34, ...), got {depth}")
        if not 1 <= widen <= WRN_MAX_WIDEN:
            raise ValueError(f"WideResNet widen factor must be in [1, {WRN_MAX_WIDEN}], got {widen}")
    elif name not in ("smallcnn", "resnet18"):
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODEL_NAMES)}")


def get_model(name, num_classes, in_channels=None, mean=None, std=None):
    """Build `name` for `num_classes` classes; `mean`/`std` (per channel) set the input normalisation.

    Inputs are images in [0, 1], outputs are logits. Raises ValueError for an unknown name.
    """
    check_model_name(name)
    wrn = re.fullmatch(r"wrn-(\d+)-(\d+)", name)
    if name == "smallcnn":
        in_channels = in_channels or 1
        net = SmallCNN(num_classes, in_channels)
    elif name == "resnet18":
        in_channels = in_channels or 3
        net = ResNet18(num_classes, in_channels)
    elif wrn:
        in_channels = in_channels or 3
        net = WideResNet(int(wrn.group(1)), int(wrn.group(2)), num_classes, in_channels)
    mean = (0.0,) * in_channels if mean is None else tuple(mean)
    std = (1.0,) * in_channels if std is None else tuple(std)
    return nn.Sequential(Normalize(mean, std), net)
