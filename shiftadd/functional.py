"""Public functional API: argument checks, autocast, then one registered op per call.

Adder (AdderNet) layers, ``Y = -sum |X - W| (+ bias)``:

* :func:`adder_linear`  x (*, K), weight (O, K), bias (O,) -> (*, O)
* :func:`adder_conv2d`  x (N, C, H, W) or (C, H, W), weight (O, C/groups, kh, kw) -> (N, O, Ho, Wo)
* :func:`adder_linear_int8`  x (*, K) int8, weight (O, K) int8 -> (*, O) int32, exact (inference;
  ``bits=2..4`` for low-bit values, which may run as a thermometer-code int8 product)

Shift (DeepShift) layers: a power-of-two weight, then an ordinary matmul/conv (the
weight is exact in any float dtype):

* :func:`quantize_pot`, :func:`round_to_fixed`, :func:`shift_linear`, :func:`shift_conv2d`
* :func:`shift_linear_packed`, :func:`shift_linear_int`: inference with a packed weight
  (:func:`shiftadd.pack_pot`), in floating point or exactly in integers

dtypes: float16, bfloat16, float32, float64 (x, weight and bias alike; float16/bfloat16
accumulate in float32, except float16 adders with ``accumulate="fp16x2"``, which sum
chunks of 16 terms in float16 where a kernel for it runs).  Under autocast the adder ops run in float32 (autocast's policy
for torch.cdist, the other L1 reduction): an adder output is a large negative sum whose
spread across a channel is small, and BatchNorm after it would see that spread rounded
away in a 16-bit output (measured: 2.6-3.5 % error after BN in bfloat16).
"""

from __future__ import annotations

import math
import operator
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from . import _dispatch, _ops
from .reference.adder import GRAD_MODES
from .reference.shift import QUANT_OUT_DTYPES

SHIFT_MODES = ("q", "ps", "pot")
ROUNDINGS = ("deterministic", "stochastic")

IntPair = Union[int, Sequence[int]]


# --------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32, float64), got {t.dtype}")


def _check_same(name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    if t.device != x.device:
        raise RuntimeError(f"{name} is on {t.device} but x is on {x.device}; move both to one device")
    if t.dtype != x.dtype:
        raise TypeError(f"{name} dtype {t.dtype} does not match x dtype {x.dtype}")


def _check_grad_mode(grad_mode: str) -> None:
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")


def _pair(name: str, v: IntPair, minimum: int) -> tuple:
    given = v

    def bad():
        return ValueError(f"{name} must be an int or a pair of ints, got {given!r}")

    def as_int(i):
        if isinstance(i, bool):
            raise bad()
        try:
            return operator.index(i)
        except TypeError:
            raise bad() from None

    if isinstance(v, (str, bytes)) or v is None:
        raise bad()
    try:
        items = list(v)  # tuples, lists, torch.Size, ranges, arrays, tensors
    except TypeError:
        items = [v, v]
    if len(items) != 2:
        raise bad()
    v = tuple(as_int(i) for i in items)
    if min(v) < minimum:
        what = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"{name} must be {what}, got {v}")
    return v


def _check_bias(bias, out_features: int, x: torch.Tensor) -> None:
    if bias is None:
        return
    _check_tensor("bias", bias)
    _check_same("bias", bias, x)
    if bias.shape != (out_features,):
        raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")


def _autocast(*tensors, accumulate: str = "fp32"):
    """Under autocast, float32 (see the module docstring), or float16 when the layer asked
    for fp16x2 arithmetic and autocast computes in float16; else unchanged."""
    x = tensors[0]
    dev = x.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        half = accumulate == "fp16x2" and torch.get_autocast_dtype(dev) == torch.float16
        dt = torch.float16 if half else torch.float32
        return tuple(None if t is None else t.to(dt) for t in tensors)
    return tensors


def _check_accumulate(accumulate: str) -> None:
    if accumulate not in _dispatch.ACCUMULATE:
        raise ValueError(f"accumulate must be one of {_dispatch.ACCUMULATE}, got {accumulate!r}")


# --------------------------------------------------------------------------------------
# adder
# --------------------------------------------------------------------------------------


