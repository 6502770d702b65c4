"""Every shiftadd operator schema, once: definitions, fake (meta) kernels and autograd.

Each operator family exists once per *backend*, as its own registered op, so that the
dispatch point (:mod:`shiftadd._dispatch`) can pick any backend for any device and
``torch.compile`` sees a single opaque op per call::

    shiftadd::adder_conv2d            compiled kernels: C++ (CPU key) and CUDA (CUDA key),
                                      registered by the extension shiftadd._C
    shiftadd::triton_adder_conv2d     Triton kernels (shiftadd._triton), CUDA tensors
    shiftadd::ref_adder_conv2d        pure-PyTorch reference (shiftadd.reference), any device

All variants of a family share the schema, the fake kernel and the autograd formula;
the backward of a forward op calls the gradient ops *of the same backend*.

Adder families (x, weight and grad_out share one floating dtype; output has x's dtype):

=============================  ==========================================================
``adder_linear``               x (N, K), weight (O, K) -> (N, O)
``adder_linear_grad_input``    grad_out (N, O), x, weight, grad_mode -> (N, K)
``adder_linear_grad_weight``   grad_out (N, O), x, weight, grad_mode -> (O, K)
``adder_conv2d``               x (N, C, H, W), weight (O, C/groups, kh, kw) -> (N, O, Ho, Wo)
``adder_conv2d_grad_input``    -> like x (channels-last when x is)
``adder_conv2d_grad_weight``   -> like weight (contiguous)
=============================  ==========================================================

``adder_linear_fp16x2`` / ``adder_conv2d_fp16x2``: the forwards in float16 only, computed in
packed half2 arithmetic (float16 partial sums of 16 terms added in float32; backends "cuda"
and "reference", whose result is the kernel's bit for bit); their gradients are the
families' above.

Quantizer families (elementwise, contiguous output of the input's shape and dtype):
``quantize_pot_q``, ``quantize_pot_ps``, ``round_to_fixed``.  The two weight quantizers
take ``out_dtype`` (None: the input's dtype): the power-of-two weight is then written
directly in that dtype (rounded once from the exact value; exact in bfloat16 and
float32), so a float32 master weight is quantized and decoded to the compute dtype of a
mixed-precision step in one pass.  Their gradients come back in the input's dtype.

Packed power-of-two families (inference only; layout in shiftadd/packed.py; backends
"cpu", "reference", and "cuda" / "triton" for the float one): ``shift_linear_packed`` x (N, K) float -> (N, O) x's dtype;
``shift_linear_int`` x_int (N, K) signed integer -> (N, O) int64, bit-exact shifts.

Quantized adder (inference only; backends "cpu", "cuda", "reference"):
``adder_linear_int8`` x (N, K) int8, weight (O, K) int8 -> (N, O) int32, -sum |x - w| exactly.
"""

from __future__ import annotations

import math

import torch

LIB = torch.library.Library("shiftadd", "DEF")

# Backend name -> prefix of its op names.  "cpu" and "cuda" share the compiled ops (the
# dispatcher picks the C++ or CUDA kernel by the tensors' device).
PREFIX = {"cpu": "", "cuda": "", "triton": "triton_", "reference": "ref_"}

_CONV_ARGS = "int[2] stride, int[2] padding, int[2] dilation, int groups"

ADDER_SCHEMAS = {
    "adder_linear": "(Tensor x, Tensor weight, str grad_mode) -> Tensor",
    "adder_linear_grad_input": "(Tensor grad_out, Tensor x, Tensor weight, str grad_mode) -> Tensor",
    "adder_linear_grad_weight": "(Tensor grad_out, Tensor x, Tensor weight, str grad_mode) -> Tensor",
    "adder_conv2d": f"(Tensor x, Tensor weight, {_CONV_ARGS}, str grad_mode) -> Tensor",
    "adder_conv2d_grad_input": f"(Tensor grad_out, Tensor x, Tensor weight, {_CONV_ARGS}, str grad_mode) -> Tensor",
    "adder_conv2d_grad_weight": f"(Tensor grad_out, Tensor x, Tensor weight, {_CONV_ARGS}, str grad_mode) -> Tensor",
}

