"""Triton kernels of the shift (DeepShift, power-of-two) operators.

Quantizers (elementwise, one program per BLOCK elements, 64-bit offsets), bit for bit
the rules of shiftadd/reference/shift.py (DeepShift, Elhoushi et al., 2021), b = weight_bits:

* ``quantize_pot_q(w, b, noise)``: |w| clamped into [2^-(2^(b-1)-1), 1] in float64;
  deterministic rounding reads round(log2 a) off the float64 bits (a = (1 + f 2^-52) 2^e:
  e + [f >= T], T the smallest fraction with (1 + f 2^-52)^2 >= 2), so no log2 is
  evaluated; stochastic rounding uses floor(log2 a) + [u < frac] in float64 (a libm may
  differ from torch's by an ulp: a rare flip at the boundary, as on the other backends).
* ``quantize_pot_ps(P, S, b, noise)``: float64 clamp, round half to even
  (floor(v + 1/2) with the tie corrected to even: exact for every float32-representable v),
  sign(round(S)).
* ``round_to_fixed(x, i, f)``: floor(x 2^f) 2^-f clamped, in float64.  For float32/16-bit
  inputs this equals the reference's float32 arithmetic: x 2^f and the truncation are
  exact, an overflow to inf there ends at the same clamp bound, and the bound 2^(i-1) - 1
  is rounded to float32 as the reference's clamp rounds it.

2^p is built from its bits (exponent field), never with exp2, so it is exact; NaN in
gives NaN out.  Inputs float16/bfloat16/float32; the output has the input's dtype, or
the quantizers' out_dtype (the store rounds the exact float64 value once).

Packed linear (``shift_linear_packed``, inference; layout in shiftadd/packed.py):
y (N, O) = x (N, K) W^T + bias with W read as B-bit codes (4, 8 or 16 per weight).  Each
program owns a [BN, BO] output tile and loops over K in steps of BK: it loads the codes
of a [BK, BO] weight tile, decodes them in registers to w' = ±2^-m (the channel scale
2^E is factored out and applied to the fp32 accumulator at the end, so a 4-bit w' is
exact even in float16), zeroes the zero code, and feeds w' with the x tile to ``tl.dot``:
tensor cores for bfloat16 (and float16 with 4-bit codes), exact IEEE float32 otherwise.
Bias is added in float32.  4-bit codes with K % 8 == 0 and at most 16 rows of x take a
split-K GEMV instead (``_packed_gemv_kernel``: codes read as 32-bit words, K split across
programs, partial sums added up by ``_packed_epilogue_kernel``).
"""

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ._configs import choose, num_sms

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_BLOCK = 1024

# smallest 52-bit fraction f with (2^52 + f)^2 >= 2^105: round(log2 a) = e + [f >= _T52]
_T52 = math.isqrt(2**105) + 1 - 2**52


# --------------------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------------------


@triton.jit
def _pow2_f64(p):
    """2^p (p int64, within float64's normal range [-1022, 1023]) as float64, from bits."""
    return ((p + 1023) << 52).to(tl.float64, bitcast=True)


@triton.jit
def _round_half_even(v):
    """round(v) half to even, v float64 (exact for |v| < 2^51 given as float32 values)."""
    r = tl.floor(v + 0.5)
    tie = (r - v) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _sign_f64(v):
    return tl.where(v > 0.0, 1.0, tl.where(v < 0.0, -1.0, 0.0)).to(tl.float64)


