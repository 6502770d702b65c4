"""Adder (AdderNet) layers: drop-in replacements for nn.Conv2d and nn.Linear.

``y = -sum |x - w|`` over each receptive field, weight gradient scaled adaptively per
layer (AdderNet eq. 13, ``eta``), weights initialised N(0, 1) as in AdderNet.  Put a
BatchNorm after each adder layer: the outputs are all <= 0 and scale with the fan-in.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import is_fake

from .. import functional as SF
from .. import thermometer
from ._common import ConvArgs, recalibrate_bn, replace_modules


def _check_eta(eta):
    if eta is not None and not (isinstance(eta, (int, float)) and not isinstance(eta, bool) and eta > 0
                                and math.isfinite(eta)):
        raise ValueError(f"eta must be a positive finite number or None, got {eta!r}")
    return None if eta is None else float(eta)


@torch.no_grad()
def renormalize_eta_grads(model: nn.Module) -> None:
    """Re-applies AdderNet's gradient scaling to every adder layer's weight gradient:
    ``g <- eta * sqrt(numel) * g / ||g||``.

    The scaling inside autograd makes the gradient's size independent of the loss's, so
    a loss scaler (torch.amp.GradScaler) that unscales afterwards would shrink it by the
    scale; call this after ``scaler.unscale_(optimizer)`` and before ``scaler.step``.
    Non-finite gradients are left as they are (the scaler skips that step)."""
    for m in model.modules():
        if isinstance(m, (AdderConv2d, AdderLinear)) and m.eta is not None and m.weight.grad is not None:
            g = m.weight.grad
            norm = torch.linalg.vector_norm(g)
            if torch.isfinite(norm):
                g.mul_(m.eta * math.sqrt(g.numel()) / norm.clamp_min(1e-12))


def _accumulate_repr(accumulate: str) -> str:
    return "" if accumulate == "fp32" else f", accumulate={accumulate}"


class AdderConv2d(ConvArgs, nn.Module):
    """Adder 2-D convolution.

    Args as :class:`torch.nn.Conv2d` (bias defaults to False, as AdderNet), plus
    ``eta`` (adaptive gradient scale, 0.2 as AdderNet; None turns it off) and
    ``grad_mode`` ("addernet": full-precision weight grad and HardTanh input grad;
    "exact": sign) and ``accumulate`` ("fp32", or "fp16x2": float16 inputs may be summed
    in half2 arithmetic, see :func:`shiftadd.functional.adder_linear`).  ``padding_mode``
    follows ``bias`` as in nn.Conv2d; the arguments after it are keyword-only.  Input
    (N, C, H, W) -> (N, O, Ho, Wo), or (C, H, W) -> (O, Ho, Wo).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = False, padding_mode: str = "zeros", *, eta: Optional[float] = 0.2,
                 grad_mode: str = "addernet", accumulate: str = "fp32", device=None, dtype=None):
        super().__init__()
        self._init_conv_args(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode)
        SF._check_grad_mode(grad_mode)
        SF._check_accumulate(accumulate)
        self.eta, self.grad_mode, self.accumulate = _check_eta(eta), grad_mode, accumulate
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    # (scale, bits) while the layer trains with its int8 quantization in the loop
    # (fake_quantize_adders); None: float.  Not part of the state dict.
    quant: Optional[tuple] = None
    accumulate: str = "fp32"  # class default: modules pickled before the argument existed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, padding = self._pad_input(x)
        w = SF.adaptive_grad_scale(self.weight, self.eta)
        if self.quant is not None:
            x, w = fake_quantize(x, *self.quant), fake_quantize(w, *self.quant)
        return SF.adder_conv2d(x, w, self.bias, self.stride, padding, self.dilation, self.groups, self.grad_mode,
                               self.accumulate)

    def extra_repr(self) -> str:
        return (self._conv_repr() + f", bias={self.bias is not None}, eta={self.eta}, grad_mode={self.grad_mode}"
                + _accumulate_repr(self.accumulate))


