"""Inference modules holding packed power-of-two weights (layout: :mod:`shiftadd.packed`).

``ShiftLinear.pack()`` -> :class:`PackedShiftLinear`, ``ShiftConv2d.pack()`` ->
:class:`PackedShiftConv2d`, :func:`pack_model` replaces every shift layer of a model.
A packed module computes what its source module computes in eval mode (deterministic
rounding, the same act_bits rounding of the input and bias) from 4, 8 or 16 bits per
weight:

* ``PackedShiftLinear`` runs ``shiftadd::shift_linear_packed``, which on the CPU reads
  the codes directly (decode by table lookup in registers, FMA; csrc/cpu/shift_packed.cpp);
  on CUDA tensors the cuda kernel (a GEMV for up to 16 rows, else decode + cuBLAS; GPU-tested
  on an H100); the Triton one (codes decoded in registers, tl.dot) only when forced, as it
  measured slower; without either the reference, which decodes and calls F.linear;
  ``forward_int`` is the exact integer mode (``shiftadd::shift_linear_int``).
* ``PackedShiftConv2d`` decodes the weight once per forward and calls F.conv2d (on every
  device): the memory saving is in storage, not in the conv's weight traffic.

Inference only: gradients through a packed weight raise.  Buffers: ``codes`` (uint8),
``scales``, ``zero_codes`` (int32); the code width, act_bits and the weight's dtype are
the module's extra state, so ``state_dict`` round-trips (loading a state with another
code width resizes ``codes``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .. import functional as SF
from ..packed import CODE_BITS, PackedPoT, check_scale_range, pack_pot, unpack_pot
from ..reference.shift import packed_row_bytes
from ._common import ConvArgs, replace_modules

_DTYPES = {str(d): d for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


class _PackedBase(nn.Module):
    def _init_packed(self, weight_shape, bias, code_bits, act_bits, weight_dtype, device, dtype):
        if code_bits not in CODE_BITS:
            raise ValueError(f"code_bits must be one of {CODE_BITS}, got {code_bits!r}")
        self.weight_shape = torch.Size(weight_shape)
        self.code_bits = code_bits
        self.act_bits = SF._act_bits(act_bits)
        self.weight_dtype = weight_dtype or dtype or torch.get_default_dtype()
        o, k = self.weight_shape[0], math.prod(self.weight_shape[1:])
        self.register_buffer("codes", torch.zeros((o, packed_row_bytes(k, code_bits)), dtype=torch.uint8,
                                                  device=device))
        self.register_buffer("scales", torch.zeros(o, dtype=torch.int32, device=device))
        self.register_buffer("zero_codes", torch.full((o,), -1, dtype=torch.int32, device=device))
        # inference only: the bias is kept as a frozen parameter (nn.Linear's name and dtype handling)
        self.bias = nn.Parameter(torch.zeros(o, device=device, dtype=dtype), requires_grad=False) if bias else None

    def _set_packed(self, packed: PackedPoT, bias: Optional[torch.Tensor]) -> None:
        self.code_bits, self.weight_dtype = packed.bits, packed.dtype
        self.codes, self.scales, self.zero_codes = packed.codes, packed.scales, packed.zero_codes
        if self.bias is not None:
            self.bias.data.copy_(bias.detach())

    def packed_weight(self) -> PackedPoT:
        """The weight as a :class:`shiftadd.PackedPoT` (sharing this module's buffers)."""
        return PackedPoT(self.codes, self.scales, self.zero_codes, self.weight_shape, self.code_bits,
                         self.weight_dtype, check_scales=False)  # checked when set or loaded

    def unpacked_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dense power-of-two weight (the source module's quantized_weight())."""
        return unpack_pot(self.packed_weight(), dtype)

    def _operands(self, x):
        bias = self.bias
        if self.act_bits is not None:
            x = SF.round_to_fixed(x, *self.act_bits)
            bias = None if bias is None else SF.round_to_fixed(bias, *self.act_bits)
        return x, bias

    def get_extra_state(self):
        return {"code_bits": self.code_bits, "act_bits": self.act_bits, "weight_dtype": str(self.weight_dtype)}

    def set_extra_state(self, state):
        self.code_bits = int(state["code_bits"])
        self.act_bits = SF._act_bits(state["act_bits"])
        self.weight_dtype = _DTYPES[state["weight_dtype"]]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        extra = state_dict.get(prefix + "_extra_state")
        codes = state_dict.get(prefix + "codes")
        scales = state_dict.get(prefix + "scales")
        if isinstance(scales, torch.Tensor):  # packed_weight() trusts them
            check_scale_range(scales)
        if isinstance(extra, dict) and codes is not None and extra.get("code_bits") in CODE_BITS:
            o, k = self.weight_shape[0], math.prod(self.weight_shape[1:])
            want = (o, packed_row_bytes(k, extra["code_bits"]))
            if tuple(codes.shape) == want and tuple(self.codes.shape) != want:  # another code width: resize
                self.codes = torch.zeros(want, dtype=torch.uint8, device=self.codes.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _packed_repr(self) -> str:
        s = f", code_bits={self.code_bits}, weight_dtype={self.weight_dtype}"
        return s + (f", act_bits={self.act_bits}" if self.act_bits is not None else "")


class PackedShiftLinear(_PackedBase):
    """A :class:`ShiftLinear` for inference with its weight packed (``ShiftLinear.pack()``).

    Input (*, in_features) -> (*, out_features).  ``forward_int(x_int)`` computes the
    exact integer layer (no bias): int64 ``sum ±(x_int >> s)``, see
    :func:`shiftadd.functional.shift_linear_int`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, code_bits: int = 4, act_bits=None,
                 weight_dtype: Optional[torch.dtype] = None, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_packed((out_features, in_features), bias, code_bits, act_bits, weight_dtype, device, dtype)

    @classmethod
    @torch.no_grad()
    def from_shift(cls, layer, code_bits: Optional[int] = None) -> "PackedShiftLinear":
        """Packs a :class:`ShiftLinear` (its deterministic quantized weight)."""
        packed = pack_pot(layer.quantized_weight().detach(), layer.weight_bits, code_bits=code_bits)
        ref = layer.weight if layer.mode == "q" else layer.shift
        new = cls(layer.in_features, layer.out_features, layer.bias is not None, code_bits=packed.bits,
                  act_bits=layer.act_bits, weight_dtype=ref.dtype, device=ref.device,
                  dtype=layer.bias.dtype if layer.bias is not None else ref.dtype)
        new._set_packed(packed, layer.bias)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, bias = self._operands(x)
        dev = x.device.type if isinstance(x, torch.Tensor) else None
        if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev) and x.is_floating_point():
            dt = torch.get_autocast_dtype(dev)  # what F.linear computes in under autocast (as PackedShiftConv2d)
            x, bias = x.to(dt), (None if bias is None else bias.to(dt))
        return SF.shift_linear_packed(x, self.packed_weight(), bias)

    def forward_int(self, x_int: torch.Tensor) -> torch.Tensor:
        return SF.shift_linear_int(x_int, self.packed_weight())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
                + self._packed_repr())


class PackedShiftConv2d(ConvArgs, _PackedBase):
    """A :class:`ShiftConv2d` for inference with its weight packed (``ShiftConv2d.pack()``).

    The weight is decoded once per forward (to the input's dtype) and F.conv2d runs on it.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *, code_bits: int = 4,
                 act_bits=None, weight_dtype: Optional[torch.dtype] = None, device=None, dtype=None):
        super().__init__()
        self._init_conv_args(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode)
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        self._init_packed(shape, bias, code_bits, act_bits, weight_dtype, device, dtype)

    @classmethod
    @torch.no_grad()
    def from_shift(cls, layer, code_bits: Optional[int] = None) -> "PackedShiftConv2d":
        """Packs a :class:`ShiftConv2d` (its deterministic quantized weight)."""
        packed = pack_pot(layer.quantized_weight().detach(), layer.weight_bits, code_bits=code_bits)
        ref = layer.weight if layer.mode == "q" else layer.shift
        new = cls(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                  layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode, code_bits=packed.bits,
                  act_bits=layer.act_bits, weight_dtype=ref.dtype, device=ref.device,
                  dtype=layer.bias.dtype if layer.bias is not None else ref.dtype)
        new._set_packed(packed, layer.bias)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        SF._check_tensor("x", x)
        x, padding = self._pad_input(x)
        x, bias = self._operands(x)
        w = unpack_pot(self.packed_weight(), x.dtype)
        return torch.nn.functional.conv2d(x, w, bias, self.stride, padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return self._conv_repr() + f", bias={self.bias is not None}" + self._packed_repr()


def pack_model(model: nn.Module, code_bits: Optional[int] = None) -> tuple:
    """Replaces every :class:`ShiftLinear` / :class:`ShiftConv2d` of `model` (at any depth,
    including the shift half of ShiftAddConv2d) by its packed inference version, in place.

    code_bits: None (each layer's narrowest lossless width) or 4 / 8 / 16 for all.
    Returns (model, number of layers packed); a model that is itself a shift layer is
    returned packed.
    """
    from .shift import ShiftConv2d, ShiftLinear

    def packed(m):
        return m.pack(code_bits) if isinstance(m, (ShiftLinear, ShiftConv2d)) else None

    root = packed(model)
    if root is not None:
        return root, 1
    # model.modules() lists a shared layer once; every use of it gets the one packed layer
    new_of = {id(m): packed(m) for m in model.modules() if isinstance(m, (ShiftLinear, ShiftConv2d))}
    replace_modules(model, new_of)
    return model, len(new_of)
