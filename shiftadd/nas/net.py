"""Stand-alone networks built from a gene (for retraining and for costing).

Same topology as the supernet: a multiplicative stem conv, the gene's layers
(``op -> BN -> ReLU``, residual where shapes agree; skip is the identity), global average
pooling and a multiplicative classifier.  Layers come from
:func:`shiftadd.models.layers.make_conv`; the adder layers carry AdderNet's eta scaling,
as in the model zoo.

The shift layers (and the shift half of shiftadd layers) are DeepShift-Q by default
(:data:`SHIFT_MODE`), the operator the supernet searched with, and the net trains with
SGD.  Until 2026-11-23 they were DeepShift-PS, trained with SGD at the PS shift lr in
hybrid nets: measured on digits (24 budget-feasible nets x 3 seeds x 20 epochs), PS
retraining scored 0.9765 on average and lost accuracy with every shift layer (r = -0.61),
Q retraining scores 0.9819 with no dependence on the shift count (r = -0.06).  Pass
``mode="ps"`` to get DeepShift-PS layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .space import SearchSpace

SHIFT_MODE = "q"  # the shift layers' DeepShift mode unless mode= is given (see the module docstring)


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
        layer_kwargs.setdefault("mode", SHIFT_MODE)
        self.layer_kwargs = dict(layer_kwargs)  # JSON-able: saved with a retrained net to rebuild it
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
