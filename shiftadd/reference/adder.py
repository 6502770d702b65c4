"""Pure-PyTorch reference of the adder (L1) operators: the tests' oracle.

Exact AdderNet semantics (Chen et al., CVPR 2020), any device, any floating dtype (float16 and
bfloat16 are computed in float32, float64 in float64), and bounded memory: the
|X - W| broadcast is tiled over rows and output channels, and im2col over the batch,
so that each temporary stays under ``chunk_bytes()`` (64 MB by default,
``SHIFTADD_REF_CHUNK_MB`` changes it).  A ResNet-50 stage-3 layer (32x256x14x14,
3x3, 256 outputs) runs in well under 1 GB of extra memory, where the AdderNet unfold
implementation needs about 30 GB.

Definitions, with X the im2col patch matrix (padded positions are zeros of X):

    forward        Y[r, o]  = -sum_k |X[r, k] - W[o, k]|
    grad input     dX[r, k] =  sum_o g[r, o] * f(W[o, k] - X[r, k])
                   f = hardtanh (grad_mode "addernet") or sign ("exact")
    grad weight    "addernet": dW[o, k] = sum_r g[r, o] * (X[r, k] - W[o, k])
                                       = (g^T X)[o, k] - W[o, k] * sum_r g[r, o]
                   "exact":    dW[o, k] = sum_r g[r, o] * sign(X[r, k] - W[o, k])
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from .._ops import conv_memory_format, conv_output_size

GRAD_MODES = ("addernet", "exact")


def chunk_bytes() -> int:
    return int(float(os.environ.get("SHIFTADD_REF_CHUNK_MB", "64")) * (1 << 20))


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_mode(grad_mode: str) -> None:
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")


def _blocks(rows: int, cols: int, depth: int, itemsize: int):
    """Tile sizes (rb, cb) with rb * cb * depth * itemsize <= chunk_bytes()."""
    pairs = max(1, chunk_bytes() // max(1, depth * itemsize))
    rb = max(1, min(rows, math.isqrt(pairs)))
    cb = max(1, min(cols, pairs // rb))
    if cb == cols:  # spend what is left on rows
        rb = max(1, min(rows, pairs // max(1, cols)))
    return rb, cb


# --------------------------------------------------------------------------------------
# Matrix form (R x K patches against O x K weights), the core of both layers
# --------------------------------------------------------------------------------------


def l1_forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """-sum_k |a[r, k] - b[o, k]| -> (R, O), tiled."""
    R, K = a.shape
    O = b.shape[0]
    out = a.new_empty((R, O))
    rb, ob = _blocks(R, O, K, a.element_size())
    for r0 in range(0, R, rb):
        ar = a[r0:r0 + rb, None, :]
        for o0 in range(0, O, ob):
            out[r0:r0 + rb, o0:o0 + ob] = (ar - b[None, o0:o0 + ob, :]).abs_().sum(-1).neg_()
    return out


def l1_grad_a(g: torch.Tensor, a: torch.Tensor, b: torch.Tensor, grad_mode: str) -> torch.Tensor:
    """sum_o g[r, o] * f(b[o, k] - a[r, k]) -> (R, K)."""
    R, K = a.shape
    O = b.shape[0]
    out = torch.zeros_like(a)
    rb, ob = _blocks(R, O, K, a.element_size())
    for r0 in range(0, R, rb):
        ar = a[r0:r0 + rb, None, :]
        for o0 in range(0, O, ob):
            d = b[None, o0:o0 + ob, :] - ar
            d = d.clamp_(-1, 1) if grad_mode == "addernet" else d.sign_()
            out[r0:r0 + rb] += (g[r0:r0 + rb, o0:o0 + ob, None] * d).sum(1)
    return out


def l1_grad_b(g: torch.Tensor, a: torch.Tensor, b: torch.Tensor, grad_mode: str) -> torch.Tensor:
    """AdderNet: sum_r g[r, o] (a[r, k] - b[o, k]); exact: sum_r g[r, o] sign(a[r, k] - b[o, k])."""
    if grad_mode == "addernet":
        return g.t() @ a - b * g.sum(0)[:, None]
    R, K = a.shape
    O = b.shape[0]
    out = torch.zeros_like(b)
    rb, ob = _blocks(R, O, K, a.element_size())
    for r0 in range(0, R, rb):
        ar = a[r0:r0 + rb, None, :]
        for o0 in range(0, O, ob):
            s = (ar - b[None, o0:o0 + ob, :]).sign_()
            out[o0:o0 + ob] += (g[r0:r0 + rb, o0:o0 + ob, None] * s).sum(0)
    return out


# --------------------------------------------------------------------------------------
# Linear: x (N, K), weight (O, K)
# --------------------------------------------------------------------------------------


def adder_linear(x: torch.Tensor, weight: torch.Tensor, grad_mode: str = "addernet") -> torch.Tensor:
    """x (N, K), weight (O, K) -> (N, O), dtype of x."""
    _check_mode(grad_mode)
    acc = acc_dtype(x.dtype)
    return l1_forward(x.to(acc), weight.to(acc)).to(x.dtype)


def _check_grad(name: str, grad_out: torch.Tensor, shape: tuple) -> None:
    if tuple(grad_out.shape) != tuple(shape):
        raise ValueError(f"{name}: grad_out must have shape {tuple(shape)}, got {tuple(grad_out.shape)}")


def adder_linear_grad_input(grad_out, x, weight, grad_mode: str = "addernet"):
    _check_mode(grad_mode)
    _check_grad("adder_linear_grad_input", grad_out, (x.shape[0], weight.shape[0]))
    acc = acc_dtype(x.dtype)
    return l1_grad_a(grad_out.to(acc), x.to(acc), weight.to(acc), grad_mode).to(x.dtype)


def adder_linear_grad_weight(grad_out, x, weight, grad_mode: str = "addernet"):
    _check_mode(grad_mode)
    _check_grad("adder_linear_grad_weight", grad_out, (x.shape[0], weight.shape[0]))
    acc = acc_dtype(x.dtype)
    return l1_grad_b(grad_out.to(acc), x.to(acc), weight.to(acc), grad_mode).to(weight.dtype)


# --------------------------------------------------------------------------------------
# fp16x2 forward: the float16 arithmetic of the CUDA kernel adder_fwd_h2, bit for bit
# --------------------------------------------------------------------------------------

# columns per float16 partial sum (kH2Flush in csrc/cuda/adder_kernels.cu)
FP16X2_CHUNK = 16


def _check_fp16(name: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dtype != torch.float16 or weight.dtype != torch.float16:
        raise TypeError(f"{name}: x and weight must be float16 (fp16x2 arithmetic), got {x.dtype} and {weight.dtype}")


def l1_forward_fp16x2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (R, K), b (O, K) float16 -> (R, O) float16, ``-sum_k |a[r, k] - b[o, k]|`` summed as
    the fp16x2 kernel sums it: in chunks of FP16X2_CHUNK columns from k = 0, each a float16
    sum ``h = h + |a - b|`` in column order from +0 (every step rounded to float16), the
    chunks added in order to a float32 sum, the output float16(-sum).  One (R, O) step
    per column: meant for tests, not for speed."""
    R, K = a.shape
    O = b.shape[0]
    if K == 0:  # an empty sum: +0, as the op writes it
        return torch.zeros((R, O), dtype=torch.float16, device=a.device)
    acc = torch.zeros((R, O), dtype=torch.float32, device=a.device)
    for c0 in range(0, K, FP16X2_CHUNK):
        h = torch.zeros((R, O), dtype=torch.float16, device=a.device)
        for k in range(c0, min(c0 + FP16X2_CHUNK, K)):
            h = h + (a[:, k, None] - b[None, :, k]).abs()
        acc += h.float()
    return acc.neg_().to(torch.float16)


