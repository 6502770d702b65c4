"""Stand-alone networks built from a gene (for retraining and for costing).

Same topology as the supernet: a multiplicative stem conv, the gene's layers
(``op -> BN -> ReLU``, residual where shapes agree; skip is the identity), global average
pooling and a multiplicative classifier.  Layers come from
:func:`shiftadd.models.layers.make_conv`, so the shift layers are DeepShift-PS and the
adder layers carry AdderNet's eta scaling, as in the model zoo.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .space import SearchSpace


class GeneLayer(nn.Module):
    def __init__(self, op: str, c_in: int, c_out: int, k: int, stride: int, **layer_kwargs):
        super().__init__()
        from ..models.layers import make_conv

        self.op = op
        self.residual = stride == 1 and c_in == c_out
        if op == "skip":
            if not self.residual:
                raise ValueError(f"skip needs equal shapes (c_in {c_in}, c_out {c_out}, stride {stride})")
            return
        self.conv = make_conv(op, c_in, c_out, k, stride=stride, padding=k // 2, **layer_kwargs)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x):
        if self.op == "skip":
            return x
        y = F.relu(self.bn(self.conv(x)))
        return y + x if self.residual else y


class GeneNet(nn.Module):
    """The network of one gene of `space`; input (N, in_channels, H, W) -> (N, num_classes)."""

    def __init__(self, space: SearchSpace, gene: dict, **layer_kwargs):
        super().__init__()
        gene = space.validate(gene)
        self.gene = gene
        self.stem = nn.Sequential(nn.Conv2d(space.in_channels, space.stem, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(space.stem), nn.ReLU())
        layers, c_in = [], space.stem
        for slot, l in zip(space.layer_plan(), gene["layers"]):
            c_out = gene["widths"][slot.stage]
            layers.append(GeneLayer(l["op"], c_in, c_out, l["k"], slot.stride, **layer_kwargs))
            c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, space.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layers(self.stem(x)).mean((2, 3)))