class AdderLinear(nn.Module):
    """Adder linear layer: ``y[..., o] = -sum_k |x[..., k] - w[o, k]| (+ bias)``.

    Args as :class:`torch.nn.Linear` (bias defaults to False), plus ``eta``, ``grad_mode``
    and ``accumulate`` as :class:`AdderConv2d`.  Input (*, in_features); output (*, out_features).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, eta: Optional[float] = 0.2,
                 grad_mode: str = "addernet", accumulate: str = "fp32", device=None, dtype=None):
        super().__init__()
        SF._check_grad_mode(grad_mode)
        SF._check_accumulate(accumulate)
        self.accumulate = accumulate
        self.in_features, self.out_features = in_features, out_features
        self.eta, self.grad_mode = _check_eta(eta), grad_mode
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    quant: Optional[tuple] = None  # as AdderConv2d.quant
    accumulate: str = "fp32"       # as AdderConv2d.accumulate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = SF.adaptive_grad_scale(self.weight, self.eta)
        if self.quant is not None:
            x, w = fake_quantize(x, *self.quant), fake_quantize(w, *self.quant)
        return SF.adder_linear(x, w, self.bias, self.grad_mode, self.accumulate)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"eta={self.eta}, grad_mode={self.grad_mode}" + _accumulate_repr(self.accumulate))


class _Int8State:
    """What the int8 adder modules share: the int8 weight and float bias buffers, the common
    scale and the bit width (checked, and kept in the state dict: a module built with
    another calibration would otherwise load the integers with the wrong scale), and the
    adder call on quantized rows (:meth:`_adder_q`)."""

    def _init_int8(self, weight_q: torch.Tensor, dims: int, scale: float, bias: Optional[torch.Tensor],
                   bits: int) -> None:
        if weight_q.dtype != torch.int8 or weight_q.dim() != dims:
            raise TypeError(f"weight_q must be a {dims}-D int8 tensor, got {weight_q.dtype} {tuple(weight_q.shape)}")
        if not (isinstance(scale, float) and scale > 0 and math.isfinite(scale)):
            raise ValueError(f"scale must be a positive finite float, got {scale!r}")
        thermometer.check_bits(bits)
        thermometer.check_range("weight_q", weight_q, bits)
        self.scale, self.bits = scale, bits
        self.register_buffer("weight_q", weight_q)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._clear_cache()

    # The weight as (O, K) rows in the order of the input's columns, and the thermometer
    # codes of row ranges (L bytes per weight), are built on first use and kept while
    # weight_q is the same tensor object, unwritten (its _version counts in-place writes);
    # the cache holds that object, so a new tensor at a freed one's address is never
    # mistaken for it.  Moving the module (.to, .cuda, .half: _apply) drops the cache.
    def _clear_cache(self) -> None:
        self._rows = None  # (weight_q, its _version, the (O, K) rows)
        self._codes = {}   # (first row, end row, bits) -> codes, for self._rows

    def _apply(self, fn, *args, **kwargs):
        self._clear_cache()
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):  # copy.deepcopy / pickle: not the caches (rebuilt on demand)
        state = dict(super().__getstate__())
        state["_rows"], state["_codes"] = None, {}
        return state

    def get_extra_state(self):
        return {"scale": self.scale, "bits": self.bits}

    def set_extra_state(self, state):
        # checked as the constructor checks them (load_state_dict has loaded weight_q already)
        scale, bits = state["scale"], state.get("bits", 8)
        if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0 and math.isfinite(scale)):
            raise ValueError(f"the state's scale must be a positive finite float, got {scale!r}")
        thermometer.check_bits(bits)
        if self.weight_q.device.type != "meta":
            thermometer.check_range("weight_q", self.weight_q, bits)
        self.scale, self.bits = float(scale), bits
        self._clear_cache()

    def _quantize(self, t: torch.Tensor) -> torch.Tensor:
        return quantize_int8(t, self.scale, self.bits)

    def _rows_of(self, w: torch.Tensor) -> torch.Tensor:
        return w  # a linear weight is its rows; the conv overrides this

    def _cacheable(self) -> bool:
        # no cache under torch.compile (a version check would be a data-dependent guard) nor
        # for an inference tensor (made under torch.inference_mode: it has no version counter)
        return not torch.compiler.is_compiling() and not self.weight_q.is_inference()

    def _weight_rows(self) -> torch.Tensor:
        w = self.weight_q
        if not self._cacheable():
            return self._rows_of(w)
        if self._rows is None or self._rows[0] is not w or self._rows[1] != w._version:
            self._clear_cache()
            self._rows = (w, w._version, self._rows_of(w))
        return self._rows[2]

    def _adder_q(self, xq: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """xq (M, K) int8 on this module's grid, against rows [lo, hi) of the weight ->
        (M, hi - lo) int32 = -sum |xq - w|.  The inputs are in range by construction (the
        quantizer clamps them); the weight rows are checked when their codes are built."""
        w2 = self._weight_rows()[lo:hi]
        if thermometer.choose("auto", xq.device, self.bits) != "thermometer":
            return SF.adder_linear_int8(xq, w2)
        key = (lo, hi, self.bits)
        codes = self._codes.get(key) if self._cacheable() else None
        if codes is None:
            thermometer.check_range("weight_q", w2, self.bits)
            thermometer.check_size(w2.shape[1], self.bits)
            codes = thermometer.weight_codes(w2, self.bits)
            if self._cacheable():
                self._codes[key] = codes
        return thermometer.adder_linear_codes(xq, codes, self.bits, hi - lo)

    @staticmethod
    def _check_input(x: torch.Tensor) -> None:
        if not x.dtype.is_floating_point:
            raise TypeError(f"x must be floating point, got {x.dtype}")

    @staticmethod
    def _may_be_non_finite(x: torch.Tensor) -> bool:
        """Whether to build the non-finite masks: in eager mode when the float32 sum of x is
        not finite (one cheap reduction; a finite overflow only costs the masks); traced
        (torch.compile, export, fake or meta tensors) always, since a branch on the data
        cannot be traced."""
        if x.numel() == 0:
            return False
        if x.device.type == "meta" or torch.compiler.is_compiling() or is_fake(x):
            return True
        return not bool(torch.isfinite(torch.sum(x, dtype=_wide(x.dtype))))

    @staticmethod
    def _non_finite(y: torch.Tensor, nan: torch.Tensor, inf: torch.Tensor) -> torch.Tensor:
        """y where the float layer's output would not be finite: NaN where an input it reads
        is NaN, else -inf where one is infinite (|inf - w| = inf), as the float layer (the
        quantizer would have clamped them to the grid)."""
        return torch.where(nan, float("nan"), torch.where(inf, float("-inf"), y))


class AdderLinearInt8(_Int8State, nn.Module):
    """An :class:`AdderLinear` quantized for inference: int8 weights and activations on one
    common scale ``s``, the L1 sum computed exactly in integers (:func:`shiftadd.functional.adder_linear_int8`):

        x_q = clamp(round(x / s), lo, hi),  y = s * (-sum_k |x_q[k] - w_q[o, k]|) + bias,

    with (lo, hi) = (-128, 127) for ``bits=8``, or the range of a smaller bit width (2..4,
    e.g. -8..7 at 4 bits; the thermometer-code int8 product can then run it, see
    :mod:`shiftadd.thermometer`).  |x - w| = s |x_q - w_q| up to the two roundings (at most
    s/2 each), so the output differs from the float layer's by at most ``s * K`` (and much
    less on average).  Build it with :meth:`from_float`; the input is (*, in_features)
    float, the output the input's dtype.
    """

    def __init__(self, weight_q: torch.Tensor, scale: float, bias: Optional[torch.Tensor] = None, bits: int = 8):
        super().__init__()
        self._init_int8(weight_q, 2, scale, bias, bits)
        self.out_features, self.in_features = weight_q.shape

    @classmethod
    @torch.no_grad()
    def from_float(cls, layer: "AdderLinear", act_absmax: float, bits: int = 8) -> "AdderLinearInt8":
        """Quantizes `layer` with ``s = max(max|W|, act_absmax) / (2^(bits-1) - 1)`` (127 at 8
        bits); act_absmax is the largest |activation| expected (e.g. measured on calibration
        data): larger inputs clip."""
        if not isinstance(layer, AdderLinear):
            raise TypeError(f"layer must be an AdderLinear, got {type(layer).__name__}")
        thermometer.check_bits(bits)
        scale = _int8_scale(layer.weight, act_absmax, bits)
        return cls(quantize_int8(layer.weight, scale, bits), scale, layer.bias, bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must be (..., {self.in_features}), got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        xq = self._quantize(x).reshape(math.prod(lead), self.in_features)
        y = _dequantize(self._adder_q(xq, 0, self.out_features), self.scale, x.dtype).reshape(*lead, self.out_features)
        if self._may_be_non_finite(x):
            y = self._non_finite(y, torch.isnan(x).any(-1, keepdim=True), torch.isinf(x).any(-1, keepdim=True))
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, scale={self.scale:.4g}, "
                f"bits={self.bits}, bias={self.bias is not None}")


class AdderConv2dInt8(_Int8State, ConvArgs, nn.Module):
    """An :class:`AdderConv2d` quantized for inference, exact in integers on one common scale
    ``s`` for activations and weights (as :class:`AdderLinearInt8`): the (padded) input is
    quantized to int8, its patches are gathered into an int8 column matrix (N Ho Wo rows
    of C/groups kh kw bytes: an im2col, a quarter of float32's size), and each group is one
    :func:`shiftadd.functional.adder_linear_int8` call.  Any stride, padding (mode),
    dilation and groups.  Build it with :meth:`from_float`; input (N, C, H, W) or (C, H, W)
    float, output the input's dtype.
    """

    def __init__(self, weight_q: torch.Tensor, scale: float, bias: Optional[torch.Tensor] = None, stride=1,
                 padding=0, dilation=1, groups: int = 1, padding_mode: str = "zeros", bits: int = 8):
        super().__init__()
        self._init_int8(weight_q, 4, scale, bias, bits)
        o, cg, kh, kw = weight_q.shape
        self._init_conv_args(cg * groups, o, (kh, kw), stride, padding, dilation, groups, padding_mode)

    @classmethod
    @torch.no_grad()
    def from_float(cls, layer: "AdderConv2d", act_absmax: float, bits: int = 8) -> "AdderConv2dInt8":
        """Quantizes `layer` with ``s = max(max|W|, act_absmax) / (2^(bits-1) - 1)`` (see AdderLinearInt8)."""
        if not isinstance(layer, AdderConv2d):
            raise TypeError(f"layer must be an AdderConv2d, got {type(layer).__name__}")
        thermometer.check_bits(bits)
        scale = _int8_scale(layer.weight, act_absmax, bits)
        return cls(quantize_int8(layer.weight, scale, bits), scale, layer.bias, layer.stride, layer.padding,
                   layer.dilation, layer.groups, layer.padding_mode, bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        squeeze = x.dim() == 3
        if squeeze:
            x = x.unsqueeze(0)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        # the padded input, quantized, channels-last, so that each patch row (kh, kw, c) copies
        # in runs of c bytes (gathering (c, kh, kw) rows from NCHW was 10x slower on a
        # 32x16x32x32 input)
        pads = self._reversed_padding_repeated_twice
        if self.padding_mode == "zeros":  # zero quantizes to 0: pad after quantizing, in int8
            n, c, h, w = x.shape
            xq = torch.zeros((n, h + pads[2] + pads[3], w + pads[0] + pads[1], c), dtype=torch.int8,
                             device=x.device)
            xq[:, pads[2]:pads[2] + h, pads[0]:pads[0] + w].copy_(self._quantize(x).permute(0, 2, 3, 1))
        else:
            xq = self._quantize(self._pad_input(x)[0]).permute(0, 2, 3, 1).contiguous()
        n, h, w, c = xq.shape
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        ho, wo = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
        if ho <= 0 or wo <= 0:
            raise ValueError(f"the input {tuple(x.shape)} is smaller than the (dilated) kernel")
        sn, s_h, s_w, sc = xq.stride()
        patches = xq.as_strided((n, ho, wo, kh, kw, c), (sn, s_h * sh, s_w * sw, s_h * dh, s_w * dw, sc))
        g, cg, og = self.groups, c // self.groups, self.out_channels // self.groups
        # scale * the int32 sums in float32 (float64 for float64), NCHW, in one buffer
        y = torch.empty((n, self.out_channels, ho, wo), dtype=_wide(x.dtype), device=x.device)
        for i in range(g):
            cols = patches[..., i * cg:(i + 1) * cg].reshape(n * ho * wo, kh * kw * cg)
            y[:, i * og:(i + 1) * og].copy_(self._adder_q(cols, i * og, (i + 1) * og).view(n, ho, wo, og)
                                            .permute(0, 3, 1, 2))
        y.mul_(self.scale)
        y = y.to(x.dtype)  # rounded once (a 16-bit copy of the sums themselves would overflow)
        if self._may_be_non_finite(x):
            y = self._non_finite(y, self._reads(torch.isnan(x)), self._reads(torch.isinf(x)))
        if self.bias is not None:
            y.add_(self.bias.to(x.dtype).view(1, -1, 1, 1))
        return y.squeeze(0) if squeeze else y

    def _reads(self, flag: torch.Tensor) -> torch.Tensor:
        """flag (N, C, H, W) bool -> (N, O, Ho, Wo) bool: whether an output reads a flagged
        input (through the padding mode), as a convolution of counts over each group."""
        f = flag.to(torch.float32)
        pads = self._reversed_padding_repeated_twice
        f = F.pad(f, pads) if self.padding_mode == "zeros" else F.pad(f, pads, mode=self.padding_mode)
        g, cg = self.groups, self.in_channels // self.groups
        ones = torch.ones((g, cg, *self.kernel_size), dtype=torch.float32, device=f.device)
        hits = F.conv2d(f, ones, None, self.stride, 0, self.dilation, g) > 0
        return hits.repeat_interleave(self.out_channels // g, dim=1)

    def _rows_of(self, w: torch.Tensor) -> torch.Tensor:
        """(O, kh kw C/groups) rows in the patch rows' (kh, kw, c) order."""
        return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1).contiguous()

    def extra_repr(self) -> str:
        return self._conv_repr() + f", scale={self.scale:.4g}, bits={self.bits}, bias={self.bias is not None}"