def adder_linear_fp16x2(x: torch.Tensor, weight: torch.Tensor, grad_mode: str = "addernet") -> torch.Tensor:
    """x (N, K), weight (O, K) float16 -> (N, O) float16 in fp16x2 arithmetic
    (:func:`l1_forward_fp16x2`); gradients are those of :func:`adder_linear`."""
    _check_mode(grad_mode)
    _check_fp16("adder_linear_fp16x2", x, weight)
    return l1_forward_fp16x2(x, weight)


def adder_conv2d_fp16x2(x, weight, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, grad_mode="addernet"):
    """x (N, C, H, W), weight (O, C/groups, kh, kw) float16 -> (N, O, Ho, Wo) float16 in
    fp16x2 arithmetic, with the kernel's column order: (c, i, j), or (i, j, c) when x's
    channel stride is 1 and C > 1 (channels-last)."""
    _check_mode(grad_mode)
    _check_fp16("adder_conv2d_fp16x2", x, weight)
    p = _ConvPlan(x, weight, stride, padding, dilation, groups)
    out = x.new_zeros((p.N, p.O, p.Ho, p.Wo))
    if p.N * p.L and p.Og:
        # the patches of the whole batch; float16 values pass through float32 exactly
        cols, w = p.cols(x).to(torch.float16), p.weight(weight).to(torch.float16)
        if x.stride(1) == 1 and p.C > 1:  # channels-last column order (i, j, c)
            taps = p.kh * p.kw
            cols = cols.view(p.G, -1, p.Cg, taps).transpose(2, 3).reshape(p.G, -1, p.Kg)
            w = w.view(p.G, p.Og, p.Cg, taps).transpose(2, 3).reshape(p.G, p.Og, p.Kg)
        for gi in range(p.G):
            y = l1_forward_fp16x2(cols[gi], w[gi])
            out[:, gi * p.Og:(gi + 1) * p.Og] = y.view(p.N, p.Ho, p.Wo, p.Og).permute(0, 3, 1, 2)
    return out.contiguous(memory_format=conv_memory_format(x))


