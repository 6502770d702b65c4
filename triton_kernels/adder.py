"""Triton kernels of the adder (AdderNet, L1-distance) operators.

Every operator is one of three reductions over the implicit im2col matrix X (rows
r = (n, oy, ox), columns k = (c, i, j) of one group, padded positions are zeros of x)
and the weight matrix W (O x K per group); linear is the 1x1 convolution of a 1x1 image:

    forward           Y[r, o]  = -sum_k |X[r, k] - W[o, k]|                 (_fwd_kernel)
    grad input        dx[p, c] =  sum_{i, j, o} g[r(p, i, j), o] * f(W[o, (c, i, j)] - x[p, c])
                      f = hardtanh ("addernet") or sign ("exact")           (_grad_input_kernel)
    grad weight exact dW[o, k] =  sum_r g[r, o] * sign(X[r, k] - W[o, k])   (_grad_weight_kernel)

(the AdderNet weight gradient is (g^T X) - W * sum_r g, computed with torch ops).

Tiling.  No tl.dot: each program owns an fp32 [BM, BN] output tile and loops over the
reduction in steps of BK, loading a [BK, BM] and a [BK, BN] operand tile and adding the
reduction over BK of a [BK, BM, BN] elementwise expression.  Written naively, Triton's
default layout spreads the BK axis of that 3-D tensor over threads or warps, so every step
costs shuffles or a shared-memory reduction.  Instead the tile is held as a 5-D tensor
[BK, TM, TN, BM // TM, BN // TN] (tile row m = m' * TM + tm, column n = n' * TN + tn): the
default layout gives the two trailing axes to lanes and warps and leaves each thread a
register tile of TM x TN outputs times all of BK, so the reduction over BK is in-thread and
each step is TM + TN shared-memory reads (vectorised) for TM * TN * BK operations, as in a
classic register-blocked SGEMM.  (BM // TM) * (BN // TN) = 32 * num_warps in every
config.  The loops are `tl.range(..., num_stages=STAGES)` so the operand loads are
software-pipelined through shared memory with cp.async.

Conv specifics:
* forward: implicit GEMM; the reduction loop runs over (channel block, i, j), the input
  coordinates are computed from (row, i, j) and out-of-image loads are masked to 0.
* grad input is a gather, without atomics: each program owns a tile of input positions
  (n, iy, ix) x channels and sums over the (i, j, o) that reach it.  Positions are split
  by stride phase (iy % sh, ix % sw), one launch per phase, so that every (i, j) visited
  by a launch is valid for all its rows (no wasted work on stride-skipped taps) and the
  output coordinate oy = ty + (py + ph - i * dh) / sh needs no per-element division.
  Each dx element is written exactly once (deterministic).
* grad weight (exact): rows are split into S chunks (grid axis 2, S chosen to fill the
  GPU); each chunk writes an fp32 partial [S, O, Kg] that is summed with torch
  (deterministic, no atomics).
* groups: the group index is grid axis 1.

Offsets of a sample (n * stride_n) are int64; offsets inside one sample, row / column
indices and weight offsets are int32 (the launchers check that they fit).
"""

import math
import os

import torch
import triton
import triton.language as tl

from ._configs import choose, num_sms

GRAD_MODES = ("addernet", "exact")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_INT32_MAX = 2**31 - 1


# --------------------------------------------------------------------------------------
# Autotune configurations
# --------------------------------------------------------------------------------------