@triton.jit
def _q_kernel(w_ptr, noise_ptr, out_ptr, n, LO: tl.constexpr, HAS_NOISE: tl.constexpr, T52: tl.constexpr,
              BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float64)
    a = tl.minimum(tl.maximum(tl.abs(w), _pow2_f64(tl.full((BLOCK,), LO, tl.int64))), 1.0)
    if HAS_NOISE:
        u = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float64)
        l2 = tl.log2(a)
        fl = tl.floor(l2)
        p = (fl + tl.where(u < l2 - fl, 1.0, 0.0)).to(tl.int64)
    else:
        bits = a.to(tl.int64, bitcast=True)
        e = ((bits >> 52) & 0x7FF) - 1023
        f = bits & 0xFFFFFFFFFFFFF
        p = e + tl.where(f >= T52, 1, 0).to(tl.int64)
    p = tl.minimum(tl.maximum(p, LO), 0)
    out = _sign_f64(w) * _pow2_f64(p)
    out = tl.where(w != w, w, out)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ps_kernel(p_ptr, s_ptr, noise_ptr, out_ptr, n, LO: tl.constexpr, HAS_NOISE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    pv = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float64)
    sv = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float64)
    v = tl.minimum(tl.maximum(pv, LO * 1.0), 0.0)
    if HAS_NOISE:
        u = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float64)
        fl = tl.floor(v)
        r = fl + tl.where(u < v - fl, 1.0, 0.0)
    else:
        r = _round_half_even(v)
    out = _pow2_f64(r.to(tl.int64)) * _sign_f64(_round_half_even(sv))
    bad = (pv != pv) | (sv != sv)
    out = tl.where(bad, float("nan"), out)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fixed_kernel(x_ptr, out_ptr, n, FRAC: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float64)
    up = _pow2_f64(tl.full((BLOCK,), FRAC, tl.int64))
    down = _pow2_f64(tl.full((BLOCK,), -FRAC, tl.int64))
    v = tl.floor(x * up) * down
    v = tl.minimum(tl.maximum(v, LO), HI)
    v = tl.where(x != x, x, v)
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


_q = torch.library.wrap_triton(_q_kernel)
_ps = torch.library.wrap_triton(_ps_kernel)
_fixed = torch.library.wrap_triton(_fixed_kernel)


# --------------------------------------------------------------------------------------
# packed linear
# --------------------------------------------------------------------------------------


