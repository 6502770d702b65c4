"""Low-bit adder layers as an int8 matrix product (thermometer codes), exact in integers.

For integers a, b in [0, L] write each as L signs, its thermometer code
``T(a)[t] = +1 if a > t else -1`` (t = 0 .. L-1).  The codes of a and b differ in exactly
|a - b| places, so ``sum_t T(a)[t] T(b)[t] = L - 2 |a - b|`` and, over K features,

    -sum_k |x[k] - w[k]| = (<T(x), T(w)> - L K) / 2

with T(x) the K L signs of x.  The adder layer becomes one int8 x int8 -> int32 matrix
product of the codes (``torch._int_mm``: cuBLASLt's int8 tensor cores on CUDA), exact
for any K L < 2^31 (:func:`check_size`).  A common offset changes no difference, so b-bit signed values
(-2^(b-1) .. 2^(b-1) - 1) are shifted to 0 .. L = 2^b - 1.  The cost grows with L: 15
int8 multiply-adds per adder-MAC at 4 bits, 3 at 2 bits, and the codes take L bytes per
value (the weight's are built once by the layer, :func:`weight_codes`).

``torch._int_mm`` on CUDA needs more than 16 rows and inner and output sizes that are
multiples of 8; :func:`adder_linear_codes` pads with zero rows and zero columns (a zero
code adds nothing to the product) on every device, so the CPU tests run the same padding.

Which implementation of an int8 adder layer runs (:func:`choose`): on CPU the compiled
``vpsadbw`` kernel of ``adder_linear_int8`` (the codes' product through ``torch._int_mm``
took 8-14x its time at 4 bits and 2.5-4x at 2 bits on 64x256 @ 256x256 and 256x1024 @
1024x1024, 2-core AVX-512 CPU, 2026-11-23); on CUDA the thermometer product for
``bits <= 2`` (THERMOMETER_MAX_BITS_CUDA), else the ``__vsadu4`` kernel: on an H100
(2026-11-23, 4096x1024 @ 4096x1024) the kernel took 0.584 ms at any width, the
thermometer product 0.514 ms at 2 bits and 1.21 ms at 4 (its cost grows with the
2^bits - 1 signs per value).
"""

from __future__ import annotations

import torch

MAX_BITS = 4  # 2^4 - 1 = 15 signs per value; wider codes cost more than the int8 SAD kernels
THERMOMETER_MAX_BITS_CUDA = 2  # auto on CUDA: the thermometer product up to here (H100 timings above)
IMPLS = ("auto", "sad", "thermometer")
_CHUNK_BYTES = 1 << 28  # activation codes built at a time (rows are processed in chunks)


def levels(bits: int) -> int:
    """L = 2^bits - 1: the largest difference of two bits-bit values, the code length."""
    return (1 << bits) - 1