def _int8_scale(weight: torch.Tensor, act_absmax: float, bits: int = 8) -> float:
    if isinstance(act_absmax, torch.Tensor) and act_absmax.numel() == 1 and not act_absmax.dtype == torch.bool:
        act_absmax = act_absmax.item()  # e.g. x.abs().max()
    elif isinstance(act_absmax, numbers.Real) and not isinstance(act_absmax, bool):
        act_absmax = float(act_absmax)  # numpy scalars
    if not (isinstance(act_absmax, (int, float)) and act_absmax >= 0 and math.isfinite(act_absmax)):
        raise ValueError(f"act_absmax must be a finite number >= 0, got {act_absmax!r}")
    top = max(float(weight.abs().max()) if weight.numel() else 0.0, float(act_absmax))
    return (top / float(thermometer.value_range(bits)[1])) if top > 0 else 1.0


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def quantize_int8(t: torch.Tensor, scale: float, bits: int = 8) -> torch.Tensor:
    """clamp(round(t / scale), lo, hi) as int8 (round half to even), (lo, hi) = (-128, 127)
    or the bits-bit signed range, divided in float32 (float64 for float64 t): a 16-bit
    quotient would be rounded before the rounding to an integer."""
    thermometer.check_bits(bits)
    lo, hi = thermometer.value_range(bits)
    return (t.to(_wide(t.dtype)) / scale).round_().clamp_(lo, hi).to(torch.int8)


