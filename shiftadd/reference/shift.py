"""Pure-PyTorch reference of the power-of-two (DeepShift) quantizers: the tests' oracle.

DeepShift (Elhoushi et al., 2021).  With b = weight_bits:

* ``quantize_pot_q(w, b, noise)``: DeepShift-Q.  |w| is clamped into
  [2^-(2^(b-1)-1), 1], then ``sign(w) * 2^round(log2 |w|)``; sign(0) = 0.
* ``quantize_pot_ps(P, S, b, noise)``: DeepShift-PS.  ``2^round(clamp(P, -(2^(b-1)-2), 0))
  * sign(round(S))``: the sign is ternary.
* ``round_to_fixed(x, i, f)``: ``clamp(floor(x 2^f) 2^-f, -2^(i-1), 2^(i-1) - 1)``.

``round`` is half-to-even (torch.round).  ``noise`` (uniform [0, 1), the weight's shape)
makes it stochastic: ``floor(v) + (u < v - floor(v))``, DeepShift's floor plus Bernoulli
of the fraction.  A NaN weight, shift or sign gives NaN (never a silent 0).  round(log2 a) is computed exactly: with a = m 2^e, m in [0.5, 1),
round(log2 a) = e - [m^2 < 1/2].  The quantizers compute in float64 (exact for every
input dtype) and round the result once to ``out_dtype`` (default: the input's; a power of
two is exact in float32 and bfloat16, float16 rounds those below 2^-24); round_to_fixed
in the input's precision (float32 for 16-bit types).
The compiled kernels (csrc/cpu/shift.cpp) follow the same steps bit for bit.
"""

from __future__ import annotations

import torch


def _check_bits(weight_bits: int) -> None:
    if not 2 <= weight_bits <= 8:
        raise ValueError(f"weight_bits must be in [2, 8], got {weight_bits}")


def shift_range(weight_bits: int, mode: str) -> tuple[int, int]:
    """(min, max) exponent of a weight: [-(2^(b-1)-1), 0] for Q, [-(2^(b-1)-2), 0] for PS."""
    _check_bits(weight_bits)
    top = 2 ** (weight_bits - 1)
    return (-(top - 1), 0) if mode == "q" else (-(top - 2), 0)