def value_range(bits: int) -> tuple:
    """(lo, hi) of a bits-bit signed integer."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def check_bits(bits) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not (2 <= bits <= MAX_BITS or bits == 8):
        raise ValueError(f"bits must be 8, or 2..{MAX_BITS} for values of that many bits, got {bits!r}")


def check_range(name: str, t: torch.Tensor, bits: int) -> None:
    """Raises ValueError naming `name` when an int8 value of t lies outside the bits-bit range."""
    if bits == 8 or t.numel() == 0:
        return
    lo, hi = value_range(bits)
    tmin, tmax = int(t.min()), int(t.max())
    if tmin < lo or tmax > hi:
        raise ValueError(f"{name} holds values in [{tmin}, {tmax}], outside the {bits}-bit range [{lo}, {hi}]; "
                         f"quantize to {bits} bits first or use bits=8")


def check_size(k: int, bits: int) -> None:
    """Raises ValueError unless K L < 2^31: the int32 product of the codes lies in [-K L, K L]."""
    if k * levels(bits) >= 2**31:
        raise ValueError(f"in_features {k} x {levels(bits)} code signs at bits={bits} reaches 2^31: the int32 "
                         "product of the codes could overflow")


def codes(t: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., K) int8 bits-bit values -> (..., K * L) int8 signs, T(v)[k L + j] = +1 if v[k] - lo > j else -1."""
    L = levels(bits)
    lo = value_range(bits)[0]
    steps = torch.arange(L, device=t.device, dtype=torch.int16)
    c = (t.to(torch.int16) - lo).unsqueeze(-1) > steps
    return (c.to(torch.int8) * 2 - 1).reshape(*t.shape[:-1], t.shape[-1] * L)


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def weight_codes(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """(O, K) int8 weight -> its codes, padded for torch._int_mm: (O8, K L 8) int8 with O8
    and K L 8 the next multiples of 8 (zero rows and columns)."""
    o, k = weight.shape
    c = codes(weight, bits)
    return torch.nn.functional.pad(c, (0, _round_up(k * levels(bits), 8) - k * levels(bits), 0, _round_up(o, 8) - o))


def adder_linear_codes(x: torch.Tensor, w_codes: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """x (N, K) int8 bits-bit values, w_codes from :func:`weight_codes` -> (N, out_features)
    int32 = -sum_k |x[n, k] - w[o, k]|, exactly.  Values are not range-checked here; the
    shapes are: the codes must have been built at these bits for K features and
    out_features rows (ValueError otherwise)."""
    check_bits(bits)
    if bits > MAX_BITS:
        raise ValueError(f"thermometer codes need bits <= {MAX_BITS}, got bits={bits}")
    for name, t in (("x", x), ("w_codes", w_codes)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int8 or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D int8 tensor, got "
                             f"{(t.dtype, tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if x.device != w_codes.device:
        raise ValueError(f"w_codes is on {w_codes.device} but x is on {x.device}")
    n, k = x.shape
    L = levels(bits)
    kl = w_codes.shape[1]
    if kl != _round_up(k * L, 8):
        raise ValueError(f"w_codes has {kl} columns, but {k} features at bits={bits} need {_round_up(k * L, 8)}: "
                         "codes built for other in_features or bits")
    if isinstance(out_features, bool) or not hasattr(out_features, "__index__"):
        raise ValueError(f"out_features must be an int, got {out_features!r}")
    out_features = out_features.__index__()
    if not (0 <= out_features <= w_codes.shape[0] and w_codes.shape[0] == _round_up(out_features, 8)):
        raise ValueError(f"out_features {out_features!r} does not match w_codes' {w_codes.shape[0]} rows "
                         "(out_features rounded up to a multiple of 8)")
    out = torch.empty((n, out_features), dtype=torch.int32, device=x.device)
    if n == 0 or out_features == 0:
        return out
    if k == 0:
        return out.zero_()
    rows = max(17, _CHUNK_BYTES // max(kl, 1))
    wt = w_codes.t()  # (K L 8, O8), column-major: cuBLASLt's int8 layout
    for r0 in range(0, n, rows):
        xc = codes(x[r0:r0 + rows], bits)
        m = xc.shape[0]
        # > 16 rows and K L padded to the codes' width (a zero code adds nothing)
        xc = torch.nn.functional.pad(xc, (0, kl - xc.shape[1], 0, max(17 - m, 0)))
        dot = torch._int_mm(xc, wt)[:m, :out_features]
        # (dot - L K) / 2 without the intermediate -2 L K: dot and L K have the same parity
        out[r0:r0 + m] = dot.div_(2, rounding_mode="floor").sub_((L * k) // 2)
    return out


def choose(impl: str, device: torch.device, bits: int) -> str:
    """The implementation an int8 adder call uses: "sad" (the adder_linear_int8 op) or
    "thermometer" (:func:`adder_linear_codes`); see the module docstring for the rule."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "thermometer" and bits > MAX_BITS:
        raise ValueError(f"impl='thermometer' needs bits <= {MAX_BITS} (15 signs per value), got bits={bits}")
    if impl != "auto":
        return impl
    return "thermometer" if device.type == "cuda" and bits <= THERMOMETER_MAX_BITS_CUDA else "sad"
