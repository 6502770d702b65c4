"""Pure-PyTorch reference of the power-of-two (DeepShift) quantizers: the tests' oracle.

REFERENCE §2.  With b = weight_bits:

* ``quantize_pot_q(w, b, noise)``: DeepShift-Q.  |w| is clamped into
  [2^-(2^(b-1)-1), 1], then ``sign(w) * 2^round(log2 |w|)``; sign(0) = 0.
* ``quantize_pot_ps(P, S, b, noise)``: DeepShift-PS.  ``2^round(clamp(P, -(2^(b-1)-2), 0))
  * sign(round(S))``: the sign is ternary.
* ``round_to_fixed(x, i, f)``: ``clamp(floor(x 2^f) 2^-f, -2^(i-1), 2^(i-1) - 1)``.

``round`` is half-to-even (torch.round).  ``noise`` (uniform [0, 1), the weight's shape)
makes it stochastic: ``floor(v) + (u < v - floor(v))``, DeepShift's floor plus Bernoulli
of the fraction.  A NaN weight, shift or sign gives NaN (never a silent 0).  round(log2 a) is computed exactly: with a = m 2^e, m in [0.5, 1),
round(log2 a) = e - [m^2 < 1/2].  The quantizers compute in float64 (exact for every
input dtype); round_to_fixed in the input's precision (float32 for 16-bit types).
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


def quantize_pot_q(weight: torch.Tensor, weight_bits: int = 5, noise: torch.Tensor | None = None) -> torch.Tensor:
    """weight (any shape, floating) -> sign(w) * 2^p, p in [-(2^(b-1)-1), 0]; same shape and dtype."""
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
    return torch.where(w.isnan(), w, out).to(weight.dtype)  # NaN stays NaN (torch.sign(NaN) is 0)


def quantize_pot_ps(shift: torch.Tensor, sign: torch.Tensor, weight_bits: int = 5,
                    noise: torch.Tensor | None = None) -> torch.Tensor:
    """shift P and sign S (same shape, floating) -> 2^round(P) * sign(round(S)); dtype of P."""
    lo, hi = shift_range(weight_bits, "ps")
    p = _round_exponent(shift.to(torch.float64).clamp(lo, hi), noise)
    s = torch.sign(torch.round(sign.to(torch.float64)))
    out = torch.exp2(p) * s
    return out.masked_fill(shift.isnan() | sign.isnan(), float("nan")).to(shift.dtype)


def round_to_fixed(x: torch.Tensor, int_bits: int = 16, frac_bits: int = 16) -> torch.Tensor:
    """x -> clamp(floor(x 2^f) 2^-f, -2^(i-1), 2^(i-1) - 1); same shape and dtype."""
    if not 1 <= int_bits <= 64 or not 0 <= frac_bits <= 64:
        raise ValueError(f"int_bits must be in [1, 64] and frac_bits in [0, 64], got {int_bits}, {frac_bits}")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    v = torch.floor(torch.ldexp(x.to(acc), torch.tensor(frac_bits, dtype=acc, device=x.device)))
    v = torch.ldexp(v, torch.tensor(-frac_bits, dtype=acc, device=x.device))
    bound = 2.0 ** (int_bits - 1)
    return v.clamp(-bound, bound - 1).to(x.dtype)
