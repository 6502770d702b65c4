"""CIFAR ResNets (He et al. 2016, section 4.2): ResNet-20/32/56 = 6n+2 layers, n = 3/5/9.

3x3 stem conv to 16*width channels, three stages of n BasicBlocks with 16/32/64 * width
channels and strides 1/2/2, option-B shortcut (1x1 conv + BN) where the shape changes,
global average pooling, linear classifier.  Any input size and channel count.

The conv layers come from :func:`shiftadd.models.layers.make_conv`, so each variant
("conv", "shift", "adder", "shiftadd") keeps the same topology; a BatchNorm follows every
convolution, adder ones included (AdderNet needs it).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .layers import make_conv, make_linear


def scale_channels(c: int, width: float) -> int:
    """round(c * width), at least 1."""
    return max(1, int(round(c * width)))


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, op: str, layer_kwargs: dict):
        super().__init__()
        self.conv1 = make_conv(op, in_ch, out_ch, 3, stride, **layer_kwargs)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = make_conv(op, out_ch, out_ch, 3, 1, **layer_kwargs)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(make_conv(op, in_ch, out_ch, 1, stride, 0, **layer_kwargs),
                                          nn.BatchNorm2d(out_ch))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """CIFAR ResNet.

    depth: 6n+2 (20, 32, 56, ...); op: the operator of the inner convolutions;
    stem_op / head_op: the operator of the first conv and the classifier (multiplicative
    "conv" in the AdderNet / ShiftAddNet recipes).
    """

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3, width: float = 1.0,
                 op: str = "conv", stem_op: str = "conv", head_op: str = "conv",
                 stage_channels: Sequence[int] = (16, 32, 64), layer_kwargs=None):
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        kw = dict(layer_kwargs or {})
        chans = [scale_channels(c, width) for c in stage_channels]
        self.conv1 = make_conv(stem_op, in_channels, chans[0], 3, 1, **kw)
        self.bn1 = nn.BatchNorm2d(chans[0])
        self.relu = nn.ReLU(inplace=True)
        layers, in_ch = [], chans[0]
        for i, (c, s) in enumerate(zip(chans, (1, 2, 2))):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(in_ch, c, s if j == 0 else 1, op, kw))
                in_ch = c
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = make_linear(head_op, in_ch, num_classes, **kw)
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if type(m) is nn.Conv2d:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))