def adder_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 grad_mode: str = "addernet", accumulate: str = "fp32") -> torch.Tensor:
    """Adder (L1) linear layer: ``y[..., o] = -sum_k |x[..., k] - weight[o, k]| + bias[o]``.

    x (*, K), weight (O, K), bias (O,) or None -> (*, O), x's dtype.
    grad_mode "addernet" (default): full-precision weight gradient and HardTanh input
    gradient (AdderNet); "exact": the true (sign) derivative.
    accumulate "fp32" (default): float32 sums for every dtype; "fp16x2": float16 x and
    weight may be summed in packed half2 arithmetic (float16 partial sums of 16 terms added
    in float32: about twice the float16 rounding error of the output), where a kernel for
    it runs (:func:`shiftadd._dispatch.adder_forward_op`); elsewhere, and for other
    dtypes, float32 sums.  The gradients are the same either way.
    """
    _check_tensor("x", x)
    _check_tensor("weight", weight)
    _check_grad_mode(grad_mode)
    _check_accumulate(accumulate)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension (..., in_features)")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features in its last dimension, weight expects {weight.shape[1]}")
    x, weight, bias = _autocast(x, weight, bias, accumulate=accumulate)
    _check_same("weight", weight, x)
    _check_bias(bias, weight.shape[0], x)
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), x.shape[-1])
    y = _dispatch.adder_forward_op("adder_linear", x2, accumulate)(x2, weight, grad_mode)
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, weight.shape[0])


def adder_linear_int8(x: torch.Tensor, weight: torch.Tensor, bits: int = 8, impl: str = "auto") -> torch.Tensor:
    """Quantized adder linear layer, exact in integers (inference only).

    x (*, K) int8, weight (O, K) int8 -> (*, O) int32, ``-sum_k |x[..., k] - weight[o, k]|``
    with no rounding anywhere (K up to 8,421,504, where the int32 sum could overflow).
    With a common scale s for activations and weights (x ~ s * x_q, W ~ s * W_q) the float
    layer's output is about ``s * y``: see :class:`shiftadd.nn.AdderLinearInt8`.

    bits: 8 (any int8 values), or 2..4 when every value of x and weight is a signed
    integer of that many bits (-2^(bits-1) .. 2^(bits-1) - 1; checked, ValueError
    otherwise), which allows the thermometer-code int8 matrix product
    (:mod:`shiftadd.thermometer`).  impl: "auto" (:func:`shiftadd.thermometer.choose`),
    "sad" (the adder_linear_int8 op of the selected backend) or "thermometer"; all give the
    same integers.
    """
    from . import thermometer as T

    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int8:
            raise TypeError(f"{name} must be an int8 tensor, got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x must be (..., {weight.shape[1]}), got shape {tuple(x.shape)}")
    if x.device != weight.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    T.check_bits(bits)
    T.check_range("x", x, bits)
    T.check_range("weight", weight, bits)
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), x.shape[-1])
    if T.choose(impl, x2.device, bits) == "thermometer":
        T.check_size(weight.shape[1], bits)
        y = T.adder_linear_codes(x2, T.weight_codes(weight, bits), bits, weight.shape[0])
    else:
        backend = _dispatch.select_on("adder_linear_int8", x2.device, torch.float32)  # chosen by device
        y = _ops.op(backend, "adder_linear_int8")(x2, weight)
    return y.reshape(*lead, weight.shape[0])


