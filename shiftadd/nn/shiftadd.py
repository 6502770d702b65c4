"""The ShiftAddNet block: a shift convolution followed by an adder convolution."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .adder import AdderConv2d
from .shift import ShiftConv2d


class ShiftAddConv2d(nn.Module):
    """ShiftAddNet (You et al., 2020) replacement for a conv layer.

    ``shift``: a DeepShift-PS convolution ``in_channels -> out_channels`` with the given
    kernel, stride, padding, dilation and groups (weight_bits 5 by default);
    ``adder``: an adder convolution ``out_channels -> out_channels`` with the same kernel
    size, stride 1 and 'same' padding, as in ShiftAddNet's ResNets (eta, grad_mode and
    accumulate are its arguments).
    Input (N, C, H, W); output as nn.Conv2d with the same arguments.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = False, padding_mode: str = "zeros", *, shift_mode: str = "ps",
                 weight_bits: int = 5, act_bits=None, rounding: str = "deterministic", eta: Optional[float] = 0.2,
                 grad_mode: str = "addernet", accumulate: str = "fp32", device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.shift = ShiftConv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                                 bias=False, padding_mode=padding_mode, mode=shift_mode, weight_bits=weight_bits,
                                 act_bits=act_bits, rounding=rounding, **factory)
        self.adder = AdderConv2d(out_channels, out_channels, kernel_size, 1, "same", dilation, groups, bias=bias,
                                 eta=eta, grad_mode=grad_mode, accumulate=accumulate, **factory)
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
            setattr(self, name, getattr(self.shift, name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adder(self.shift(x))
