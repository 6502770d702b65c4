"""VGG-small (the CIFAR VGG of the AdderNet / ShiftAddNet papers), scaled by width.

Conv blocks 64-64-M-128-128-M-256-256-M (3x3 conv, BatchNorm, ReLU; M = 2x2 max pool,
ceil mode so small inputs never shrink to zero), then adaptive average pooling to 1x1
and a linear classifier: any input size (8x8 digits, 32x32 CIFAR) and channel count.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn

from .layers import make_conv, make_linear
from .resnet_cifar import scale_channels

VGG_SMALL = (64, 64, "M", 128, 128, "M", 256, 256, "M")


class VGG(nn.Module):
    """VGG from a config (ints: 3x3 conv + BN + ReLU; "M": max pool).

    op: the operator of every conv but the first; stem_op / head_op: the first conv and
    the classifier ("conv" = multiplicative, as AdderNet / ShiftAddNet keep them).
    """

    def __init__(self, cfg: Sequence[Union[int, str]] = VGG_SMALL, num_classes: int = 10, in_channels: int = 3,
                 width: float = 1.0, op: str = "conv", stem_op: str = "conv", head_op: str = "conv",
                 layer_kwargs=None):
        super().__init__()
        kw = dict(layer_kwargs or {})
        layers, in_ch, first = [], in_channels, True
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
                continue
            c = scale_channels(int(v), width)
            layers += [make_conv(stem_op if first else op, in_ch, c, 3, 1, **kw), nn.BatchNorm2d(c),
                       nn.ReLU(inplace=True)]
            in_ch, first = c, False
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = make_linear(head_op, in_ch, num_classes, **kw)
        for m in self.modules():
            if type(m) is nn.Conv2d:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))