def _config(bm, bn, bk, tm, tn, warps, stages):
    assert (bm // tm) * (bn // tn) == 32 * warps, "one TM x TN register tile per thread"
    return triton.Config({"BM": bm, "BN": bn, "BK": bk, "TM": tm, "TN": tn, "STAGES": stages},
                         num_warps=warps, num_stages=stages)


def _configs(full):
    """`full` on a GPU, as triton_kernels/_configs.py chooses; a single small config under
    TRITON_INTERPRET=1 (autotuning the numpy interpreter would take minutes)."""
    if _INTERPRET:
        return [_config(32, 32, 8, 4, 4, 2, 1)]
    return choose(full)


# forward: BM rows x BN output channels, BK reduction step
_FWD_CONFIGS = _configs([
    _config(64, 64, 8, 8, 4, 4, 3),
    _config(64, 64, 4, 8, 4, 4, 4),
    _config(128, 64, 8, 8, 4, 8, 3),
    _config(64, 128, 8, 4, 8, 8, 3),
    _config(128, 32, 8, 8, 4, 4, 3),
    _config(256, 16, 8, 8, 4, 4, 3),  # few output channels per group
])

# grad input: BM input positions x BN channels, BK output channels per step
_GI_CONFIGS = _configs([
    _config(64, 64, 8, 8, 4, 4, 3),
    _config(64, 64, 4, 8, 4, 4, 4),
    _config(128, 64, 8, 8, 4, 8, 3),
    _config(128, 32, 8, 8, 4, 4, 3),
    _config(256, 16, 8, 8, 4, 4, 3),  # few channels per group
])

# grad weight: BM output channels x BN reduction columns (c, i, j), BK rows per step
_GW_CONFIGS = _configs([
    _config(64, 64, 8, 8, 4, 4, 3),
    _config(64, 64, 4, 8, 4, 4, 4),
    _config(64, 128, 8, 4, 8, 8, 3),
    _config(32, 128, 8, 4, 8, 4, 3),
    _config(16, 256, 8, 4, 8, 4, 3),  # few output channels per group
])


# --------------------------------------------------------------------------------------
# Register-tile helpers (see the module docstring for the 5-D layout)
# --------------------------------------------------------------------------------------


@triton.jit
def _bcast_m(t, R: tl.constexpr, BM: tl.constexpr, TM: tl.constexpr):
    """[R, BM] -> [R, TM, 1, BM // TM, 1], tile row m = m' * TM + tm."""
    t = tl.permute(tl.reshape(t, (R, BM // TM, TM)), (0, 2, 1))
    return t[:, :, None, :, None]


@triton.jit
def _bcast_n(t, R: tl.constexpr, BN: tl.constexpr, TN: tl.constexpr):
    """[R, BN] -> [R, 1, TN, 1, BN // TN], tile column n = n' * TN + tn."""
    t = tl.permute(tl.reshape(t, (R, BN // TN, TN)), (0, 2, 1))
    return t[:, None, :, None, :]


@triton.jit
def _to_acc(t, BM: tl.constexpr, BN: tl.constexpr, TM: tl.constexpr, TN: tl.constexpr):
    """[BM, BN] -> accumulator form [TM, TN, BM // TM, BN // TN]."""
    return tl.permute(tl.reshape(t, (BM // TM, TM, BN // TN, TN)), (1, 3, 0, 2))


@triton.jit
def _from_acc(acc, BM: tl.constexpr, BN: tl.constexpr):
    """Accumulator form [TM, TN, BM // TM, BN // TN] -> [BM, BN]."""
    return tl.reshape(tl.permute(acc, (2, 0, 3, 1)), (BM, BN))


@triton.jit
def _clamp(d, lim):
    """clamp(d, -lim, lim); NaN stays NaN (as torch.clamp)."""
    d = tl.maximum(d, -lim, propagate_nan=tl.PropagateNan.ALL)
    return tl.minimum(d, lim, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _sign_diff(a, b):
    """torch.sign(a - b) as (a > b) - (a < b), float32: exact for every pair (no subtraction),
    0 when a == b, and 0 when either is NaN or both are the same infinity (the difference
    is NaN and torch.sign(NaN) == 0).  Compiles to two compare-to-float instructions
    (FSET.BF) and an add, without predicate registers."""
    return (a > b).to(tl.float32) - (a < b).to(tl.float32)


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------


@triton.autotune(configs=_FWD_CONFIGS, key=["R", "Og", "Cg", "KH", "KW"])
@triton.jit
def _fwd_kernel(
    x_ptr, w_ptr, y_ptr,
    R, Og, Cg, H, W, Ho, Wo,
    sxn, sxc, sxh, sxw,
    syn, syc, syh, syw,
    sh, sw, ph, pw, dh, dw,
    KH: tl.constexpr, KW: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, TM: tl.constexpr, TN: tl.constexpr,
    STAGES: tl.constexpr,
):
    """y[n, g*Og + o, oy, ox] = -sum_{c, i, j} |x[n, g*Cg + c, iy, ix] - w[g, i, j, c, o]|.

    x: (N, C, H, W) any strides, float16/bfloat16/float32; w: (G, KH, KW, Cg, Og)
    contiguous, x's dtype; y: (N, G*Og, Ho, Wo) any strides, x's dtype.  R = N*Ho*Wo.
    Grid: (cdiv(R, BM) * cdiv(Og, BN), G).
    """
    pid = tl.program_id(0)
    g = tl.program_id(1)
    num_n = tl.cdiv(Og, BN)
    pid_m = pid // num_n  # neighbouring programs share the x rows (L2 reuse)
    pid_n = pid % num_n

    r = pid_m * BM + tl.arange(0, BM)
    o = pid_n * BN + tl.arange(0, BN)
    r_ok = r < R
    o_ok = o < Og
    n = r // (Ho * Wo)
    oy = (r % (Ho * Wo)) // Wo
    ox = r % Wo
    x_row = x_ptr + n.to(tl.int64) * sxn  # [BM] sample pointers; offsets in a sample are int32
    x_chan = g * Cg * sxc
    iy0 = oy * sh - ph
    ix0 = ox * sw - pw
    w_grp = w_ptr + g * (KH * KW * Cg * Og)

    acc = tl.zeros((TM, TN, BM // TM, BN // TN), dtype=tl.float32)
    for t in tl.range(0, tl.cdiv(Cg, BK) * (KH * KW), num_stages=STAGES):
        ij = t % (KH * KW)
        c = (t // (KH * KW)) * BK + tl.arange(0, BK)
        c_ok = c < Cg
        iy = iy0 + (ij // KW) * dh
        ix = ix0 + (ij % KW) * dw
        in_img = r_ok & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        a = tl.load(x_row[None, :] + ((iy * sxh + ix * sxw)[None, :] + (x_chan + c * sxc)[:, None]),
                    mask=c_ok[:, None] & in_img[None, :], other=0.0).to(tl.float32)  # [BK, BM]
        b = tl.load(w_grp + ((ij * Cg + c) * Og)[:, None] + o[None, :],
                    mask=c_ok[:, None] & o_ok[None, :], other=0.0).to(tl.float32)  # [BK, BN]
        acc += tl.sum(tl.abs(_bcast_m(a, BK, BM, TM) - _bcast_n(b, BK, BN, TN)), axis=0)

    y = -_from_acc(acc, BM, BN)
    y_row = y_ptr + n.to(tl.int64) * syn + (oy * syh + ox * syw)  # [BM]
    tl.store(y_row[:, None] + ((g * Og + o) * syc)[None, :], y.to(y_ptr.dtype.element_ty),
             mask=r_ok[:, None] & o_ok[None, :])


@triton.autotune(configs=_GI_CONFIGS, key=["Rq", "Og", "Cg", "KH", "KW"])
@triton.jit
def _grad_input_kernel(
    g_ptr, x_ptr, w_ptr, dx_ptr,
    Rq, Og, Cg, H, W, Ho, Wo, Hq, Wq,
    sgn, sgc, sgh, sgw,
    sxn, sxc, sxh, sxw,
    sdn, sdc, sdh, sdw,
    py, px, i0, si, ni, j0, sj, nj,
    sh, sw, ph, pw, dh, dw,
    KH: tl.constexpr, KW: tl.constexpr, EXACT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, TM: tl.constexpr, TN: tl.constexpr,
    STAGES: tl.constexpr,
):
    """dx[n, g*Cg + c, iy, ix] = sum_{i, j, o} grad[n, g*Og + o, oy, ox]
                                  * f(w[g, i, j, o, c] - x[n, g*Cg + c, iy, ix])
    over the positions of one stride phase: iy = py + ty*sh, ix = px + tx*sw.

    The taps (i, j) that reach this phase are i = i0 + a*si (a < ni), j = j0 + b*sj
    (b < nj), all with (py + ph - i*dh) % sh == 0 (likewise for j), so that
    oy = ty + (py + ph - i*dh) // sh exactly; oy outside [0, Ho) is masked.
    grad: (N, G*Og, Ho, Wo), x and dx: (N, G*Cg, H, W), any strides, one dtype;
    w: (G, KH, KW, Og, Cg) contiguous.  f = sign if EXACT else hardtanh (clamp to [-1, 1]).
    Rq = N*Hq*Wq positions in this phase.  Grid: (cdiv(Rq, BM) * cdiv(Cg, BN), G).
    """
    pid = tl.program_id(0)
    g = tl.program_id(1)
    num_n = tl.cdiv(Cg, BN)
    pid_m = pid // num_n
    pid_n = pid % num_n

    q = pid_m * BM + tl.arange(0, BM)
    c = pid_n * BN + tl.arange(0, BN)
    q_ok = q < Rq
    c_ok = c < Cg
    n = q // (Hq * Wq)
    ty = (q % (Hq * Wq)) // Wq
    tx = q % Wq
    iy = py + ty * sh
    ix = px + tx * sw
    n64 = n.to(tl.int64)  # sample offsets are int64, offsets inside a sample int32

    x_row = x_ptr + n64 * sxn + (iy * sxh + ix * sxw)  # [BM]
    tile_ok = q_ok[:, None] & c_ok[None, :]
    xv = tl.load(x_row[:, None] + ((g * Cg + c) * sxc)[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    xv = _to_acc(xv, BM, BN, TM, TN)[None, :, :, :, :]  # [1, TM, TN, BM // TM, BN // TN]

    g_row = g_ptr + n64 * sgn  # [BM]
    g_chan = g * Og * sgc
    w_grp = w_ptr + g * (KH * KW * Og * Cg)

    acc = tl.zeros((TM, TN, BM // TM, BN // TN), dtype=tl.float32)
    taps = ni * nj
    for t in tl.range(0, tl.cdiv(Og, BK) * taps, num_stages=STAGES):
        o = (t // taps) * BK + tl.arange(0, BK)
        o_ok = o < Og
        i = i0 + ((t % taps) // nj) * si
        j = j0 + ((t % taps) % nj) * sj
        oy = ty + (py + ph - i * dh) // sh
        ox = tx + (px + pw - j * dw) // sw
        in_out = q_ok & (oy >= 0) & (oy < Ho) & (ox >= 0) & (ox < Wo)
        gv = tl.load(g_row[None, :] + ((oy * sgh + ox * sgw)[None, :] + (g_chan + o * sgc)[:, None]),
                     mask=o_ok[:, None] & in_out[None, :], other=0.0).to(tl.float32)  # [BK, BM]
        wv = tl.load(w_grp + (((i * KW + j) * Og + o) * Cg)[:, None] + c[None, :],
                     mask=o_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)  # [BK, BN]
        if EXACT:  # g * sign(w - x)
            acc += tl.sum(_bcast_m(gv, BK, BM, TM) * _sign_diff(_bcast_n(wv, BK, BN, TN), xv), axis=0)
        else:  # g * hardtanh(w - x)
            acc += tl.sum(_bcast_m(gv, BK, BM, TM) * _clamp(_bcast_n(wv, BK, BN, TN) - xv, 1.0), axis=0)

    dx_row = dx_ptr + n64 * sdn + (iy * sdh + ix * sdw)  # [BM]
    dx = _from_acc(acc, BM, BN).to(dx_ptr.dtype.element_ty)
    tl.store(dx_row[:, None] + ((g * Cg + c) * sdc)[None, :], dx, mask=tile_ok)


@triton.autotune(configs=_GW_CONFIGS, key=["R", "Og", "Cg", "KH", "KW"])
@triton.jit
def _grad_weight_kernel(
    g_ptr, x_ptr, w_ptr, part_ptr,
    R, Og, Cg, H, W, Ho, Wo, chunk,
    sgn, sgc, sgh, sgw,
    sxn, sxc, sxh, sxw,
    sh, sw, ph, pw, dh, dw,
    KH: tl.constexpr, KW: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, TM: tl.constexpr, TN: tl.constexpr,
    STAGES: tl.constexpr,
):
    """part[s, g*Og + o, k] = sum_{r in chunk s} grad[r, g*Og + o] * sign(X[r, k] - w[g*Og + o, k]),
    k = (c, i, j), X the implicit im2col of x (zeros at padded positions).

    grad: (N, G*Og, Ho, Wo) and x: (N, G*Cg, H, W), any strides, one dtype; w: (G*Og, Kg)
    contiguous (Kg = Cg*KH*KW); part: (S, G*Og, Kg) float32 contiguous.  R = N*Ho*Wo;
    chunk s covers rows [s*chunk, (s+1)*chunk).  Grid: (cdiv(Og, BM) * cdiv(Kg, BN), G, S).
    """
    pid = tl.program_id(0)
    g = tl.program_id(1)
    s = tl.program_id(2)
    Kg = Cg * (KH * KW)
    num_n = tl.cdiv(Kg, BN)
    pid_m = pid // num_n
    pid_n = pid % num_n

    o = pid_m * BM + tl.arange(0, BM)
    k = pid_n * BN + tl.arange(0, BN)
    o_ok = o < Og
    k_ok = k < Kg
    c = k // (KH * KW)
    i = (k % (KH * KW)) // KW
    j = k % KW
    tile_ok = o_ok[:, None] & k_ok[None, :]
    wv = tl.load(w_ptr + ((g * Og + o) * Kg)[:, None] + k[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    wv = _to_acc(wv, BM, BN, TM, TN)[None, :, :, :, :]  # [1, TM, TN, BM // TM, BN // TN]

    g_col = (g * Og + o) * sgc  # [BM]
    x_col = (g * Cg + c) * sxc  # [BN]

    acc = tl.zeros((TM, TN, BM // TM, BN // TN), dtype=tl.float32)
    r_end = tl.minimum(R, (s + 1) * chunk)
    for r0 in tl.range(s * chunk, r_end, BK, num_stages=STAGES):
        r = r0 + tl.arange(0, BK)
        r_ok = r < r_end
        n64 = (r // (Ho * Wo)).to(tl.int64)  # sample offsets are int64, offsets inside a sample int32
        oy = (r % (Ho * Wo)) // Wo
        ox = r % Wo
        g_row = g_ptr + n64 * sgn + (oy * sgh + ox * sgw)  # [BK]
        gv = tl.load(g_row[:, None] + g_col[None, :],
                     mask=r_ok[:, None] & o_ok[None, :], other=0.0).to(tl.float32)  # [BK, BM]
        iy = (oy * sh - ph)[:, None] + (i * dh)[None, :]
        ix = (ox * sw - pw)[:, None] + (j * dw)[None, :]
        in_img = r_ok[:, None] & k_ok[None, :] & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        xv = tl.load((x_ptr + n64 * sxn)[:, None] + (x_col[None, :] + iy * sxh + ix * sxw),
                     mask=in_img, other=0.0).to(tl.float32)  # [BK, BN]
        acc += tl.sum(_bcast_m(gv, BK, BM, TM) * _sign_diff(_bcast_n(xv, BK, BN, TN), wv), axis=0)

    part_row = s.to(tl.int64) * (tl.num_programs(1) * Og) + g * Og + o  # [BM] rows of part viewed as (S*O, Kg)
    part_off = (part_row * Kg)[:, None] + k[None, :]
    tl.store(part_ptr + part_off, _from_acc(acc, BM, BN), mask=tile_ok)


_fwd = torch.library.wrap_triton(_fwd_kernel)
_grad_input = torch.library.wrap_triton(_grad_input_kernel)
_grad_weight = torch.library.wrap_triton(_grad_weight_kernel)


# --------------------------------------------------------------------------------------
# Argument checking and geometry
# --------------------------------------------------------------------------------------


def _check_mode(grad_mode):
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")


def _check_tensors(name, x, weight, grad_out=None):
    for t, what in ((x, "x"), (weight, "weight"), (grad_out, "grad_out")):
        if t is None:
            continue
        if t.dtype not in DTYPES:
            raise ValueError(f"{name}: the Triton kernels compute in {DTYPES}; {what} is {t.dtype}")
        if t.dtype != x.dtype:
            raise ValueError(f"{name}: {what} dtype {t.dtype} does not match x dtype {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name}: {what} is on {t.device} but x is on {x.device}")


def _sample_extent(t):
    """Largest element offset inside one sample t[n] (the kernels index samples in int64,
    elements inside a sample in int32)."""
    return sum((size - 1) * stride for size, stride in zip(t.shape[1:], t.stride()[1:]) if size > 0)


def _check_int32(name, **sizes):
    for what, v in sizes.items():
        if v > _INT32_MAX:
            raise ValueError(f"{name}: {what} = {v} exceeds the int32 index range of the Triton kernels")


class _Geometry:
    """A convolution problem: x (N, C, H, W), weight (O, Cg, KH, KW), groups G."""

    def __init__(self, name, x, weight, stride, padding, dilation, groups, grad_out=None):
        if x.dim() != 4 or weight.dim() != 4:
            raise ValueError(f"{name}: x and weight must be 4-D, got {x.dim()}-D and {weight.dim()}-D")
        if len(stride) != 2 or len(padding) != 2 or len(dilation) != 2:
            raise ValueError(f"{name}: stride, padding and dilation must have two entries")
        self.N, self.C, self.H, self.W = x.shape
        self.O, self.Cg, self.KH, self.KW = weight.shape
        self.G = groups
        if groups < 1 or self.C != self.Cg * groups or self.O % groups != 0:
            raise ValueError(f"{name}: channels do not fit: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
                             f"groups {groups}")
        if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
            raise ValueError(f"{name}: stride {stride} and dilation {dilation} must be >= 1, padding {padding} >= 0")
        self.sh, self.sw = stride
        self.ph, self.pw = padding
        self.dh, self.dw = dilation
        self.Og = self.O // groups
        self.Ho = (self.H + 2 * self.ph - self.dh * (self.KH - 1) - 1) // self.sh + 1
        self.Wo = (self.W + 2 * self.pw - self.dw * (self.KW - 1) - 1) // self.sw + 1
        if self.Ho <= 0 or self.Wo <= 0:
            raise ValueError(f"{name}: output would be empty ({self.Ho}x{self.Wo})")
        self.R = self.N * self.Ho * self.Wo
        if grad_out is not None and tuple(grad_out.shape) != (self.N, self.O, self.Ho, self.Wo):
            raise ValueError(f"{name}: grad_out has shape {tuple(grad_out.shape)}, expected "
                             f"{(self.N, self.O, self.Ho, self.Wo)}")
        if groups > 65535:
            raise ValueError(f"{name}: groups = {groups} exceeds the CUDA grid limit of 65535")
        sample = [x] if grad_out is None else [x, grad_out]
        _check_int32(name, rows=self.R, input_positions=self.N * self.H * self.W, weight_numel=weight.numel(),
                     sample_extent=max([self.C * self.H * self.W, self.O * self.Ho * self.Wo]
                                       + [_sample_extent(t) for t in sample]))

    def conv_args(self):
        return (self.sh, self.sw, self.ph, self.pw, self.dh, self.dw)


def _conv_memory_format(x):
    """Channels-last exactly when x is channels-last and not also contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _taps(phase, pad, dil, stride, k):
    """Taps i in [0, k) with (phase + pad - i*dil) % stride == 0, as (first, step, count)."""
    step = stride // math.gcd(dil, stride)
    for first in range(min(step, k)):
        if (phase + pad - first * dil) % stride == 0:
            return first, step, (k - 1 - first) // step + 1
    return 0, 1, 0



# --------------------------------------------------------------------------------------
# Launch (x, weight 4-D; outputs preallocated by the public launchers)
# --------------------------------------------------------------------------------------


def _launch_forward(geo, x, weight, y):
    """y (N, O, Ho, Wo), any strides, <- forward."""
    if geo.R == 0 or geo.Og == 0:
        return
    # (O, Cg, KH, KW) -> (G, KH, KW, Cg, Og): the [BK, BN] weight tile is contiguous along o
    wt = weight.reshape(geo.G, geo.Og, geo.Cg, geo.KH, geo.KW).permute(0, 3, 4, 2, 1).contiguous()

    def grid(meta):
        return (triton.cdiv(geo.R, meta["BM"]) * triton.cdiv(geo.Og, meta["BN"]), geo.G)

    _fwd[grid](x, wt, y, geo.R, geo.Og, geo.Cg, geo.H, geo.W, geo.Ho, geo.Wo,
               *x.stride(), *y.stride(), *geo.conv_args(), KH=geo.KH, KW=geo.KW)


def _launch_grad_input(geo, grad_out, x, weight, dx, exact):
    """dx (N, C, H, W), any strides, <- grad input (every element written)."""
    if geo.N * geo.C * geo.H * geo.W == 0:
        return
    if geo.Og == 0:
        dx.zero_()
        return
    # (O, Cg, KH, KW) -> (G, KH, KW, Og, Cg): the [BK, BN] weight tile is contiguous along c
    wt = weight.reshape(geo.G, geo.Og, geo.Cg, geo.KH, geo.KW).permute(0, 3, 4, 1, 2).contiguous()
    for py in range(min(geo.sh, geo.H)):
        i0, si, ni = _taps(py, geo.ph, geo.dh, geo.sh, geo.KH)
        hq = triton.cdiv(geo.H - py, geo.sh)
        for px in range(min(geo.sw, geo.W)):
            j0, sj, nj = _taps(px, geo.pw, geo.dw, geo.sw, geo.KW)
            wq = triton.cdiv(geo.W - px, geo.sw)
            rq = geo.N * hq * wq

            def grid(meta, rq=rq):
                return (triton.cdiv(rq, meta["BM"]) * triton.cdiv(geo.Cg, meta["BN"]), geo.G)

            _grad_input[grid](grad_out, x, wt, dx, rq, geo.Og, geo.Cg, geo.H, geo.W, geo.Ho, geo.Wo, hq, wq,
                              *grad_out.stride(), *x.stride(), *dx.stride(),
                              py, px, i0, si, ni, j0, sj, nj, *geo.conv_args(),
                              KH=geo.KH, KW=geo.KW, EXACT=exact)


def _launch_grad_weight_exact(geo, grad_out, x, weight):
    """-> float32 (O, Cg*KH*KW), the exact-mode weight gradient."""
    kg = geo.Cg * geo.KH * geo.KW
    if geo.R == 0 or geo.O * kg == 0:
        return x.new_zeros((geo.O, kg), dtype=torch.float32)
    # split the rows so that about two waves of programs of 64 x 64 outputs run
    tiles = geo.G * triton.cdiv(geo.Og, 64) * triton.cdiv(kg, 64)
    splits = max(1, min(triton.cdiv(geo.R, 1024), triton.cdiv(2 * num_sms(x.device), tiles), 65535))
    chunk = triton.cdiv(triton.cdiv(geo.R, splits), 64) * 64
    splits = triton.cdiv(geo.R, chunk)
    part = x.new_empty((splits, geo.O, kg), dtype=torch.float32)
    w2 = weight.reshape(geo.O, kg).contiguous()

    def grid(meta):
        return (triton.cdiv(geo.Og, meta["BM"]) * triton.cdiv(kg, meta["BN"]), geo.G, splits)

    _grad_weight[grid](grad_out, x, w2, part, geo.R, geo.Og, geo.Cg, geo.H, geo.W, geo.Ho, geo.Wo, chunk,
                       *grad_out.stride(), *x.stride(), *geo.conv_args(), KH=geo.KH, KW=geo.KW)
    return part.sum(0)


def _grad_weight_addernet(geo, grad_out, x, weight):
    """-> float32 (O, Cg, KH, KW): conv_backward(grad, x)_weight - W * sum(grad), in float32."""
    if geo.R == 0 or weight.numel() == 0:
        return torch.zeros(weight.shape, dtype=torch.float32, device=x.device)
    g32, x32 = grad_out.float(), x.float()
    dw = torch.ops.aten.convolution_backward(
        g32, x32, weight.float(), None, [geo.sh, geo.sw], [geo.ph, geo.pw], [geo.dh, geo.dw],
        False, [0, 0], geo.G, [False, True, False])[1]
    return dw - weight.float() * g32.sum((0, 2, 3)).view(geo.O, 1, 1, 1)


# --------------------------------------------------------------------------------------
# Public launchers (registered as shiftadd::triton_<family>)
# --------------------------------------------------------------------------------------


def _linear_geometry(name, x, weight, grad_out=None):
    _check_tensors(name, x, weight, grad_out)
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"{name}: expected x (N, K) and weight (O, K), got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if grad_out is not None and tuple(grad_out.shape) != (x.shape[0], weight.shape[0]):
        raise ValueError(f"{name}: grad_out has shape {tuple(grad_out.shape)}, expected "
                         f"{(x.shape[0], weight.shape[0])}")
    x4, w4 = x[:, :, None, None], weight[:, :, None, None]
    g4 = None if grad_out is None else grad_out[:, :, None, None]
    return _Geometry(name, x4, w4, (1, 1), (0, 0), (1, 1), 1, g4), x4, w4, g4


def adder_linear(x: torch.Tensor, weight: torch.Tensor, grad_mode: str) -> torch.Tensor:
    """x (N, K), weight (O, K) -> (N, O) = -sum_k |x[n, k] - weight[o, k]|, x's dtype, contiguous."""
    _check_mode(grad_mode)
    geo, x4, w4, _ = _linear_geometry("adder_linear", x, weight)
    y = x.new_empty((geo.N, geo.O))
    _launch_forward(geo, x4, w4, y[:, :, None, None])
    return y


def adder_linear_grad_input(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                            grad_mode: str) -> torch.Tensor:
    """grad_out (N, O) -> (N, K) = sum_o grad_out[n, o] * f(weight[o, k] - x[n, k]), contiguous."""
    _check_mode(grad_mode)
    geo, x4, w4, g4 = _linear_geometry("adder_linear_grad_input", x, weight, grad_out)
    dx = x.new_empty((geo.N, geo.C))
    _launch_grad_input(geo, g4, x4, w4, dx[:, :, None, None], grad_mode == "exact")
    return dx


def adder_linear_grad_weight(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                             grad_mode: str) -> torch.Tensor:
    """grad_out (N, O) -> (O, K), weight's dtype, contiguous."""
    _check_mode(grad_mode)
    geo, x4, w4, g4 = _linear_geometry("adder_linear_grad_weight", x, weight, grad_out)
    if grad_mode == "addernet":
        g32 = grad_out.float()
        dw = g32.t() @ x.float() - weight.float() * g32.sum(0)[:, None]
    else:
        dw = _launch_grad_weight_exact(geo, g4, x4, w4)
    return dw.to(weight.dtype)


def adder_conv2d(x: torch.Tensor, weight: torch.Tensor, stride: list[int], padding: list[int],
                 dilation: list[int], groups: int, grad_mode: str) -> torch.Tensor:
    """x (N, C, H, W), weight (O, C/groups, KH, KW) -> (N, O, Ho, Wo), x's dtype,
    channels-last when x is channels-last and not contiguous."""
    _check_mode(grad_mode)
    _check_tensors("adder_conv2d", x, weight)
    geo = _Geometry("adder_conv2d", x, weight, stride, padding, dilation, groups)
    y = torch.empty((geo.N, geo.O, geo.Ho, geo.Wo), dtype=x.dtype, device=x.device,
                    memory_format=_conv_memory_format(x))
    _launch_forward(geo, x, weight, y)
    return y


def adder_conv2d_grad_input(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: list[int],
                            padding: list[int], dilation: list[int], groups: int, grad_mode: str) -> torch.Tensor:
    """grad_out (N, O, Ho, Wo) -> (N, C, H, W) like x's memory format (see adder_conv2d)."""
    _check_mode(grad_mode)
    _check_tensors("adder_conv2d_grad_input", x, weight, grad_out)
    geo = _Geometry("adder_conv2d_grad_input", x, weight, stride, padding, dilation, groups, grad_out)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_conv_memory_format(x))
    _launch_grad_input(geo, grad_out, x, weight, dx, grad_mode == "exact")
    return dx


def adder_conv2d_grad_weight(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: list[int],
                             padding: list[int], dilation: list[int], groups: int, grad_mode: str) -> torch.Tensor:
    """grad_out (N, O, Ho, Wo) -> (O, C/groups, KH, KW), weight's dtype, contiguous."""
    _check_mode(grad_mode)
    _check_tensors("adder_conv2d_grad_weight", x, weight, grad_out)
    geo = _Geometry("adder_conv2d_grad_weight", x, weight, stride, padding, dilation, groups, grad_out)
    if grad_mode == "addernet":
        dw = _grad_weight_addernet(geo, grad_out, x, weight)
    else:
        dw = _launch_grad_weight_exact(geo, grad_out, x, weight).view(weight.shape)
    return dw.to(weight.dtype).contiguous()


FAMILIES = {
    "adder_linear": adder_linear,
    "adder_linear_grad_input": adder_linear_grad_input,
    "adder_linear_grad_weight": adder_linear_grad_weight,
    "adder_conv2d": adder_conv2d,
    "adder_conv2d_grad_input": adder_conv2d_grad_input,
    "adder_conv2d_grad_weight": adder_conv2d_grad_weight,
}