def _packed_configs():
    if _INTERPRET:
        return [triton.Config({"BN": 16, "BO": 16, "BK": 32}, num_warps=1, num_stages=1)]
    full = [triton.Config({"BN": bn, "BO": bo, "BK": bk}, num_warps=w, num_stages=s)
            for bn, bo, bk, w, s in ((16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (16, 32, 256, 4, 4),
                                     (16, 64, 256, 4, 3), (32, 64, 128, 4, 4), (64, 128, 64, 8, 3),
                                     (128, 128, 64, 8, 3), (128, 64, 64, 4, 3))]
    return choose(full)


@triton.autotune(configs=_packed_configs(), key=["N_BUCKET", "O", "K", "BITS", "DOT"])
@triton.jit
def _packed_linear_kernel(x_ptr, codes_ptr, scales_ptr, zc_ptr, bias_ptr, y_ptr, N, O, K, N_BUCKET, sxn, sxk,
                          row_bytes, syn, syo, BITS: tl.constexpr, DOT: tl.constexpr, HAS_BIAS: tl.constexpr,
                          BN: tl.constexpr, BO: tl.constexpr, BK: tl.constexpr):
    """DOT: 0 = IEEE float32, 1 = bfloat16, 2 = float16 (tensor cores, fp32 accumulation)."""
    pid_o = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_o = pid_o * BO + tl.arange(0, BO)
    mask_n = offs_n < N
    mask_o = offs_o < O
    zc = tl.load(zc_ptr + offs_o, mask=mask_o, other=-1)
    crow = codes_ptr + offs_o.to(tl.int64) * row_bytes
    xrow = x_ptr + offs_n.to(tl.int64) * sxn
    HALF: tl.constexpr = 1 << (BITS - 1)
    acc = tl.zeros((BN, BO), dtype=tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        mask_k = offs_k < K
        xt = tl.load(xrow[:, None] + offs_k[None, :] * sxk, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        wmask = mask_k[:, None] & mask_o[None, :]
        if BITS == 4:
            byte = tl.load(crow[None, :] + (offs_k[:, None] >> 1), mask=wmask, other=0).to(tl.int32)
            c = (byte >> ((offs_k[:, None] & 1) * 4)) & 15
        elif BITS == 8:
            c = tl.load(crow[None, :] + offs_k[:, None], mask=wmask, other=0).to(tl.int32)
        else:
            lo = tl.load(crow[None, :] + 2 * offs_k[:, None], mask=wmask, other=0).to(tl.int32)
            hi = tl.load(crow[None, :] + 2 * offs_k[:, None] + 1, mask=wmask, other=0).to(tl.int32)
            c = lo | (hi << 8)
        m = c & (HALF - 1)
        # w' = 2^-m from the float32 bits: exponent field 127 - m, or a subnormal, or 0
        mag_bits = tl.where(m <= 126, (127 - m) << 23, tl.where(m <= 149, 1 << tl.minimum(tl.maximum(149 - m, 0), 22),
                                                                 0))
        mag = mag_bits.to(tl.float32, bitcast=True)
        w = tl.where(c >= HALF, -mag, mag)
        w = tl.where((c == zc[None, :]) | (wmask == 0), 0.0, w)
        if DOT == 0:
            acc += tl.dot(xt.to(tl.float32), w, input_precision="ieee")
        elif DOT == 1:
            acc += tl.dot(xt.to(tl.bfloat16), w.to(tl.bfloat16))
        else:
            acc += tl.dot(xt.to(tl.float16), w.to(tl.float16))
    # the channel scale 2^E (E an int32 exponent), applied in float64 then rounded once
    e = tl.load(scales_ptr + offs_o, mask=mask_o, other=0).to(tl.int64)
    e = tl.minimum(tl.maximum(e, -1022), 1023)
    out = acc.to(tl.float64) * ((e + 1023) << 52).to(tl.float64, bitcast=True)[None, :]
    out = out.to(tl.float32)
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_o, mask=mask_o, other=0.0).to(tl.float32)[None, :]
    yptr = y_ptr + offs_n.to(tl.int64)[:, None] * syn + offs_o[None, :] * syo
    tl.store(yptr, out.to(y_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_o[None, :])


_packed_linear = torch.library.wrap_triton(_packed_linear_kernel)


# 4-bit codes, K % 8 == 0, at most 16 rows of x: a split-K GEMV.  The codes are read as
# 32-bit words (8 codes, contiguous along K), and the K range is split across programs
# so that even batch 1 keeps every SM streaming codes; the partial sums go to a float32
# buffer that the epilogue kernel adds up, scales by 2^E and casts.
_GEMV_MAX_ROWS = 16


def _gemv_configs():
    if _INTERPRET:
        return [triton.Config({"BO": 16, "BKW": 4}, num_warps=1, num_stages=1)]
    full = [triton.Config({"BO": bo, "BKW": bkw}, num_warps=w, num_stages=st)
            for bo, bkw, w, st in ((64, 16, 4, 3), (128, 16, 4, 3), (64, 32, 4, 3), (32, 32, 4, 4), (128, 8, 4, 4))]
    return choose(full)


@triton.autotune(configs=_gemv_configs(), key=["N_BUCKET", "O", "KW", "DOT"])
@triton.jit
def _packed_gemv_kernel(x_ptr, w32_ptr, zc_ptr, part_ptr, N, O, KW, N_BUCKET, sxn, sxk, swo, kw_per,
                        DOT: tl.constexpr, BO: tl.constexpr, BKW: tl.constexpr):
    """part[s, n, o] = sum over words [s kw_per, (s + 1) kw_per) of x[n, k] w'[o, k]."""
    BN: tl.constexpr = 16
    BK: tl.constexpr = BKW * 8
    pid_o = tl.program_id(0)
    pid_s = tl.program_id(1)
    kw_lo = pid_s * kw_per
    kw_hi = tl.minimum(kw_lo + kw_per, KW)
    offs_o = pid_o * BO + tl.arange(0, BO)
    mask_o = offs_o < O
    offs_n = tl.arange(0, BN)
    mask_n = offs_n < N
    zc = tl.load(zc_ptr + offs_o, mask=mask_o, other=-1)
    wrow = w32_ptr + offs_o.to(tl.int64) * swo
    xrow = x_ptr + offs_n.to(tl.int64) * sxn
    nib = 4 * tl.arange(0, 8)
    acc = tl.zeros((BN, BO), dtype=tl.float32)
    for kw in range(kw_lo, kw_hi, BKW):
        offs_kw = kw + tl.arange(0, BKW)
        mask_kw = offs_kw < kw_hi
        words = tl.load(wrow[:, None] + offs_kw[None, :], mask=mask_o[:, None] & mask_kw[None, :], other=0)
        c = tl.reshape((words[:, :, None] >> nib[None, None, :]) & 15, (BO, BK))  # code of k = 8 word + j
        mag = ((127 - (c & 7)) << 23).to(tl.float32, bitcast=True)
        w = tl.where(c >= 8, -mag, mag)
        w = tl.where(c == zc[:, None], 0.0, w)
        offs_k = kw * 8 + tl.arange(0, BK)
        xt = tl.load(xrow[:, None] + offs_k[None, :] * sxk, mask=mask_n[:, None] & (offs_k < kw_hi * 8)[None, :],
                     other=0.0)
        if DOT == 0:
            acc += tl.dot(xt.to(tl.float32), tl.trans(w), input_precision="ieee")
        elif DOT == 1:
            acc += tl.dot(xt.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)))
        else:
            acc += tl.dot(xt.to(tl.float16), tl.trans(w.to(tl.float16)))
    pptr = part_ptr + (pid_s * N + offs_n.to(tl.int64))[:, None] * O + offs_o[None, :]
    tl.store(pptr, acc, mask=mask_n[:, None] & mask_o[None, :])


@triton.jit
def _packed_epilogue_kernel(part_ptr, scales_ptr, bias_ptr, y_ptr, N, O, SPLIT, syn, syo, HAS_BIAS: tl.constexpr,
                            BLOCK: tl.constexpr):
    """y[n, o] = (sum_s part[s, n, o]) 2^E[o] (+ bias[o]), as the one-pass kernel's end."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N * O
    n = offs // O
    o = offs % O
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, SPLIT):
        acc += tl.load(part_ptr + s * N * O + offs, mask=mask, other=0.0)
    e = tl.load(scales_ptr + o, mask=mask, other=0).to(tl.int64)
    e = tl.minimum(tl.maximum(e, -1022), 1023)
    out = (acc.to(tl.float64) * ((e + 1023) << 52).to(tl.float64, bitcast=True)).to(tl.float32)
    if HAS_BIAS:
        out += tl.load(bias_ptr + o, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + n.to(tl.int64) * syn + o * syo, out.to(y_ptr.dtype.element_ty), mask=mask)


_packed_gemv = torch.library.wrap_triton(_packed_gemv_kernel)
_packed_epilogue = torch.library.wrap_triton(_packed_epilogue_kernel)



# --------------------------------------------------------------------------------------
# launchers (the op schemas' arguments; shiftadd/_ops.py)
# --------------------------------------------------------------------------------------


def _check_float(op, name, t):
    if t.dtype not in DTYPES:
        raise TypeError(f"shiftadd::{op} (triton): {name} must be float16, bfloat16 or float32, got {t.dtype}")


def _check_like(op, name, t, ref, ref_name):
    if t.shape != ref.shape or t.device != ref.device:
        raise ValueError(f"shiftadd::{op} (triton): {name} ({tuple(t.shape)}, {t.device}) must match "
                         f"{ref_name} ({tuple(ref.shape)}, {ref.device})")


def _check_bits(op, weight_bits):
    if not 2 <= weight_bits <= 8:
        raise ValueError(f"shiftadd::{op} (triton): weight_bits must be in [2, 8], got {weight_bits}")


def _grid(n):
    return (triton.cdiv(n, _BLOCK),)


def _check_out_dtype(op, out_dtype):
    if out_dtype is not None and out_dtype not in DTYPES:
        raise TypeError(f"shiftadd::{op} (triton): out_dtype must be float16, bfloat16, float32 or None, "
                        f"got {out_dtype}")


def quantize_pot_q(weight: torch.Tensor, weight_bits: int, noise: Optional[torch.Tensor],
                   out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """weight (any shape; float16/bfloat16/float32) -> DeepShift-Q power of two, same shape,
    dtype out_dtype (default: the weight's; the store rounds the exact value once)."""
    _check_float("quantize_pot_q", "weight", weight)
    _check_bits("quantize_pot_q", weight_bits)
    _check_out_dtype("quantize_pot_q", out_dtype)
    w = weight.contiguous()
    out = torch.empty(weight.shape, dtype=out_dtype or weight.dtype, device=weight.device)
    if noise is not None:
        _check_like("quantize_pot_q", "noise", noise, weight, "weight")
        noise = noise.contiguous()
    n = w.numel()
    if n:
        _q[_grid(n)](w, w if noise is None else noise, out, n, LO=-(2 ** (weight_bits - 1) - 1),
                     HAS_NOISE=noise is not None, T52=_T52, BLOCK=_BLOCK)
    return out


def quantize_pot_ps(shift: torch.Tensor, sign: torch.Tensor, weight_bits: int, noise: Optional[torch.Tensor],
                    out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """shift P and sign S (same shape; float16/bfloat16/float32) -> DeepShift-PS weight,
    dtype out_dtype (default: P's)."""
    _check_float("quantize_pot_ps", "shift", shift)
    _check_float("quantize_pot_ps", "sign", sign)
    _check_like("quantize_pot_ps", "sign", sign, shift, "shift")
    _check_bits("quantize_pot_ps", weight_bits)
    _check_out_dtype("quantize_pot_ps", out_dtype)
    p, s = shift.contiguous(), sign.contiguous()
    out = torch.empty(shift.shape, dtype=out_dtype or shift.dtype, device=shift.device)
    if noise is not None:
        _check_like("quantize_pot_ps", "noise", noise, shift, "shift")
        noise = noise.contiguous()
    n = p.numel()
    if n:
        _ps[_grid(n)](p, s, p if noise is None else noise, out, n, LO=-(2 ** (weight_bits - 1) - 2),
                      HAS_NOISE=noise is not None, BLOCK=_BLOCK)
    return out


def round_to_fixed(x: torch.Tensor, int_bits: int, frac_bits: int) -> torch.Tensor:
    """x (any shape; float16/bfloat16/float32) -> fixed-point rounded, same shape and dtype."""
    _check_float("round_to_fixed", "x", x)
    if not 1 <= int_bits <= 64 or not 0 <= frac_bits <= 64:
        raise ValueError(f"shiftadd::round_to_fixed (triton): int_bits must be in [1, 64] and frac_bits in [0, 64], "
                         f"got {int_bits}, {frac_bits}")
    xc = x.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    bound = 2.0 ** (int_bits - 1)
    hi = float(torch.tensor(bound - 1, dtype=torch.float32))  # the reference clamps with a float32 bound
    n = xc.numel()
    if n:
        _fixed[_grid(n)](xc, out, n, FRAC=frac_bits, LO=-bound, HI=hi, BLOCK=_BLOCK)
    return out


def shift_linear_packed(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zero_codes: torch.Tensor,
                        bits: int, out_features: int, in_features: int, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x (N, K) float16/bfloat16/float32 @ packed W (O, K)^T + bias (O,) -> (N, O), x's dtype."""
    op = "shift_linear_packed (triton)"

    def check(ok, msg):  # RuntimeError, like the checks of the other backends
        if not ok:
            raise RuntimeError(f"{op}: {msg}")

    check(x.dtype in DTYPES, f"x must be float16, bfloat16 or float32, got {x.dtype}")
    check(bits in (4, 8, 16), f"bits must be 4, 8 or 16, got {bits}")
    check(codes.dtype == torch.uint8, f"codes must be uint8, got {codes.dtype}")
    check(scales.dtype == torch.int32, f"scales must be int32, got {scales.dtype}")
    check(zero_codes.dtype == torch.int32, f"zero_codes must be int32, got {zero_codes.dtype}")
    o, k = out_features, in_features
    rb = (k + 1) // 2 if bits == 4 else k * (bits // 8)
    check(tuple(codes.shape) == (o, rb), f"codes must have shape ({o}, {rb}) for {o}x{k} {bits}-bit codes, "
                                         f"got {tuple(codes.shape)}")
    for name, t in (("scales", scales), ("zero_codes", zero_codes)):
        check(tuple(t.shape) == (o,), f"{name} must have shape ({o},), got {tuple(t.shape)}")
    check(x.dim() == 2 and x.shape[1] == k, f"x must be (N, {k}), got {tuple(x.shape)}")
    check(bias is None or (bias.dtype == x.dtype and tuple(bias.shape) == (o,)),
          f"bias must be {x.dtype} ({o},), got {None if bias is None else (bias.dtype, tuple(bias.shape))}")
    for name, t in (("codes", codes), ("scales", scales), ("zero_codes", zero_codes), ("bias", bias)):
        check(t is None or t.device == x.device, f"{name} is on {t.device if t is not None else None}, x on {x.device}")
    n = x.shape[0]
    y = torch.empty((n, o), dtype=x.dtype, device=x.device)
    if n == 0 or o == 0:
        return y
    if k == 0:
        y.copy_(bias.expand(n, o) if bias is not None else torch.zeros((), dtype=x.dtype, device=x.device))
        return y
    cc, sc, zc = codes.contiguous(), scales.contiguous(), zero_codes.contiguous()
    dot = 1 if x.dtype == torch.bfloat16 else 2 if (x.dtype == torch.float16 and bits == 4) else 0

    n_bucket = 1 << max(0, (n - 1).bit_length())  # autotune per power-of-two batch size
    # storage_offset, not data_ptr: under torch.compile the launcher sees FunctionalTensors
    # (allocations themselves are aligned)
    if bits == 4 and k % 8 == 0 and n <= _GEMV_MAX_ROWS and cc.storage_offset() % 4 == 0:
        kw = k // 8
        # about 4 programs per SM at the narrowest tile (64 channels), each >= 64 words of K,
        # every split starting at a multiple of 32 words (aligned, vectorisable loads)
        split = max(1, min(triton.cdiv(4 * num_sms(x.device), triton.cdiv(o, 64)), triton.cdiv(kw, 64)))
        kw_per = triton.cdiv(triton.cdiv(kw, split), 32) * 32
        split = triton.cdiv(kw, kw_per)
        part = torch.empty((split, n, o), dtype=torch.float32, device=x.device)
        _packed_gemv[lambda meta: (triton.cdiv(o, meta["BO"]), split)](
            x, cc.view(torch.int32), zc, part, n, o, kw, n_bucket, x.stride(0), x.stride(1), rb // 4, kw_per, DOT=dot)
        block = 256
        _packed_epilogue[(triton.cdiv(n * o, block),)](part, sc, bias if bias is not None else sc, y, n, o, split,
                                                       y.stride(0), y.stride(1), HAS_BIAS=bias is not None,
                                                       BLOCK=block)
        return y

    def grid(meta):
        return (triton.cdiv(o, meta["BO"]), triton.cdiv(n, meta["BN"]))

    _packed_linear[grid](x, cc, sc, zc, bias if bias is not None else sc, y, n, o, k, n_bucket, x.stride(0),
                         x.stride(1), rb, y.stride(0), y.stride(1), BITS=bits, DOT=dot, HAS_BIAS=bias is not None)
    return y


FAMILIES = {
    "quantize_pot_q": quantize_pot_q,
    "quantize_pot_ps": quantize_pot_ps,
    "round_to_fixed": round_to_fixed,
    "shift_linear_packed": shift_linear_packed,
}