def _dequantize(y: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """scale * y (int32) in float32 (float64 for float64), then rounded once to dtype (a
    float16 cast of the integer sum itself would overflow past 65504)."""
    return (y.to(_wide(dtype)) * scale).to(dtype)


# clip factors tried by quantize_adders_int8(clip="mse"): the grid's top is this fraction of
# max(max|W|, max|x|) (at 4 bits the best on a digits ResNet-20 ranged over 0.16-0.65)
CLIP_FACTORS = (1.0, 0.8, 0.65, 0.5, 0.4, 0.3, 0.22, 0.16, 0.12)
CLIP_SAMPLES = 256  # calibration samples per layer the clip search runs on


def fake_quantize(t: torch.Tensor, scale: float, bits: int) -> torch.Tensor:
    """The values the int8 layer computes with, ``clamp(round(t / s), lo, hi) * s`` (as
    :func:`quantize_int8`), with a straight-through gradient: 1 inside the grid's range,
    0 where t clips.  Same shape and dtype as t."""
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be a positive finite float, got {scale!r}")
    lo, hi = thermometer.value_range(bits)
    q = quantize_int8(t.detach(), scale, bits).to(_wide(t.dtype)).mul_(scale).to(t.dtype)
    tc = t.clamp(lo * scale, hi * scale)
    return tc + (q - tc).detach()


def _adders(model: nn.Module) -> dict:
    return {name: m for name, m in model.named_modules() if isinstance(m, (AdderLinear, AdderConv2d))}


class _FloatForward:
    """Within: every layer of `adders` computes in float (quant None) and `model` is in eval
    mode; on exit each layer's quant and each module's train/eval flag are as before."""

    def __init__(self, model: nn.Module, adders: dict):
        self.model, self.adders = model, adders

    def __enter__(self):
        self.quant = {name: m.quant for name, m in self.adders.items()}
        self.modes = {m: m.training for m in self.model.modules()}
        for m in self.adders.values():
            m.quant = None
        self.model.eval()

    def __exit__(self, *exc):
        for name, m in self.adders.items():
            m.quant = self.quant[name]
        for m, mode in self.modes.items():
            m.training = mode
        return False


def _check_calibration_args(bits: int, clip: Optional[str]) -> str:
    thermometer.check_bits(bits)
    clip = clip or ("max" if bits == 8 else "mse")
    if clip not in ("max", "mse"):
        raise ValueError(f"clip must be 'max' or 'mse', got {clip!r}")
    return clip


@torch.no_grad()
def _calibrate(model: nn.Module, adders: dict, calibration, bits: int, clip: str, keep: bool) -> tuple:
    """({name: scale} for `adders`, the calibration inputs if `keep`), from running `model`
    on `calibration` (inside _FloatForward); see quantize_adders_int8 for the two clip rules."""
    seen = {name: 0.0 for name in adders}
    kept = {name: [] for name in adders}  # the clip search's samples: (rows, K) or (N, C, H, W) copies

    def hook(mod, args, name):
        x = args[0].detach()
        seen[name] = max(seen[name], float(x.abs().max()) if x.numel() else 0.0)
        if clip != "mse" or x.numel() == 0:
            return
        x = x.reshape(-1, x.shape[-1]) if isinstance(mod, AdderLinear) else (x.unsqueeze(0) if x.dim() == 3 else x)
        have = sum(t.shape[0] for t in kept[name])
        if have < CLIP_SAMPLES and (not kept[name] or kept[name][0].shape[1:] == x.shape[1:]):
            kept[name].append(x[:CLIP_SAMPLES - have].clone())  # a copy: a view would hold the whole batch

    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: hook(mod, args, name))
             for name, m in adders.items()]
    batches, count = [], 0
    try:
        for b in calibration if calibration is not None else ():
            x = b[0] if isinstance(b, (tuple, list)) else b
            model(x)
            count += 1
            if keep:
                batches.append(x)
    finally:
        for h in hooks:
            h.remove()
    if count == 0:
        raise ValueError("calibration gave no batch")
    scales = {}
    for name, m in adders.items():
        scales[name] = _int8_scale(m.weight, seen[name], bits)
        if clip == "mse" and kept[name]:
            scales[name] = _best_clip(m, scales[name], torch.cat(kept[name]), bits)
    return scales, batches


