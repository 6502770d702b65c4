"""Shift (DeepShift) layers: drop-in replacements for nn.Conv2d and nn.Linear whose
weights are powers of two, ``W = s * 2^p``.

mode "ps" (default, DeepShift-PS): parameters ``shift`` P and ``sign`` S; the weight is
2^round(P) * sign(round(S)) (ternary sign).  mode "q" (DeepShift-Q): a float ``weight``,
quantized to sign(w) * 2^round(log2 |w|) in every forward.  Gradients are
straight-through (DeepShift, Elhoushi et al., 2021).  ``act_bits=(int_bits, frac_bits)`` rounds the input
and the bias to fixed point.  Stochastic rounding applies in training mode only.

Path choice (``ShiftLinear``): in training, or whenever autograd needs the weight's
gradient, the layer quantizes and runs F.linear (the training path).  In inference (eval
mode, and no gradient needed for x or the parameters, outside torch.compile and autocast,
x of the parameters' dtype, parameters not made under torch.inference_mode) with at
most ``PACKED_MAX_ROWS`` input rows it packs its weight once into 4, 8 or 16-bit codes (kept
until a parameter changes: the parameters' version counters and storage are the cache
key, so writes through ``.data``, which autograd does not see either, are not seen: call
``layer.clear_packed_cache()`` after them) and runs ``shift_linear_packed`` -- when the backend that op would get is a kernel
(the cpu one reads the codes directly, ~5x faster than the dense float32 matmul at batch
1 on an 8192x8192 weight), not the reference (which would decode the weight per call).
Larger batches are compute-bound, and the dense path serves them.

Training PS nets: exclude ``shift`` and ``sign`` from weight decay and add
``wd * layer.shift_penalty()`` (0.5 * sum (2^P)^2) to the loss; use a lower lr
(about 0.01) or Adam-family optimizers for P and S.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import functional as SF
from ..reference.shift import shift_range
from ._common import ConvArgs

MODES = ("ps", "q")
PACKED_MAX_ROWS = 16  # inference batches up to this many rows take the packed path (see above)


class _ShiftBase(nn.Module):
    def _init_shift(self, shape, mode, weight_bits, act_bits, rounding, init_shift_range, factory):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not isinstance(weight_bits, int) or not 2 <= weight_bits <= 8:
            raise ValueError(f"weight_bits must be an int in [2, 8], got {weight_bits!r}")
        if rounding not in SF.ROUNDINGS:
            raise ValueError(f"rounding must be one of {SF.ROUNDINGS}, got {rounding!r}")
        self.mode, self.weight_bits, self.rounding = mode, weight_bits, rounding
        self.act_bits = SF._act_bits(act_bits)
        self._init_shift_range = init_shift_range
        if mode == "q":
            self.weight = nn.Parameter(torch.empty(shape, **factory))
        else:
            self.shift = nn.Parameter(torch.empty(shape, **factory))
            self.sign = nn.Parameter(torch.empty(shape, **factory))

    def _reset_shift(self, fan_in: int) -> None:
        if self.mode == "q":
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        else:
            lo, hi = shift_range(self.weight_bits, "ps")
            a, b = self._init_shift_range
            a, b = max(a, lo), min(b, hi)
            nn.init.uniform_(self.shift, a, max(a, b))
            nn.init.uniform_(self.sign, -1, 1)
        if self.bias is not None:
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def _params(self):
        return (self.weight, None) if self.mode == "q" else (self.shift, self.sign)

    def _shift_kwargs(self):
        p, s = self._params()
        return dict(mode=self.mode, sign=s, weight_bits=self.weight_bits, act_bits=self.act_bits,
                    rounding=self.rounding if self.training else "deterministic")

    def quantized_weight(self) -> torch.Tensor:
        """The dense power-of-two weight (deterministic rounding), with its gradient path."""
        p, s = self._params()
        return SF.quantize_pot(p, self.weight_bits, mode=self.mode, sign=s)

    def shift_penalty(self) -> torch.Tensor:
        """0.5 * sum (2^P)^2 for PS (DeepShift's replacement for weight decay); 0 for Q."""
        if self.mode == "q":
            return self.weight.new_zeros(())
        return 0.5 * torch.exp2(self.shift).square().sum()

    @torch.no_grad()
    def load_float_weight(self, weight: torch.Tensor) -> None:
        """Initialise from a float weight (DeepShift conversion): Q copies it; PS takes
        P = round(log2 |w|) clamped into range and S = sign(w).  weight: floating point,
        of this layer's weight shape."""
        shape = (self.shift if self.mode == "ps" else self.weight).shape
        if not isinstance(weight, torch.Tensor) or not weight.dtype.is_floating_point or weight.shape != shape:
            raise ValueError(f"weight must be a floating-point tensor of shape {tuple(shape)}, got "
                             f"{(weight.dtype, tuple(weight.shape)) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
        if self.mode == "q":
            self.weight.copy_(weight)
            return
        lo, hi = shift_range(self.weight_bits, "ps")
        a = weight.abs().clamp_min(2.0 ** (lo - 1))
        self.shift.copy_(torch.round(torch.log2(a)).clamp(lo, hi))
        self.sign.copy_(torch.sign(weight))

    def pack(self, code_bits=None):
        """The packed inference version of this layer (weight: 4, 8 or 16 bits per value,
        :func:`shiftadd.pack_pot`), computing this layer's eval-mode outputs.
        code_bits None picks the narrowest lossless width."""
        from . import packed

        cls = packed.PackedShiftLinear if isinstance(self, ShiftLinear) else packed.PackedShiftConv2d
        return cls.from_shift(self, code_bits)

    def _shift_repr(self) -> str:
        s = f", mode={self.mode}, weight_bits={self.weight_bits}"
        if self.act_bits is not None:
            s += f", act_bits={self.act_bits}"
        if self.rounding != "deterministic":
            s += f", rounding={self.rounding}"
        return s


class ShiftLinear(_ShiftBase):
    """Shift linear layer.  Args as :class:`torch.nn.Linear` plus ``mode``, ``weight_bits``
    (5: 1 sign + 4 shift bits), ``act_bits`` and ``rounding``.  Input (*, in_features)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, mode: str = "ps",
                 weight_bits: int = 5, act_bits=None, rounding: str = "deterministic", device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        factory = {"device": device, "dtype": dtype}
        lo, _ = shift_range(weight_bits, "ps") if 2 <= weight_bits <= 8 else (0, 0)
        self._init_shift((out_features, in_features), mode, weight_bits, act_bits, rounding, (lo, 0), factory)
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self._reset_shift(in_features)

    def reset_parameters(self) -> None:
        self._reset_shift(self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self._inference_packed(x)
        if packed is not None:
            bias = self.bias
            if self.act_bits is not None:
                x = SF.round_to_fixed(x, *self.act_bits)
                bias = None if bias is None else SF.round_to_fixed(bias, *self.act_bits)
            return SF.shift_linear_packed(x, packed, bias)
        p, _ = self._params()
        return SF.shift_linear(x, p, self.bias, **self._shift_kwargs())

    def inference_path(self, x: torch.Tensor) -> str:
        """"packed" or "dense": the path :meth:`forward` takes for this input now, and why
        (module docstring)."""
        return "packed" if self._packed_reason(x) is None else "dense"

    def _packed_reason(self, x: torch.Tensor):
        """None when the packed inference path applies to x, else why not."""
        if self.training:
            return "training mode"
        params = [t for t in self._params() if t is not None]
        if torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in params)):
            return "autograd needs the weight's gradient"
        if torch.compiler.is_compiling():
            return "under torch.compile (the cache is Python state)"
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.in_features:
            return "input shape"
        if x.numel() // max(self.in_features, 1) > PACKED_MAX_ROWS:
            return f"more than {PACKED_MAX_ROWS} rows: compute-bound, the dense path is as fast"
        if not x.dtype.is_floating_point or x.device != params[0].device:
            return "input dtype or device"
        if x.dtype != params[0].dtype:  # the dense path decides (F.linear refuses mixed dtypes)
            return f"input dtype {x.dtype} differs from the layer's {params[0].dtype}"
        if x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type):
            return "autocast (the dense path follows its dtype rules)"
        if any(t.is_inference() for t in params):
            return "the parameters are inference tensors (no version counter to keep a packed copy current)"
        from .. import _dispatch

        try:
            backend = _dispatch.select("shift_linear_packed", x)
        except _dispatch.BackendUnavailable as e:
            return str(e)
        if backend == "reference":
            return "no packed kernel for this device/dtype (the reference decodes per call)"
        return None

    def _inference_packed(self, x: torch.Tensor):
        if self._packed_reason(x) is not None:
            return None
        params = [t for t in self._params() if t is not None]
        key = (self.mode, self.weight_bits, tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in params))
        cache = getattr(self, "_packed_cache", None)
        if cache is None or cache[0] != key:
            from ..packed import pack_pot

            with torch.no_grad():
                # the cache holds detached aliases of the parameters it was built from, so their
                # memory cannot be reused by a replacement at the same address and version
                cache = (key, pack_pot(self.quantized_weight(), self.weight_bits), [t.detach() for t in params])
            self._packed_cache = cache
        return cache[1]

    def _apply(self, fn, *args, **kwargs):
        self._packed_cache = None  # .to(), .half(), ...: rebuilt on the next packed call
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):  # copy.deepcopy / pickle: not the packed copy (rebuilt on demand)
        state = dict(super().__getstate__())
        state["_packed_cache"] = None
        return state

    def clear_packed_cache(self) -> None:
        """Drops the packed copy of the weight (rebuilt on the next packed call): needed only
        after writes the parameters' version counters do not see (through ``.data``)."""
        self._packed_cache = None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
                + self._shift_repr())


class ShiftConv2d(ConvArgs, _ShiftBase):
    """Shift 2-D convolution.  Args as :class:`torch.nn.Conv2d` plus ``mode``,
    ``weight_bits``, ``act_bits`` and ``rounding``.  Input (N, C, H, W) or (C, H, W)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *, mode: str = "ps",
                 weight_bits: int = 5, act_bits=None, rounding: str = "deterministic", device=None, dtype=None):
        super().__init__()
        self._init_conv_args(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode)
        factory = {"device": device, "dtype": dtype}
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        self._init_shift(shape, mode, weight_bits, act_bits, rounding, (-10, -1), factory)
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self._reset_shift(self.in_channels // self.groups * self.kernel_size[0] * self.kernel_size[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, padding = self._pad_input(x)
        p, _ = self._params()
        return SF.shift_conv2d(x, p, self.bias, self.stride, padding, self.dilation, self.groups,
                               **self._shift_kwargs())

    def extra_repr(self) -> str:
        return self._conv_repr() + f", bias={self.bias is not None}" + self._shift_repr()
