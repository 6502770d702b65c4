"""Adder (AdderNet) layers: drop-in replacements for nn.Conv2d and nn.Linear.

``y = -sum |x - w|`` over each receptive field, weight gradient scaled adaptively per
layer (AdderNet eq. 13, ``eta``), weights initialised N(0, 1) as in AdderNet.  Put a
BatchNorm after each adder layer: the outputs are all <= 0 and scale with the fan-in.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional as SF
from ._common import ConvArgs


def _check_eta(eta):
    if eta is not None and not (isinstance(eta, (int, float)) and eta > 0):
        raise ValueError(f"eta must be a positive number or None, got {eta!r}")
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


class AdderConv2d(ConvArgs, nn.Module):
    """Adder 2-D convolution.

    Args as :class:`torch.nn.Conv2d` (bias defaults to False, as AdderNet), plus
    ``eta`` (adaptive gradient scale, 0.2 as AdderNet; None turns it off) and
    ``grad_mode`` ("addernet": full-precision weight grad and HardTanh input grad;
    "exact": sign).  Everything after ``bias`` is keyword-only (nn.Conv2d's positional
    padding_mode would otherwise land on eta).  Input (N, C, H, W) or (C, H, W); output
    (N, O, Ho, Wo).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = False, *, eta: Optional[float] = 0.2, grad_mode: str = "addernet",
                 padding_mode: str = "zeros", device=None, dtype=None):
        super().__init__()
        self._init_conv_args(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode)
        SF._check_grad_mode(grad_mode)
        self.eta, self.grad_mode = _check_eta(eta), grad_mode
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, padding = self._pad_input(x)
        w = SF.adaptive_grad_scale(self.weight, self.eta)
        return SF.adder_conv2d(x, w, self.bias, self.stride, padding, self.dilation, self.groups, self.grad_mode)

    def extra_repr(self) -> str:
        return (self._conv_repr() + f", bias={self.bias is not None}, eta={self.eta}, grad_mode={self.grad_mode}")