def _int8_layer(m, scale: float, bits: int):
    w = quantize_int8(m.weight, scale, bits)
    if isinstance(m, AdderLinear):
        return AdderLinearInt8(w, scale, m.bias, bits)
    return AdderConv2dInt8(w, scale, m.bias, m.stride, m.padding, m.dilation, m.groups, m.padding_mode, bits)


def _best_clip(layer, top_scale: float, xs: torch.Tensor, bits: int) -> float:
    """Among top_scale times each of CLIP_FACTORS, the scale whose int8 layer's output on xs
    is closest to `layer`'s float output (called inside _FloatForward, so `layer` computes in
    float), the error of each output channel over its variance."""
    y = layer(xs)  # (rows, O) or (N, O, Ho, Wo)
    dims = [d for d in range(y.dim()) if d != 1]
    per_channel = y.numel() // max(y.shape[1], 1)
    var = y.var(dim=dims, keepdim=True).clamp_min(1e-12) if per_channel > 1 else torch.ones_like(y)
    best = None
    for f in CLIP_FACTORS:
        err = float(((_int8_layer(layer, top_scale * f, bits)(xs) - y) ** 2 / var).mean())
        if best is None or err < best[0]:
            best = (err, top_scale * f)
    return best[1]


def fake_quantize_adders(model: nn.Module, calibration, bits: int = 4, clip: Optional[str] = None) -> nn.Module:
    """Puts every AdderLinear / AdderConv2d of `model` into quantization-aware training:
    each gets a scale from `calibration` (as :func:`quantize_adders_int8` picks it) and from
    then on computes with its inputs and weights on that int8 grid (:func:`fake_quantize`,
    straight-through gradients) until ``layer.quant = None``.  Train (fine-tune) the model
    this way, then :func:`quantize_adders_int8` converts it with the same scales and no
    recalibration, so the integer model computes what the trained one did.  The scales are
    attributes, not state: after loading a checkpoint call this again.

    Measured on the ResNet-20 AdderNet of quantize_adders_int8's figures (float 0.947 /
    0.958 after 15 epochs), this, 15 more epochs at lr 0.02, then the conversion: test
    accuracy 0.939 / 0.947 at 4 bits, 0.917 / 0.911 at 3, 0.828 / 0.817 at 2 (5 epochs at
    lr 0.01: 0.903 / 0.917, 0.850 / 0.842, 0.636 / 0.542).  The integer model scored what
    the fake-quantized one did (one test image apart at most)."""
    clip = _check_calibration_args(bits, clip)
    adders = _adders(model)
    if not adders:
        return model
    with _FloatForward(model, adders):  # calibrate on the float layers
        scales, _ = _calibrate(model, adders, calibration, bits, clip, keep=False)
    for name, m in adders.items():
        m.quant = (scales[name], bits)
    return model