def _same_padding(weight: torch.Tensor, stride: tuple, dilation: tuple):
    """'same' padding per side (top, bottom, left, right), as nn.Conv2d computes it."""
    if stride != (1, 1):
        raise ValueError("padding='same' needs stride 1 (as torch.nn.functional.conv2d)")
    pads = []
    for k, d in zip(weight.shape[2:], dilation):
        total = d * (k - 1)
        pads.append((total // 2, total - total // 2))
    return pads


def resolve_padding(padding, weight, stride, dilation, x: torch.Tensor):
    """Turns 'valid' / 'same' / int / pair into (x, (ph, pw)); asymmetric 'same'
    padding is applied to x with zeros (what the kernels would read anyway)."""
    if isinstance(padding, str):
        if padding == "valid":
            return x, (0, 0)
        if padding != "same":
            raise ValueError(f"padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
        (t, b), (l, r) = _same_padding(weight, stride, dilation)
        if t == b and l == r:
            return x, (t, l)
        return F.pad(x, (l, r, t, b)), (0, 0)
    return x, _pair("padding", padding, 0)


def adder_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, stride: IntPair = 1,
                 padding: Union[IntPair, str] = 0, dilation: IntPair = 1, groups: int = 1,
                 grad_mode: str = "addernet", accumulate: str = "fp32") -> torch.Tensor:
    """Adder (L1) 2-D convolution (AdderNet): ``y[n, o, p] = -sum_k |patch_p[k] - weight[o, k]| + bias[o]``.

    x (N, C, H, W) or unbatched (C, H, W); weight (O, C/groups, kh, kw); bias (O,) or None
    -> (N, O, Ho, Wo) (or (O, Ho, Wo)), x's dtype, channels-last when x is.
    Arguments as :func:`torch.nn.functional.conv2d`; padded positions are zeros of x, so
    they contribute -|w|.  grad_mode and accumulate as :func:`adder_linear`.
    """
    _check_tensor("x", x)
    _check_tensor("weight", weight)
    _check_grad_mode(grad_mode)
    _check_accumulate(accumulate)
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D (out_channels, in_channels/groups, kh, kw), got shape {tuple(weight.shape)}")
    if weight.shape[2] < 1 or weight.shape[3] < 1:
        raise ValueError(f"weight's kernel size must be positive, got {tuple(weight.shape[2:])}")
    if x.dim() not in (3, 4):
        raise ValueError(f"x must be 4-D (N, C, H, W) or 3-D (C, H, W), got shape {tuple(x.shape)}")
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    stride, dilation = _pair("stride", stride, 1), _pair("dilation", dilation, 1)
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    C, O = x.shape[1], weight.shape[0]
    if C % groups:
        raise ValueError(f"in_channels ({C}) must be divisible by groups ({groups})")
    if O % groups:
        raise ValueError(f"out_channels ({O}) must be divisible by groups ({groups})")
    if weight.shape[1] * groups != C:
        raise ValueError(f"weight expects {weight.shape[1] * groups} input channels (shape {tuple(weight.shape)}, "
                         f"groups={groups}) but x has {C}")
    x, weight, bias = _autocast(x, weight, bias, accumulate=accumulate)
    _check_same("weight", weight, x)
    _check_bias(bias, O, x)
    x, padding = resolve_padding(padding, weight, stride, dilation, x)
    for dim, k, s, p, d in zip((2, 3), weight.shape[2:], stride, padding, dilation):
        if x.shape[dim] + 2 * p < d * (k - 1) + 1:
            raise ValueError(f"input size {tuple(x.shape[2:])} with padding {padding} is smaller than the dilated "
                             f"kernel ({d * (k - 1) + 1} along dim {dim})")
    y = _dispatch.adder_forward_op("adder_conv2d", x, accumulate)(x, weight, stride, padding, dilation, groups,
                                                                  grad_mode)
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1)
    return y.squeeze(0) if unbatched else y


# --------------------------------------------------------------------------------------
# shift
# --------------------------------------------------------------------------------------


def _noise(like: torch.Tensor, rounding: str, generator: Optional[torch.Generator]):
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if rounding == "deterministic":
        return None
    return torch.rand(like.shape, dtype=like.dtype, device=like.device, generator=generator)


def quantize_pot(weight: torch.Tensor, weight_bits: int = 5, *, mode: str = "q", sign: Optional[torch.Tensor] = None,
                 rounding: str = "deterministic", generator: Optional[torch.Generator] = None,
                 out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Power-of-two weight (DeepShift), straight-through gradients.

    mode "q": ``weight`` is a float weight; returns sign(w) * 2^round(log2 |w|) with |w|
    clamped into [2^-(2^(b-1)-1), 1] (dL/dw = dL/dwq).
    mode "ps": ``weight`` is the shift P and ``sign`` the sign S; returns
    2^round(clamp(P, -(2^(b-1)-2), 0)) * sign(round(S)) (dL/dS = dL/dW, dL/dP = dL/dW * W * ln 2).
    rounding "stochastic" rounds the exponent down or up with probability of the fraction.
    Any shape; returns the input's shape, in ``out_dtype`` (default: the input's dtype):
    one kernel quantizes and writes the power of two in the compute dtype (exact in
    bfloat16 and float32; float16 rounds magnitudes below 2^-24), the gradients come back
    in the input's dtype.
    """
    _check_tensor("weight", weight)
    if not isinstance(weight_bits, int) or not 2 <= weight_bits <= 8:
        raise ValueError(f"weight_bits must be an int in [2, 8], got {weight_bits!r}")
    if out_dtype is not None and out_dtype not in QUANT_OUT_DTYPES:
        raise TypeError(f"out_dtype must be None or one of {QUANT_OUT_DTYPES}, got {out_dtype!r}")
    if mode == "q":
        if sign is not None:
            raise ValueError("sign is only used with mode='ps'")
        return _dispatch.get_op("quantize_pot_q", weight)(weight, weight_bits, _noise(weight, rounding, generator),
                                                          out_dtype)
    if mode == "ps":
        if sign is None:
            raise ValueError("mode='ps' needs the sign tensor (sign=...)")
        _check_tensor("sign", sign)
        if sign.shape != weight.shape:
            raise ValueError(f"sign shape {tuple(sign.shape)} does not match shift shape {tuple(weight.shape)}")
        if sign.device != weight.device or sign.dtype != weight.dtype:
            raise TypeError(f"sign ({sign.dtype}, {sign.device}) must match shift ({weight.dtype}, {weight.device})")
        return _dispatch.get_op("quantize_pot_ps", weight)(weight, sign, weight_bits,
                                                           _noise(weight, rounding, generator), out_dtype)
    raise ValueError(f"mode must be 'q' or 'ps', got {mode!r}")


def round_to_fixed(x: torch.Tensor, int_bits: int = 16, frac_bits: int = 16) -> torch.Tensor:
    """Fixed-point rounding (DeepShift): clamp(floor(x 2^f) 2^-f, -2^(i-1), 2^(i-1) - 1),
    straight-through gradient.  Any shape; same shape and dtype."""
    _check_tensor("x", x)
    for name, v, lo in (("int_bits", int_bits, 1), ("frac_bits", frac_bits, 0)):
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= 64:
            raise ValueError(f"{name} must be an int in [{lo}, 64], got {v!r}")
    return _dispatch.get_op("round_to_fixed", x)(x, int_bits, frac_bits)


def _act_bits(act_bits):
    if act_bits is None:
        return None
    if isinstance(act_bits, (tuple, list)) and len(act_bits) == 2 and all(
            hasattr(b, "__index__") and not isinstance(b, bool) for b in act_bits):
        return operator.index(act_bits[0]), operator.index(act_bits[1])
    raise ValueError(f"act_bits must be None or (int_bits, frac_bits), a pair of ints, got {act_bits!r}")


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype the matmul/conv of a shift layer will run in when it differs from the
    weight's: autocast's lower precision (float16/bfloat16) for a float32 weight, so the
    quantizer writes the power-of-two weight in it directly (one pass instead of
    quantize, then autocast's cast); else None."""
    dev = x.device.type
    if weight.dtype == torch.float32 and dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        if dt in (torch.float16, torch.bfloat16):
            return dt
    return None


def _shift_operands(x, weight, bias, sign, mode, weight_bits, act_bits, rounding, generator):
    """(x, power-of-two weight, bias) of a shift layer, x and bias rounded to fixed point
    when act_bits is given.  Under autocast the weight comes out of the quantizer in the
    autocast dtype (see _compute_dtype)."""
    _check_tensor("x", x)
    act = _act_bits(act_bits)
    if mode not in SHIFT_MODES:
        raise ValueError(f"mode must be one of {SHIFT_MODES}, got {mode!r}")
    if mode == "pot":
        _check_tensor("weight", weight)
        w = weight
    else:
        w = quantize_pot(weight, weight_bits, mode=mode, sign=sign, rounding=rounding, generator=generator,
                         out_dtype=_compute_dtype(x, weight))
    if act is not None:
        x = round_to_fixed(x, *act)
        bias = None if bias is None else round_to_fixed(bias, *act)
    return x, w, bias


def shift_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *, mode: str = "q",
                 sign: Optional[torch.Tensor] = None, weight_bits: int = 5, act_bits=None,
                 rounding: str = "deterministic", generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Shift linear layer (DeepShift): ``y = x W_pot^T + bias``.

    x (*, K), weight (O, K) -> (*, O).  mode "q": weight is the float weight; "ps": weight is
    the shift P with ``sign`` S; "pot": weight is already power-of-two (used as is).
    act_bits (int_bits, frac_bits) rounds x and bias to fixed point first.
    """
    x, w, bias = _shift_operands(x, weight, bias, sign, mode, weight_bits, act_bits, rounding, generator)
    return F.linear(x, w, bias)


def shift_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, stride: IntPair = 1,
                 padding: Union[IntPair, str] = 0, dilation: IntPair = 1, groups: int = 1, *, mode: str = "q",
                 sign: Optional[torch.Tensor] = None, weight_bits: int = 5, act_bits=None,
                 rounding: str = "deterministic", generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Shift 2-D convolution (DeepShift): conv2d with a power-of-two weight.

    x (N, C, H, W) or (C, H, W), weight (O, C/groups, kh, kw) -> (N, O, Ho, Wo); other
    arguments as :func:`torch.nn.functional.conv2d` and :func:`shift_linear`.
    """
    x, w, bias = _shift_operands(x, weight, bias, sign, mode, weight_bits, act_bits, rounding, generator)
    return F.conv2d(x, w, bias, stride, padding, dilation, groups)


def adaptive_grad_scale(weight: torch.Tensor, eta: Optional[float]) -> torch.Tensor:
    """Identity whose backward rescales the weight gradient (AdderNet eq. 13):
    ``g <- g * eta * sqrt(numel(g)) / max(||g||_2, 1e-12)``.  eta None: plain identity."""
    if eta is None or not (weight.requires_grad and torch.is_grad_enabled()):
        return weight
    return _EtaScale.apply(weight, float(eta))


class _EtaScale(torch.autograd.Function):
    generate_vmap_rule = True  # torch.func.vmap over adder layers (per-sample: the norm of each sample's gradient)

    @staticmethod
    def forward(w, eta):
        return w.view_as(w)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.eta = inputs[1]

    @staticmethod
    def backward(ctx, g):
        scale = ctx.eta * math.sqrt(g.numel()) / torch.linalg.vector_norm(g).clamp_min(1e-12)
        return g * scale, None


# --------------------------------------------------------------------------------------
# packed shift weights (inference; layout: shiftadd/packed.py)
# --------------------------------------------------------------------------------------


def _packed_operands(name: str, x: torch.Tensor, packed):
    from .packed import PackedPoT

    if not isinstance(packed, PackedPoT):
        raise TypeError(f"{name}: packed must be a shiftadd.PackedPoT (from shiftadd.pack_pot), got "
                        f"{type(packed).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != packed.in_features:
        raise ValueError(f"{name}: x must be (..., {packed.in_features}), got shape {tuple(x.shape)}")
    if x.device != packed.device:
        raise RuntimeError(f"{name}: x is on {x.device} but the packed weight on {packed.device}")
    lead = x.shape[:-1]
    return x.reshape(math.prod(lead), x.shape[-1]), lead


def shift_linear_packed(x: torch.Tensor, packed, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Linear layer with a packed power-of-two weight (:func:`shiftadd.pack_pot`):
    ``x W^T + bias`` without materialising W.  x (*, K) floating, bias (O,) -> (*, O),
    x's dtype (float16/bfloat16 computed in float32).  Inference only."""
    _check_tensor("x", x)
    x2, lead = _packed_operands("shift_linear_packed", x, packed)
    _check_bias(bias, packed.out_features, x)
    y = _dispatch.get_op("shift_linear_packed", x2)(x2, packed.codes, packed.scales, packed.zero_codes, packed.bits,
                                                    packed.out_features, packed.in_features, bias)
    return y.reshape(*lead, packed.out_features)


def shift_linear_int(x_int: torch.Tensor, packed) -> torch.Tensor:
    """Exact integer shift layer, what a shift accelerator computes (DeepShift, Elhoushi et al., 2021).

    x_int (*, K) signed integers, e.g. fixed-point activations ``floor(x * 2^f)``;
    returns int64 (*, O) with ``y[o] = sum_k sign[o,k] * (x_int[k] >> s[o,k])``, where the
    weight is ``sign * 2^-s`` (s = code magnitude - channel scale): ``>>`` is the
    arithmetic (floor) shift, zero weights are skipped, a negative s (a weight above 1:
    channel scale > 0) is a left shift by -s, and sums wrap modulo 2^64 as an int64
    accumulator does.  ``y_int * 2^-f`` approximates ``x W^T``.
    """
    if not isinstance(x_int, torch.Tensor) or x_int.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64):
        raise TypeError(f"x_int must be a signed integer tensor (int8/16/32/64), got "
                        f"{x_int.dtype if isinstance(x_int, torch.Tensor) else type(x_int).__name__}")
    x2, lead = _packed_operands("shift_linear_int", x_int, packed)
    # the backend is chosen by device (the dtype table lists float dtypes only)
    backend = _dispatch.select_on("shift_linear_int", x2.device, torch.float32)
    y = _ops.op(backend, "shift_linear_int")(x2, packed.codes, packed.scales, packed.zero_codes, packed.bits,
                                             packed.out_features, packed.in_features)
    return y.reshape(*lead, packed.out_features)