# |x - w| <= 255 for int8, so the int32 sum is exact up to this K (csrc/shiftadd.h kAdderInt8MaxK)
ADDER_INT8_MAX_K = (2 ** 31 - 1) // 255


def check_adder_int8(name: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    """The argument rules of adder_linear_int8 (shared with its fake kernel)."""
    torch._check(x.dtype == torch.int8, lambda: f"{name}: x must be int8, got {x.dtype}")
    torch._check(weight.dtype == torch.int8, lambda: f"{name}: weight must be int8, got {weight.dtype}")
    torch._check(x.dim() == 2, lambda: f"{name}: x must be 2-D (N, K), got {x.dim()}-D")
    torch._check(weight.dim() == 2, lambda: f"{name}: weight must be 2-D (O, K), got {weight.dim()}-D")
    torch._check(x.shape[1] == weight.shape[1],
                 lambda: f"{name}: x has {x.shape[1]} features, weight expects {weight.shape[1]}")
    torch._check(x.shape[1] <= ADDER_INT8_MAX_K,
                 lambda: f"{name}: K = {x.shape[1]} exceeds {ADDER_INT8_MAX_K}, beyond which the int32 sum "
                         "could overflow")
    torch._check(x.device == weight.device, lambda: f"{name}: weight is on {weight.device} but x is on {x.device}")


def adder_linear_int8(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (N, K) int8, weight (O, K) int8 -> (N, O) int32, ``-sum_k |x[n, k] - w[o, k]|``
    exactly (integer arithmetic, in chunks of at most 2^22 differences)."""
    check_adder_int8("adder_linear_int8", x, weight)
    n, k = x.shape
    o = weight.shape[0]
    out = torch.zeros((n, o), dtype=torch.int32, device=x.device)
    if n == 0 or o == 0 or k == 0:
        return out
    xi, wi = x.to(torch.int32), weight.to(torch.int32)
    kb = min(k, 1 << 12)
    ob = min(o, max(1, (1 << 22) // kb))
    nb = min(n, max(1, (1 << 22) // (ob * kb)))
    for k0 in range(0, k, kb):
        for n0 in range(0, n, nb):
            a = xi[n0:n0 + nb, None, k0:k0 + kb]
            for o0 in range(0, o, ob):
                out[n0:n0 + nb, o0:o0 + ob] -= (a - wi[None, o0:o0 + ob, k0:k0 + kb]).abs_().sum(-1, dtype=torch.int32)
    return out


# --------------------------------------------------------------------------------------
# Conv2d: x (N, C, H, W), weight (O, C/groups, kh, kw)
# --------------------------------------------------------------------------------------


class _ConvPlan:
    """im2col bookkeeping shared by the three conv functions."""

    def __init__(self, x, weight, stride, padding, dilation, groups):
        self.N, self.C, self.H, self.W = x.shape
        self.O, self.Cg, self.kh, self.kw = weight.shape
        if self.kh < 1 or self.kw < 1:
            raise ValueError(f"weight's kernel size must be positive, got {(self.kh, self.kw)}")
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)
        self.G = groups
        self.Og, self.Kg = self.O // groups, self.Cg * self.kh * self.kw
        self.Ho, self.Wo = conv_output_size(self.H, self.W, (self.kh, self.kw), self.stride, self.padding,
                                            self.dilation)
        self.L = self.Ho * self.Wo
        self.acc = acc_dtype(x.dtype)
        itemsize = torch.empty((), dtype=self.acc).element_size()
        # batch chunk: its patch matrix stays under the budget
        self.nb = max(1, min(max(self.N, 1), chunk_bytes() // max(1, self.C * self.kh * self.kw * self.L * itemsize)))

    def cols(self, xc: torch.Tensor) -> torch.Tensor:
        """x chunk (n, C, H, W) -> patches (G, n*L, Kg)."""
        n = xc.shape[0]
        if self.Kg == 0:  # no input channels: im2col on CUDA refuses C = 0
            return xc.new_zeros((self.G, n * self.L, 0), dtype=self.acc)
        u = F.unfold(xc.to(self.acc), (self.kh, self.kw), self.dilation, self.padding, self.stride)
        return u.view(n, self.G, self.Kg, self.L).permute(1, 0, 3, 2).reshape(self.G, n * self.L, self.Kg)

    def rows(self, gc: torch.Tensor) -> torch.Tensor:
        """grad_out chunk (n, O, Ho, Wo) -> (G, n*L, Og)."""
        n = gc.shape[0]
        return gc.to(self.acc).reshape(n, self.G, self.Og, self.L).permute(1, 0, 3, 2).reshape(self.G, n * self.L, self.Og)

    def weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.to(self.acc).reshape(self.G, self.Og, self.Kg)


def adder_conv2d(x, weight, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, grad_mode="addernet"):
    """x (N, C, H, W), weight (O, C/groups, kh, kw) -> (N, O, Ho, Wo), dtype of x,
    channels-last when x is."""
    _check_mode(grad_mode)
    p = _ConvPlan(x, weight, stride, padding, dilation, groups)
    w = p.weight(weight)
    out = x.new_empty((p.N, p.O, p.Ho, p.Wo), dtype=p.acc)
    for n0 in range(0, p.N, p.nb):
        xc = x[n0:n0 + p.nb]
        n = xc.shape[0]
        cols = p.cols(xc)
        for gi in range(p.G):
            y = l1_forward(cols[gi], w[gi])  # (n*L, Og)
            out[n0:n0 + n, gi * p.Og:(gi + 1) * p.Og] = y.view(n, p.Ho, p.Wo, p.Og).permute(0, 3, 1, 2)
    return out.to(x.dtype).contiguous(memory_format=conv_memory_format(x))


def adder_conv2d_grad_input(grad_out, x, weight, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1,
                            grad_mode="addernet"):
    _check_mode(grad_mode)
    p = _ConvPlan(x, weight, stride, padding, dilation, groups)
    _check_grad("adder_conv2d_grad_input", grad_out, (p.N, p.O, p.Ho, p.Wo))
    w = p.weight(weight)
    dx = x.new_zeros(x.shape, dtype=p.acc)
    for n0 in range(0, p.N if p.Kg else 0, p.nb):  # C = 0: dx is empty (and F.fold on CUDA refuses it)
        xc = x[n0:n0 + p.nb]
        n = xc.shape[0]
        cols, rows = p.cols(xc), p.rows(grad_out[n0:n0 + n])
        dcols = torch.stack([l1_grad_a(rows[gi], cols[gi], w[gi], grad_mode) for gi in range(p.G)])
        dcols = dcols.view(p.G, n, p.L, p.Kg).permute(1, 0, 3, 2).reshape(n, p.G * p.Kg, p.L)
        dx[n0:n0 + n] = F.fold(dcols, (p.H, p.W), (p.kh, p.kw), p.dilation, p.padding, p.stride)
    return dx.to(x.dtype).contiguous(memory_format=conv_memory_format(x))


def adder_conv2d_grad_weight(grad_out, x, weight, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1,
                             grad_mode="addernet"):
    _check_mode(grad_mode)
    p = _ConvPlan(x, weight, stride, padding, dilation, groups)
    _check_grad("adder_conv2d_grad_weight", grad_out, (p.N, p.O, p.Ho, p.Wo))
    w = p.weight(weight)
    dw = torch.zeros_like(w)
    for n0 in range(0, p.N, p.nb):
        xc = x[n0:n0 + p.nb]
        n = xc.shape[0]
        cols, rows = p.cols(xc), p.rows(grad_out[n0:n0 + n])
        for gi in range(p.G):
            dw[gi] += l1_grad_b(rows[gi], cols[gi], w[gi], grad_mode)
    return dw.reshape(weight.shape).to(weight.dtype).contiguous()