class AdderLinear(nn.Module):
    """Adder linear layer: ``y[..., o] = -sum_k |x[..., k] - w[o, k]| (+ bias)``.

    Args as :class:`torch.nn.Linear` (bias defaults to False), plus ``eta`` and
    ``grad_mode`` as :class:`AdderConv2d`.  Input (*, in_features); output (*, out_features).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, eta: Optional[float] = 0.2,
                 grad_mode: str = "addernet", device=None, dtype=None):
        super().__init__()
        SF._check_grad_mode(grad_mode)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = SF.adaptive_grad_scale(self.weight, self.eta)
        return SF.adder_linear(x, w, self.bias, self.grad_mode)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"eta={self.eta}, grad_mode={self.grad_mode}")


class _Int8State:
    """What the int8 adder modules share: the int8 weight and float bias buffers, the common
    scale (checked, and kept in the state dict: a module built with another calibration
    would otherwise load the integers with the wrong scale)."""

    def _init_int8(self, weight_q: torch.Tensor, dims: int, scale: float, bias: Optional[torch.Tensor]) -> None:
        if weight_q.dtype != torch.int8 or weight_q.dim() != dims:
            raise TypeError(f"weight_q must be a {dims}-D int8 tensor, got {weight_q.dtype} {tuple(weight_q.shape)}")
        if not (isinstance(scale, float) and scale > 0 and math.isfinite(scale)):
            raise ValueError(f"scale must be a positive finite float, got {scale!r}")
        self.scale = scale
        self.register_buffer("weight_q", weight_q)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def get_extra_state(self):
        return {"scale": self.scale}

    def set_extra_state(self, state):
        self.scale = float(state["scale"])

    @staticmethod
    def _check_input(x: torch.Tensor) -> None:
        if not x.dtype.is_floating_point:
            raise TypeError(f"x must be floating point, got {x.dtype}")


class AdderLinearInt8(_Int8State, nn.Module):
    """An :class:`AdderLinear` quantized for inference: int8 weights and activations on one
    common scale ``s``, the L1 sum computed exactly in integers (:func:`shiftadd.functional.adder_linear_int8`):

        x_q = clamp(round(x / s), -128, 127),  y = s * (-sum_k |x_q[k] - w_q[o, k]|) + bias.

    |x - w| = s |x_q - w_q| up to the two roundings (at most s/2 each), so the output differs
    from the float layer's by at most ``s * K`` (and much less on average).  Build it with
    :meth:`from_float`; the input is (*, in_features) float, the output the input's dtype.
    """

    def __init__(self, weight_q: torch.Tensor, scale: float, bias: Optional[torch.Tensor] = None):
        super().__init__()
        self._init_int8(weight_q, 2, scale, bias)
        self.out_features, self.in_features = weight_q.shape

    @classmethod
    @torch.no_grad()
    def from_float(cls, layer: "AdderLinear", act_absmax: float) -> "AdderLinearInt8":
        """Quantizes `layer` with ``s = max(max|W|, act_absmax) / 127``; act_absmax is the
        largest |activation| expected (e.g. measured on calibration data): larger inputs clip."""
        if not isinstance(layer, AdderLinear):
            raise TypeError(f"layer must be an AdderLinear, got {type(layer).__name__}")
        scale = _int8_scale(layer.weight, act_absmax)
        return cls(quantize_int8(layer.weight, scale), scale, layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        y = _dequantize(SF.adder_linear_int8(quantize_int8(x, self.scale), self.weight_q), self.scale, x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, scale={self.scale:.4g}, "
                f"bias={self.bias is not None}")


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
                 padding=0, dilation=1, groups: int = 1, padding_mode: str = "zeros"):
        super().__init__()
        self._init_int8(weight_q, 4, scale, bias)
        o, cg, kh, kw = weight_q.shape
        self._init_conv_args(cg * groups, o, (kh, kw), stride, padding, dilation, groups, padding_mode)

    @classmethod
    @torch.no_grad()
    def from_float(cls, layer: "AdderConv2d", act_absmax: float) -> "AdderConv2dInt8":
        """Quantizes `layer` with ``s = max(max|W|, act_absmax) / 127`` (see AdderLinearInt8)."""
        if not isinstance(layer, AdderConv2d):
            raise TypeError(f"layer must be an AdderConv2d, got {type(layer).__name__}")
        scale = _int8_scale(layer.weight, act_absmax)
        return cls(quantize_int8(layer.weight, scale), scale, layer.bias, layer.stride, layer.padding, layer.dilation,
                   layer.groups, layer.padding_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        squeeze = x.dim() == 3
        if squeeze:
            x = x.unsqueeze(0)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        pads = self._reversed_padding_repeated_twice
        xp = F.pad(x, pads, mode=mode) if any(pads) else x
        # channels-last int8, so that each patch row (kh, kw, c) copies in runs of c bytes
        # (gathering (c, kh, kw) rows from NCHW was 10x slower on a 32x16x32x32 input)
        xq = quantize_int8(xp, self.scale).permute(0, 2, 3, 1).contiguous()
        n, h, w, c = xq.shape
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        ho, wo = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
        if ho <= 0 or wo <= 0:
            raise ValueError(f"the input {tuple(x.shape)} is smaller than the (dilated) kernel")
        sn, s_h, s_w, sc = xq.stride()
        patches = xq.as_strided((n, ho, wo, kh, kw, c), (sn, s_h * sh, s_w * sw, s_h * dh, s_w * dw, sc))
        g, cg, og = self.groups, c // self.groups, self.out_channels // self.groups
        wl = self.weight_q.permute(0, 2, 3, 1)  # (O, kh, kw, C/groups): the patch rows' order
        outs = []
        for i in range(g):
            cols = patches[..., i * cg:(i + 1) * cg].reshape(n * ho * wo, kh * kw * cg)
            wg = wl[i * og:(i + 1) * og].reshape(og, kh * kw * cg)
            outs.append(SF.adder_linear_int8(cols, wg).view(n, ho, wo, og))
        y = _dequantize(torch.cat(outs, dim=3).permute(0, 3, 1, 2), self.scale, x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype).view(1, -1, 1, 1)
        y = y.contiguous()
        return y.squeeze(0) if squeeze else y

    def extra_repr(self) -> str:
        return self._conv_repr() + f", scale={self.scale:.4g}, bias={self.bias is not None}"


def _int8_scale(weight: torch.Tensor, act_absmax: float) -> float:
    if not (isinstance(act_absmax, (int, float)) and act_absmax >= 0 and math.isfinite(act_absmax)):
        raise ValueError(f"act_absmax must be a finite number >= 0, got {act_absmax!r}")
    top = max(float(weight.abs().max()) if weight.numel() else 0.0, float(act_absmax))
    return (top / 127.0) if top > 0 else 1.0


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def quantize_int8(t: torch.Tensor, scale: float) -> torch.Tensor:
    """clamp(round(t / scale), -128, 127) as int8 (round half to even), divided in float32
    (float64 for float64 t): a 16-bit quotient would be rounded before the rounding to an integer."""
    return torch.round(t.to(_wide(t.dtype)) / scale).clamp_(-128, 127).to(torch.int8)


def _dequantize(y: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """scale * y (int32) in float32 (float64 for float64), then rounded once to dtype (a
    float16 cast of the integer sum itself would overflow past 65504)."""
    return (y.to(_wide(dtype)) * scale).to(dtype)


@torch.no_grad()
def quantize_adders_int8(model: nn.Module, calibration) -> nn.Module:
    """Replaces every AdderLinear / AdderConv2d of `model` (in place) by its int8 version,
    each with the scale ``max(max|W|, max|input|) / 127`` where max|input| is measured by
    running `model` on each batch of `calibration` (an iterable of inputs, or of tuples
    whose first element is the input).  Returns the model (in eval mode), or the int8 layer
    when `model` is itself an adder layer."""
    adders = {name: m for name, m in model.named_modules() if isinstance(m, (AdderLinear, AdderConv2d))}
    if not adders:
        return model
    seen = {name: 0.0 for name in adders}
    hooks = []
    for name, m in adders.items():
        def hook(mod, args, name=name):
            seen[name] = max(seen[name], float(args[0].detach().abs().max()) if args[0].numel() else 0.0)
        hooks.append(m.register_forward_pre_hook(hook))
    model.eval()
    batches = 0
    try:
        for batch in calibration:
            model(batch[0] if isinstance(batch, (tuple, list)) else batch)
            batches += 1
    finally:
        for h in hooks:
            h.remove()
    if batches == 0:
        raise ValueError("calibration gave no batch")
    for name, m in adders.items():
        q = (AdderLinearInt8 if isinstance(m, AdderLinear) else AdderConv2dInt8).from_float(m, seen[name])
        if name == "":  # the model is itself one adder layer
            return q
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.rsplit(".", 1)[-1], q)
    return model