# The adder forward in fp16x2 arithmetic (float16 only; backends "cuda" and "reference", the
# reference reproducing the kernel's sums bit for bit): float16 partial sums of 16 columns
# added in float32.  Same schemas as the forward families; the backward is theirs.
FP16X2_SCHEMAS = {
    "adder_linear_fp16x2": ADDER_SCHEMAS["adder_linear"],
    "adder_conv2d_fp16x2": ADDER_SCHEMAS["adder_conv2d"],
}

QUANT_SCHEMAS = {
    "quantize_pot_q": "(Tensor weight, int weight_bits, Tensor? noise, ScalarType? out_dtype=None) -> Tensor",
    "quantize_pot_ps": "(Tensor shift, Tensor sign, int weight_bits, Tensor? noise, ScalarType? out_dtype=None) -> Tensor",
    "round_to_fixed": "(Tensor x, int int_bits, int frac_bits) -> Tensor",
}

# Quantized adder inference (integer, exact): x (N, K) int8, weight (O, K) int8 -> (N, O) int32.
INT8_ADDER_SCHEMAS = {
    "adder_linear_int8": "(Tensor x, Tensor weight) -> Tensor",
}

_PACKED_ARGS = "Tensor codes, Tensor scales, Tensor zero_codes, int bits, int out_features, int in_features"
PACKED_SCHEMAS = {
    "shift_linear_packed": f"(Tensor x, {_PACKED_ARGS}, Tensor? bias) -> Tensor",
    "shift_linear_int": f"(Tensor x_int, {_PACKED_ARGS}) -> Tensor",
}

SCHEMAS = {**ADDER_SCHEMAS, **FP16X2_SCHEMAS, **QUANT_SCHEMAS, **PACKED_SCHEMAS, **INT8_ADDER_SCHEMAS}
INFERENCE_ONLY = (*PACKED_SCHEMAS, *INT8_ADDER_SCHEMAS)

# Which families each backend implements.  A backend that lacks a family is skipped by
# the dispatcher with that reason.
FAMILIES = {
    "cpu": tuple(f for f in SCHEMAS if f not in FP16X2_SCHEMAS),
    "cuda": tuple(f for f in SCHEMAS if f != "shift_linear_int"),
    "triton": (*ADDER_SCHEMAS, *QUANT_SCHEMAS, "shift_linear_packed"),
    "reference": tuple(SCHEMAS),
}


def op(backend: str, family: str) -> torch._ops.OpOverload:
    """The registered overload of ``family`` for ``backend``."""
    return getattr(torch.ops.shiftadd, PREFIX[backend] + family).default


# --------------------------------------------------------------------------------------
# Shapes and memory formats (shared by fake kernels and the Python backends)
# --------------------------------------------------------------------------------------


