"""CIFAR ResNets (He et al. 2016, Sec. 4.2): ``resnet20``, ``resnet32``, ``resnet44``, ``resnet56``.

``resnet32`` is the backbone of MW-Net's and MLC's CIFAR experiments, so it follows MW-Net's ``resnet.py``
exactly where that changes results: a 3x3 16-channel stem without pooling, three stages of BasicBlocks with
16/32/64 channels (the second and third stages start with stride 2), "option A" shortcuts, a 64-d global
average pooled feature, and ``kaiming_normal_`` (fan-in, gain sqrt(2)) on every conv and linear weight.
The other depths differ only in the number of blocks per stage, ``(depth - 2) / 6``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from raynoisy.models.registry import register_model, reject_pretrained

_WIDTHS = (16, 32, 64)


class _ZeroPadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad the new channels, so shortcuts add no parameters.

    A module rather than MW-Net's lambda so the model pickles (Ray ships models and checkpoints between
    processes).
    """

    def __init__(self, extra_channels: int) -> None:
        super().__init__()
        self.pad = extra_channels // 2

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a shortcut; out-of-place add and ReLU for double backward."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = _ZeroPadShortcut(out_channels - in_channels)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def _stage(in_channels: int, width: int, blocks: int, stride: int) -> nn.Sequential:
    """``blocks`` BasicBlocks; only the first changes resolution and width."""
    return nn.Sequential(
        BasicBlock(in_channels, width, stride), *(BasicBlock(width, width, 1) for _ in range(blocks - 1))
    )


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images; 64-d features. Any input size works (global pooling)."""

    def __init__(self, depth: int, num_classes: int, in_channels: int) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        blocks_per_stage = (depth - 2) // 6
        c1, c2, c3 = _WIDTHS
        self.conv1 = nn.Conv2d(in_channels, c1, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.layer1 = _stage(c1, c1, blocks_per_stage, stride=1)
        self.layer2 = _stage(c1, c2, blocks_per_stage, stride=2)
        self.layer3 = _stage(c2, c3, blocks_per_stage, stride=2)
        self.feature_dim = c3
        self.fc = nn.Linear(c3, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        features = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(features), features


def _register(depth: int) -> None:
    name = f"resnet{depth}"

    @register_model(name)
    def build(*, num_classes: int, in_channels: int, image_size: int, pretrained: str | None) -> CifarResNet:
        reject_pretrained(name, pretrained)
        return CifarResNet(depth, num_classes, in_channels)


for _depth in (20, 32, 44, 56):
    _register(_depth)
