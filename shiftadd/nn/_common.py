"""Helpers shared by the shiftadd modules: nn.Conv2d-compatible argument handling, and
BatchNorm recalibration (after a supernet picks a subnet, or after quantization)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _reverse_repeat_tuple

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


class ConvArgs:
    """The nn.Conv2d geometry attributes, checked as nn.Conv2d checks them."""

    def _init_conv_args(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                        padding_mode):
        if groups <= 0 or in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by "
                             f"groups ({groups})")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        from ..functional import _pair as checked_pair

        self.kernel_size = checked_pair("kernel_size", kernel_size, 1)
        self.stride, self.dilation = checked_pair("stride", stride, 1), checked_pair("dilation", dilation, 1)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise ValueError("padding='same' is not supported for strided convolutions")
            self.padding = padding
        else:
            self.padding = checked_pair("padding", padding, 0)
        self.padding_mode = padding_mode
        if isinstance(self.padding, tuple):
            self._reversed_padding_repeated_twice = _reverse_repeat_tuple(self.padding, 2)
        else:
            pads = []
            for d, k in zip(self.dilation, self.kernel_size):
                total = d * (k - 1) if self.padding == "same" else 0
                pads = [total // 2, total - total // 2] + pads
            self._reversed_padding_repeated_twice = tuple(pads)

    def _pad_input(self, x):
        """Non-zero padding modes pad x here; returns (x, padding for the kernel)."""
        if self.padding_mode == "zeros":
            return x, self.padding
        return F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode), (0, 0)

    def _conv_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        return s


@torch.no_grad()
def replace_modules(model: nn.Module, new_of: dict) -> int:
    """Puts new_of[id(m)] in every place where a module m of the mapping is a child of a
    module of `model` (any depth; each use of a shared module, shared parents walked once).
    Returns the number of places changed.  (named_children() would list a module used
    twice in one parent only once.)"""
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and id(child) in new_of:
                setattr(parent, name, new_of[id(child)])
                n += 1
    return n


def recalibrate_bn(model: nn.Module, forward, batches) -> None:
    """Resets every BatchNorm's statistics and re-estimates them (cumulative average) from
    `batches` with forward(x); the model is left in eval mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, {k: v.clone() for k, v in m.state_dict().items()}) for m in bns]
    modes = [(m, m.training) for m in model.modules()]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    try:
        for x in batches:
            forward(x)
    except BaseException:  # a failed call leaves the statistics and train/eval flags as they were
        for m, (_, state) in zip(bns, saved):
            m.load_state_dict(state)
        for m, mode in modes:
            m.training = mode
        raise
    finally:
        for m, (mom, _) in zip(bns, saved):
            m.momentum = mom
    model.eval()