@torch.no_grad()
def quantize_adders_int8(model: nn.Module, calibration, bits: int = 8, clip: Optional[str] = None,
                         recalibrate: Optional[bool] = None) -> nn.Module:
    """Replaces every AdderLinear / AdderConv2d of `model` (in place) by its int8 version.

    calibration: an iterable of inputs (or of tuples whose first element is the input),
    run through `model` to see each adder layer's inputs (None is allowed when every layer
    carries a scale from :func:`fake_quantize_adders` and nothing is recalibrated).  bits:
    8, or 2..4 (values of that many bits, for the thermometer-code product on CUDA).  Each
    layer gets one scale ``s`` for its activations and weights (its grid is
    s * (-2^(bits-1) .. 2^(bits-1) - 1)): the one it trained with under
    :func:`fake_quantize_adders` (same bits), else

    * clip "max" (the default at 8 bits): ``s = max(max|W|, max|input|) / (2^(bits-1) - 1)``,
      nothing clips;
    * clip "mse" (the default below 8 bits): the grid's top is chosen among
      :data:`CLIP_FACTORS` of that maximum, as the one whose layer output on the first
      :data:`CLIP_SAMPLES` calibration samples is closest to the float layer's (squared
      error over each output channel's variance: the BatchNorm after an adder divides by
      it).  At 4 bits few values reach the maximum, and a grid spanning it leaves most
      weights on 0 or +-1.

    recalibrate (default: True below 8 bits unless every layer trained with its
    quantization): afterwards, re-estimate the statistics of every BatchNorm of `model` on
    the calibration batches (the quantized sums of |x - w| carry a rounding bias that
    BatchNorm then removes).

    Measured on a ResNet-20 AdderNet trained on digits (15 epochs, 20 adder layers, 4
    calibration batches of 256 training images; test accuracy, seeds 0 / 1): float
    0.947 / 0.958; 8 bits 0.956 / 0.953; 4 bits 0.847 / 0.883 (clip "max" without
    recalibration: 0.100 / 0.072; "mse" alone 0.308 / 0.428; recalibration alone 0.436 /
    0.547); 3 bits 0.697 / 0.689; 2 bits 0.142 / 0.233.  Below 8 bits post-training
    quantization loses accuracy on adder nets; :func:`fake_quantize_adders` and a few
    epochs of fine-tuning recover most of it (4 bits: 0.939 / 0.947 after 15 epochs).

    Returns the model (in eval mode), or the int8 layer when `model` is itself an adder layer.
    """
    clip = _check_calibration_args(bits, clip)
    if recalibrate is not None and not isinstance(recalibrate, bool):
        raise TypeError(f"recalibrate must be True, False or None, got {recalibrate!r}")
    adders = _adders(model)
    if not adders:
        return model
    trained = {name: m.quant[0] for name, m in adders.items() if m.quant is not None and m.quant[1] == bits}
    recalibrate = (bits < 8 and len(trained) < len(adders)) if recalibrate is None else recalibrate
    todo = {name: m for name, m in adders.items() if name not in trained}
    if (todo or recalibrate) and calibration is None:
        why = (f"{len(todo)} adder layer(s) have no scale trained at {bits} bits (fake_quantize_adders): "
               f"{sorted(todo)[:3]}" if todo else "recalibrate=True needs the calibration batches")
        raise ValueError(f"calibration is None, but {why}")
    scales, batches = dict(trained), []
    if todo or recalibrate:
        with _FloatForward(model, adders):  # the float layers' inputs, as the clip rules expect
            found, batches = _calibrate(model, todo, calibration, bits, clip, keep=recalibrate)
        scales.update(found)
    replaced = {name: _int8_layer(m, scales[name], bits) for name, m in adders.items()}
    if "" in replaced:  # the model is itself one adder layer
        return replaced[""]
    # every use of a shared layer (named_modules lists it once) gets the one int8 layer
    replace_modules(model, {id(adders[name]): q for name, q in replaced.items()})
    if recalibrate:
        try:
            recalibrate_bn(model, model, batches)
        except ValueError as e:  # BatchNorm in training mode on one value per channel
            raise ValueError(f"recalibrate=True re-estimates the BatchNorm statistics on the calibration batches, "
                             f"which failed ({e}); give batches of more than one sample, or recalibrate=False") from e
    return model.eval()