def _round_exponent(v: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    if noise is None:
        return torch.round(v)
    fl = torch.floor(v)
    return fl + (noise.to(torch.float64) < v - fl).to(v.dtype)


# The dtypes a quantizer may write (out_dtype), in every backend and the fake kernels.
QUANT_OUT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _out_dtype(out_dtype, like: torch.Tensor) -> torch.dtype:
    if out_dtype is None:
        return like.dtype
    if out_dtype not in QUANT_OUT_DTYPES:
        raise TypeError(f"out_dtype must be float32, float64, float16, bfloat16 or None, got {out_dtype}")
    return out_dtype


def quantize_pot_q(weight: torch.Tensor, weight_bits: int = 5, noise: torch.Tensor | None = None,
                   out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """weight (any shape, floating) -> sign(w) * 2^p, p in [-(2^(b-1)-1), 0]; same shape, dtype
    out_dtype (default: the weight's), rounded once from the exact float64 value."""
    dtype = _out_dtype(out_dtype, weight)
    lo, hi = shift_range(weight_bits, "q")
    w = weight.to(torch.float64)
    a = w.abs().clamp(2.0 ** lo, 1.0)
    if noise is None:
        m, e = torch.frexp(a)
        p = e.to(torch.float64) - (m * m < 0.5).to(torch.float64)
    else:
        p = _round_exponent(torch.log2(a), noise)
    p = p.clamp(lo, hi)
    out = torch.sign(w) * torch.exp2(p)
    return torch.where(w.isnan(), w, out).to(dtype)  # NaN stays NaN (torch.sign(NaN) is 0)


def quantize_pot_ps(shift: torch.Tensor, sign: torch.Tensor, weight_bits: int = 5,
                    noise: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """shift P and sign S (same shape, floating) -> 2^round(P) * sign(round(S)); dtype
    out_dtype (default: P's)."""
    dtype = _out_dtype(out_dtype, shift)
    lo, hi = shift_range(weight_bits, "ps")
    p = _round_exponent(shift.to(torch.float64).clamp(lo, hi), noise)
    s = torch.sign(torch.round(sign.to(torch.float64)))
    out = torch.exp2(p) * s
    return out.masked_fill(shift.isnan() | sign.isnan(), float("nan")).to(dtype)


def round_to_fixed(x: torch.Tensor, int_bits: int = 16, frac_bits: int = 16) -> torch.Tensor:
    """x -> clamp(floor(x 2^f) 2^-f, -2^(i-1), 2^(i-1) - 1); same shape and dtype."""
    if not 1 <= int_bits <= 64 or not 0 <= frac_bits <= 64:
        raise ValueError(f"int_bits must be in [1, 64] and frac_bits in [0, 64], got {int_bits}, {frac_bits}")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    # scaling by a power-of-two Python float is exact (torch.ldexp is not on CUDA: it
    # multiplies by pow(2, e), which came out 1 ulp low in float64 on an H100)
    v = torch.floor(x.to(acc) * (2.0 ** frac_bits)) * (2.0 ** -frac_bits)
    bound = 2.0 ** (int_bits - 1)
    return v.clamp(-bound, bound - 1).to(x.dtype)


# --------------------------------------------------------------------------------------
# Packed power-of-two weights (the layout is documented in shiftadd/packed.py)
# --------------------------------------------------------------------------------------

CODE_BITS = (4, 8, 16)
_CHUNK = 1 << 22  # elements per temporary


def packed_row_bytes(in_features: int, bits: int) -> int:
    """Bytes per output channel of a packed weight: ceil(K/2), K or 2K for 4, 8, 16-bit codes."""
    return (in_features + 1) // 2 if bits == 4 else in_features * (bits // 8)


def check_packed(name: str, codes, scales, zero_codes, bits: int, out_features: int, in_features: int) -> None:
    """The packed-weight arguments every packed op shares (torch._check: also in fake mode)."""
    torch._check(bits in CODE_BITS, lambda: f"{name}: bits must be 4, 8 or 16, got {bits}")
    torch._check(out_features >= 0 and in_features >= 0,
                 lambda: f"{name}: out_features and in_features must be >= 0, got {out_features}, {in_features}")
    # the messages capture Python values only, not tensors: torch.compile traces these checks
    # (PackedShiftConv2d decodes in Python) and cannot convert a closure over a tensor
    cdt, sdt, zdt = codes.dtype, scales.dtype, zero_codes.dtype
    torch._check(cdt == torch.uint8, lambda: f"{name}: codes must be uint8, got {cdt}")
    torch._check(sdt == torch.int32, lambda: f"{name}: scales must be int32, got {sdt}")
    torch._check(zdt == torch.int32, lambda: f"{name}: zero_codes must be int32, got {zdt}")
    rb = packed_row_bytes(in_features, bits)
    cshape, cdev = tuple(codes.shape), codes.device
    torch._check(len(cshape) == 2 and cshape[0] == out_features and cshape[1] == rb,
                 lambda: f"{name}: codes must have shape ({out_features}, {rb}) for {out_features}x{in_features} "
                         f"{bits}-bit codes, got {cshape}")
    for what, t in (("scales", scales), ("zero_codes", zero_codes)):
        shape, dev = tuple(t.shape), t.device
        torch._check(len(shape) == 1 and shape[0] == out_features,
                     lambda: f"{name}: {what} must have shape ({out_features},), got {shape}")
        torch._check(dev == cdev, lambda: f"{name}: {what} is on {dev}, codes on {cdev}")


def unpack_codes(codes: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Packed bytes (O, row_bytes) -> the codes (O, K) as int64 (4-bit: low nibble first;
    16-bit: little-endian byte pairs)."""
    c = codes.to(torch.int64)
    if bits == 8:
        return c
    if bits == 4:
        return torch.stack((c & 15, c >> 4), dim=-1).reshape(c.shape[0], -1)[:, :in_features]
    return c[:, 0::2] | (c[:, 1::2] << 8)


def _code_values(codes_k: torch.Tensor, scales: torch.Tensor, zero_codes: torch.Tensor, bits: int, dtype):
    """Codes (rows, K) int64 -> weights (rows, K) in dtype: 0 where code == zero_code, else
    (-1)^sign * 2^(scale - magnitude), computed exactly in float64 and rounded once to dtype
    (exp2 of an integer is exact; below float64's range it is 0)."""
    half = 1 << (bits - 1)
    e = scales.to(torch.int64)[:, None] - (codes_k & (half - 1))
    mag = torch.exp2(e.clamp(-1100, 1100).to(torch.float64))
    v = torch.where(codes_k >= half, -mag, mag).to(dtype)
    return v.masked_fill(codes_k == zero_codes.to(torch.int64)[:, None], 0)


def decode_pot(codes: torch.Tensor, scales: torch.Tensor, zero_codes: torch.Tensor, bits: int, out_features: int,
               in_features: int, dtype: torch.dtype = torch.float32, rows=None) -> torch.Tensor:
    """The dense (O, K) weight of a packed one, in `dtype` (rows: a slice of output channels)."""
    check_packed("decode_pot", codes, scales, zero_codes, bits, out_features, in_features)
    if rows is not None:
        codes, scales, zero_codes = codes[rows], scales[rows], zero_codes[rows]
    c = unpack_codes(codes, bits, in_features)
    return _code_values(c, scales, zero_codes, bits, dtype)


def _row_chunks(out_features: int, per_row: int):
    step = max(1, _CHUNK // max(per_row, 1))
    for o0 in range(0, out_features, step):
        yield slice(o0, min(out_features, o0 + step))


def shift_linear_packed(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zero_codes: torch.Tensor,
                        bits: int, out_features: int, in_features: int, bias=None) -> torch.Tensor:
    """x (N, K) @ decoded(codes)^T + bias -> (N, O), x's dtype.  Computed in float32
    (float64 for float64 x), the weight decoded a slice of output channels at a time."""
    check_packed("shift_linear_packed", codes, scales, zero_codes, bits, out_features, in_features)
    torch._check(x.dtype.is_floating_point and x.dim() == 2 and x.shape[1] == in_features,
                 lambda: f"shift_linear_packed: x must be a floating (N, {in_features}) tensor, got {x.dtype} "
                         f"{tuple(x.shape)}")
    if bias is not None:
        torch._check(bias.dtype == x.dtype and tuple(bias.shape) == (out_features,),
                     lambda: f"shift_linear_packed: bias must be {x.dtype} ({out_features},), got {bias.dtype} "
                             f"{tuple(bias.shape)}")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xa = x.to(acc)
    y = x.new_empty((x.shape[0], out_features), dtype=acc)
    for sl in _row_chunks(out_features, in_features):
        w = decode_pot(codes, scales, zero_codes, bits, out_features, in_features, acc, rows=sl)
        y[:, sl] = torch.nn.functional.linear(xa, w, None if bias is None else bias[sl].to(acc))
    return y.to(x.dtype)


_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64)


def shift_linear_int(x_int: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zero_codes: torch.Tensor,
                     bits: int, out_features: int, in_features: int) -> torch.Tensor:
    """What a shift accelerator computes, exactly: y[n, o] = sum_k sign[o, k] * (x[n, k] >> s[o, k])
    in int64, s = magnitude - scale (the weight is sign * 2^-s); s < 0 is a left shift
    by -s (wrapping modulo 2^64 like the int64 accumulator), >> is arithmetic (floor),
    zero weights are skipped.  x_int (N, K) int8/16/32/64 -> (N, O) int64."""
    check_packed("shift_linear_int", codes, scales, zero_codes, bits, out_features, in_features)
    torch._check(x_int.dtype in _INT_DTYPES and x_int.dim() == 2 and x_int.shape[1] == in_features,
                 lambda: f"shift_linear_int: x_int must be a signed integer (N, {in_features}) tensor, got "
                         f"{x_int.dtype} {tuple(x_int.shape)}")
    n = x_int.shape[0]
    x = x_int.to(torch.int64)
    y = torch.zeros((n, out_features), dtype=torch.int64, device=x.device)
    half = 1 << (bits - 1)
    for sl in _row_chunks(out_features, in_features * max(n, 1)):
        c = unpack_codes(codes[sl], bits, in_features)
        s = (c & (half - 1)) - scales[sl].to(torch.int64)[:, None]  # (o, K) right-shift amounts
        sign = torch.where(c >= half, -1, 1).masked_fill(c == zero_codes[sl].to(torch.int64)[:, None], 0)
        xs = x[:, None, :]
        right = xs >> s.clamp(0, 63)
        left = (xs << (-s).clamp(0, 63)).masked_fill(s <= -64, 0)
        y[:, sl] = (torch.where(s >= 0, right, left) * sign).sum(-1)
    return y