def conv_output_size(h: int, w: int, k: tuple, stride, padding, dilation) -> tuple:
    ho = (h + 2 * padding[0] - dilation[0] * (k[0] - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (k[1] - 1) - 1) // stride[1] + 1
    return ho, wo


def conv_memory_format(x: torch.Tensor) -> torch.memory_format:
    """Outputs are channels-last exactly when x is channels-last and not also contiguous
    (the rule csrc/shiftadd.h `wants_channels_last` implements for the kernels)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _check_pair(name: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    torch._check(x.dtype.is_floating_point, lambda: f"{name}: x must be floating point, got {x.dtype}")
    torch._check(x.dtype == weight.dtype, lambda: f"{name}: weight dtype {weight.dtype} does not match x dtype {x.dtype}")
    torch._check(x.device == weight.device, lambda: f"{name}: weight is on {weight.device} but x is on {x.device}")


def _linear_shape(name, x, weight):
    _check_pair(name, x, weight)
    torch._check(x.dim() == 2, lambda: f"{name}: x must be 2-D (N, K), got {x.dim()}-D")
    torch._check(weight.dim() == 2, lambda: f"{name}: weight must be 2-D (O, K), got {weight.dim()}-D")
    torch._check(x.shape[1] == weight.shape[1], lambda: f"{name}: x has {x.shape[1]} features, weight expects {weight.shape[1]}")
    return x.shape[0], weight.shape[0]


def _conv_shape(name, x, weight, stride, padding, dilation, groups):
    _check_pair(name, x, weight)
    torch._check(x.dim() == 4, lambda: f"{name}: x must be 4-D (N, C, H, W), got {x.dim()}-D")
    torch._check(weight.dim() == 4, lambda: f"{name}: weight must be 4-D, got {weight.dim()}-D")
    torch._check(weight.shape[2] > 0 and weight.shape[3] > 0,
                 lambda: f"{name}: weight's kernel size must be positive, got {tuple(weight.shape[2:])}")
    torch._check(groups > 0 and x.shape[1] == weight.shape[1] * groups and weight.shape[0] % groups == 0,
                 lambda: f"{name}: channels do not fit: x {tuple(x.shape)}, weight {tuple(weight.shape)}, groups {groups}")
    ho, wo = conv_output_size(x.shape[2], x.shape[3], weight.shape[2:], stride, padding, dilation)
    torch._check(ho > 0 and wo > 0, lambda: f"{name}: output would be empty ({ho}x{wo})")
    return x.shape[0], weight.shape[0], ho, wo


# --------------------------------------------------------------------------------------
# Fake kernels
# --------------------------------------------------------------------------------------


def _fake_adder_linear(x, weight, grad_mode):
    n, o = _linear_shape("adder_linear", x, weight)
    return x.new_empty((n, o))


def _check_grad_out(name, grad_out, x, shape):
    torch._check(grad_out.device == x.device, lambda: f"{name}: grad_out is on {grad_out.device} but x is on {x.device}")
    torch._check(grad_out.dtype == x.dtype, lambda: f"{name}: grad_out dtype {grad_out.dtype} does not match x dtype {x.dtype}")
    torch._check(tuple(grad_out.shape) == tuple(shape),
                 lambda: f"{name}: grad_out must have shape {tuple(shape)}, got {tuple(grad_out.shape)}")


def _fake_adder_linear_grad_input(grad_out, x, weight, grad_mode):
    n, o = _linear_shape("adder_linear_grad_input", x, weight)
    _check_grad_out("adder_linear_grad_input", grad_out, x, (n, o))
    return x.new_empty(x.shape)


def _fake_adder_linear_grad_weight(grad_out, x, weight, grad_mode):
    n, o = _linear_shape("adder_linear_grad_weight", x, weight)
    _check_grad_out("adder_linear_grad_weight", grad_out, x, (n, o))
    return weight.new_empty(weight.shape)


def _fake_adder_conv2d(x, weight, stride, padding, dilation, groups, grad_mode):
    shape = _conv_shape("adder_conv2d", x, weight, stride, padding, dilation, groups)
    return x.new_empty(shape).contiguous(memory_format=conv_memory_format(x))


def _check_fp16x2(name, x):
    torch._check(x.dtype == torch.float16,
                 lambda: f"{name}: x and weight must be float16 (fp16x2 arithmetic), got {x.dtype}")


def _fake_adder_linear_fp16x2(x, weight, grad_mode):
    _check_fp16x2("adder_linear_fp16x2", x)
    return _fake_adder_linear(x, weight, grad_mode)


def _fake_adder_conv2d_fp16x2(x, weight, stride, padding, dilation, groups, grad_mode):
    _check_fp16x2("adder_conv2d_fp16x2", x)
    return _fake_adder_conv2d(x, weight, stride, padding, dilation, groups, grad_mode)


def _fake_adder_conv2d_grad_input(grad_out, x, weight, stride, padding, dilation, groups, grad_mode):
    shape = _conv_shape("adder_conv2d_grad_input", x, weight, stride, padding, dilation, groups)
    _check_grad_out("adder_conv2d_grad_input", grad_out, x, shape)
    return x.new_empty(x.shape).contiguous(memory_format=conv_memory_format(x))


def _fake_adder_conv2d_grad_weight(grad_out, x, weight, stride, padding, dilation, groups, grad_mode):
    shape = _conv_shape("adder_conv2d_grad_weight", x, weight, stride, padding, dilation, groups)
    _check_grad_out("adder_conv2d_grad_weight", grad_out, x, shape)
    return weight.new_empty(weight.shape)


def _check_out_dtype(name: str, out_dtype) -> None:
    from .reference.shift import QUANT_OUT_DTYPES

    torch._check(out_dtype is None or out_dtype in QUANT_OUT_DTYPES,
                 lambda: f"{name}: out_dtype must be float32, float64, float16, bfloat16 or None, got {out_dtype}")


def _check_same_place(name, ref, ref_name, t, t_name):
    if t is None:
        return
    torch._check(t.device == ref.device, lambda: f"{name}: {t_name} is on {t.device}, {ref_name} on {ref.device}")
    torch._check(t.shape == ref.shape,
                 lambda: f"{name}: {t_name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}")


def _fake_quantize_pot_q(weight, weight_bits, noise, out_dtype=None):
    _check_same_place("quantize_pot_q", weight, "weight", noise, "noise")
    _check_out_dtype("quantize_pot_q", out_dtype)
    return torch.empty(weight.shape, dtype=out_dtype or weight.dtype, device=weight.device)


def _fake_quantize_pot_ps(shift, sign, weight_bits, noise, out_dtype=None):
    _check_same_place("quantize_pot_ps", shift, "shift", sign, "sign")
    _check_same_place("quantize_pot_ps", shift, "shift", noise, "noise")
    _check_out_dtype("quantize_pot_ps", out_dtype)
    return torch.empty(shift.shape, dtype=out_dtype or shift.dtype, device=shift.device)


def _fake_round_to_fixed(x, int_bits, frac_bits):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _fake_adder_linear_int8(x, weight):
    from .reference.adder import check_adder_int8

    check_adder_int8("adder_linear_int8", x, weight)
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.int32)


def _fake_shift_linear_packed(x, codes, scales, zero_codes, bits, out_features, in_features, bias):
    from .reference.shift import check_packed

    check_packed("shift_linear_packed", codes, scales, zero_codes, bits, out_features, in_features)
    torch._check(x.dtype.is_floating_point, lambda: f"shift_linear_packed: x must be floating point, got {x.dtype}")
    torch._check(x.dim() == 2 and x.shape[1] == in_features,
                 lambda: f"shift_linear_packed: x must be (N, {in_features}), got {tuple(x.shape)}")
    if bias is not None:
        torch._check(bias.dtype == x.dtype and bias.dim() == 1 and bias.shape[0] == out_features,
                     lambda: f"shift_linear_packed: bias must be {x.dtype} ({out_features},)")
    return x.new_empty((x.shape[0], out_features))


def _fake_shift_linear_int(x_int, codes, scales, zero_codes, bits, out_features, in_features):
    from .reference.shift import _INT_DTYPES, check_packed

    check_packed("shift_linear_int", codes, scales, zero_codes, bits, out_features, in_features)
    torch._check(x_int.dtype in _INT_DTYPES, lambda: f"shift_linear_int: x_int must be a signed integer tensor, "
                                                     f"got {x_int.dtype}")
    torch._check(x_int.dim() == 2 and x_int.shape[1] == in_features,
                 lambda: f"shift_linear_int: x_int must be (N, {in_features}), got {tuple(x_int.shape)}")
    return x_int.new_empty((x_int.shape[0], out_features), dtype=torch.int64)


_FAKES = {name: globals()[f"_fake_{name}"] for name in SCHEMAS}


# --------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------


def _adder_autograd(backend: str, family: str):
    """setup_context / backward for a forward adder op of `backend`: the backward calls
    that backend's grad_input and grad_weight ops, each only when needed (those of
    adder_linear / adder_conv2d for the fp16x2 forwards)."""
    base = family.removesuffix("_fp16x2")
    gi_op, gw_op = op(backend, base + "_grad_input"), op(backend, base + "_grad_weight")

    def setup_context(ctx, inputs, output):
        x, weight, *rest = inputs
        ctx.rest = rest  # conv params..., grad_mode
        ctx.save_for_backward(x, weight)

    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous() if grad.dim() == 2 else grad
        gx = gi_op(grad, x, weight, *ctx.rest) if ctx.needs_input_grad[0] else None
        gw = gw_op(grad, x, weight, *ctx.rest) if ctx.needs_input_grad[1] else None
        return (gx, gw) + (None,) * len(ctx.rest)

    return setup_context, backward


def _no_double_backward(name: str):
    def backward(ctx, grad):
        raise RuntimeError(f"shiftadd::{name}: double backward (create_graph=True through an adder gradient) "
                           "is not supported")

    return backward


def _inference_only(name: str):
    how = ("a packed weight has no gradient (and neither has its input through it); train the unpacked "
           "ShiftLinear / ShiftConv2d and pack() it afterwards" if name in PACKED_SCHEMAS else
           "integer operands have no gradient; train the float AdderLinear and quantize it afterwards")

    def backward(ctx, *grads):
        raise RuntimeError(f"shiftadd::{name} is inference-only: {how}")

    return backward


def _save_input_dtype(ctx, inputs, output):
    ctx.in_dtype = inputs[0].dtype  # gradients go back in the input's dtype (out_dtype may differ)


def _ps_autograd(backend: str):
    """setup_context / backward of quantize_pot_ps: dL/dP needs W.  W is saved as the
    output when that holds it exactly (every power of two of the PS range is exact in
    float32, float64 and bfloat16); a float16 output of a wider input may have flushed
    small weights to 0, so then the inputs are saved and W is recomputed in the input's
    dtype (the gradients are those of quantizing in that dtype and casting)."""
    fwd = op(backend, "quantize_pot_ps")

    def setup_context(ctx, inputs, output):
        shift, sign, bits, noise = inputs[:4]
        ctx.in_dtype = shift.dtype
        ctx.recompute = output.dtype == torch.float16 and shift.dtype != torch.float16
        if ctx.recompute:
            ctx.bits = bits
            ctx.save_for_backward(shift, sign, noise)
        else:
            ctx.save_for_backward(output)

    def backward(ctx, grad):
        g = grad.to(ctx.in_dtype)
        if ctx.recompute:
            shift, sign, noise = ctx.saved_tensors
            w = fwd(shift.detach(), sign.detach(), ctx.bits, noise)
        else:
            (w,) = ctx.saved_tensors
            w = w.to(ctx.in_dtype)
        # dL/dP = dL/dW * W * ln 2 ; dL/dS = dL/dW (round, sign and clamp are straight-through)
        return g * w * math.log(2.0), g, None, None, None

    return setup_context, backward


def _quantize_pot_q_backward(ctx, grad):
    # straight-through: dL/dW = dL/dWq
    return grad.to(ctx.in_dtype), None, None, None


def _round_to_fixed_backward(ctx, grad):
    return grad, None, None


_QUANT_BACKWARD = {
    "quantize_pot_q": _quantize_pot_q_backward,
    "round_to_fixed": _round_to_fixed_backward,
}


def _finish_registration(backend: str, family: str) -> None:
    qualname = "shiftadd::" + PREFIX[backend] + family
    torch.library.register_fake(qualname, _FAKES[family], lib=LIB)
    if family in ("adder_linear", "adder_conv2d", *FP16X2_SCHEMAS):
        setup, bwd = _adder_autograd(backend, family)
        torch.library.register_autograd(qualname, bwd, setup_context=setup, lib=LIB)
    elif family == "quantize_pot_ps":
        setup, bwd = _ps_autograd(backend)
        torch.library.register_autograd(qualname, bwd, setup_context=setup, lib=LIB)
    elif family == "quantize_pot_q":
        torch.library.register_autograd(qualname, _QUANT_BACKWARD[family], setup_context=_save_input_dtype, lib=LIB)
    elif family in _QUANT_BACKWARD:  # straight-through: nothing to save
        torch.library.register_autograd(qualname, _QUANT_BACKWARD[family], lib=LIB)
    elif family in INFERENCE_ONLY:
        torch.library.register_autograd(qualname, _inference_only(family), lib=LIB)
    else:
        torch.library.register_autograd(qualname, _no_double_backward(family), lib=LIB)


def _register_all() -> None:
    from . import reference

    for backend in ("cpu", "reference"):  # "cpu" names the compiled ops; kernels come from shiftadd._C
        for family in SCHEMAS:
            LIB.define(PREFIX[backend] + family + SCHEMAS[family])
    for family in SCHEMAS:
        LIB.impl(PREFIX["reference"] + family, getattr(reference, family), "CompositeExplicitAutograd")
        for backend in ("cpu", "reference"):
            _finish_registration(backend, family)


def register_triton(impls: dict) -> None:
    """Registers Triton implementations {family: fn} (called by shiftadd._triton).
    A forward family must come with both of its gradient families."""
    for family, fn in impls.items():
        torch.library.triton_op("shiftadd::" + PREFIX["triton"] + family, fn, mutates_args=(),
                                schema=SCHEMAS[family])
    for family in impls:
        _finish_registration("triton", family)


_register_all()
