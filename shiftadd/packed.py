"""Packed power-of-two weights: 4, 8 or 16 bits per weight, lossless.

A shift weight is ``±2^p`` or 0 (DeepShift, Elhoushi et al., 2021).  :func:`pack_pot` stores it as
one small code per weight plus two int32 numbers per output channel;
:func:`unpack_pot` gives the dense weight back, bit for bit.

Layout
------
The weight (O, ...) is seen as a matrix (O, K), K = prod(shape[1:]) (a conv weight
(O, C/groups, kh, kw) flattened row-major, as ``weight.reshape(O, -1)``).

``scales``  int32 (O,): E[o], the largest exponent p in output channel o (0 for an
            all-zero channel).  Exponents are stored relative to it.
``zero_codes`` int32 (O,): Z[o], the code that stands for 0 in channel o, or -1 when
            channel o has no zero weight (then every code is a value).
``codes``   uint8 (O, row_bytes), row-major: output channel o's codes are one
            contiguous run of bytes along the input dimension k, with no padding
            between rows (row stride = row_bytes):

            * B = 4:  row_bytes = ceil(K/2); weight (o, k) is in byte k // 2, in the
              low nibble (bits 0-3) for even k, the high nibble (bits 4-7) for odd k.
              For odd K the last high nibble is padding (0) and is never read.
            * B = 8:  row_bytes = K; byte k.
            * B = 16: row_bytes = 2K; bytes 2k (low) and 2k + 1 (high), little-endian.

A B-bit code ``c`` is sign + magnitude: ``s = c >> (B-1)`` (1 = negative),
``m = c & (2^(B-1) - 1)``, and the weight is::

    w = 0                          if c == Z[o]
    w = (-1)^s * 2^(E[o] - m)      otherwise

So in 4 bits: codes 0-7 are +2^E, +2^(E-1), ..., +2^(E-7) and codes 8-15 the same
magnitudes negative; a GPU decoder needs only ``E`` and ``Z`` per channel (a 16-entry
table per channel, or the float's exponent field built as 127 + E - m).

Why a per-channel zero code
---------------------------
B bits hold 2^B symbols.  DeepShift-Q with b bits produces 2^(b-1) exponent levels of
both signs, i.e. 2^b nonzero values, plus 0 for an exactly-zero input: 2^b + 1 symbols,
one too many for b-bit codes (17 at b = 4, 257 at b = 8).  A fixed zero code would cost
one level in every channel.  Here a channel without a zero weight uses all 2^B codes
for values (Z = -1); a channel with a zero gives 0 the largest code its nonzero weights
do not use (usually 2^B - 1, the deepest negative level).  A channel fits in B bits
exactly when its exponent span max(E - p) <= 2^(B-1) - 1 and, if it holds a zero, its
nonzero weights use fewer than 2^B codes: the pigeonhole bound, so no scheme with
per-channel metadata can do better.  :func:`pack_pot` picks the narrowest B in
(4, 8, 16) that fits every channel: DeepShift-PS b <= 4 and Q b <= 3 always fit in 4
bits, Q b = 4 unless a channel has an exact zero *and* all 16 nonzero values; any
quantizer output fits in 8 bits, except a Q b = 8 channel holding an exact zero and all
256 nonzero values, which takes 16 bits (as does any power-of-two weight spanning more
than 128 exponents; 16 bits hold every finite float64 power of two).

-0.0 decodes to +0.0; a weight that is not ±2^p or 0 (including inf and NaN) raises
ValueError naming it.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .reference.shift import CODE_BITS, decode_pot, packed_row_bytes

__all__ = ["PackedPoT", "pack_pot", "unpack_pot", "CODE_BITS"]

_CHUNK = 1 << 22


SCALE_LIMIT = 1 << 20  # |per-channel exponent|: pack_pot's lie within float64's (about 1100)


def check_scale_range(scales: torch.Tensor) -> None:
    """Raises ValueError when a per-channel exponent lies beyond +-2^20 (the kernels subtract
    exponents in int32; -2^31 wrapped).  Reads two numbers back from the device."""
    if scales.numel() and scales.device.type != "meta" and not torch.compiler.is_compiling():
        lo, hi = int(scales.min()), int(scales.max())
        if lo < -SCALE_LIMIT or hi > SCALE_LIMIT:
            raise ValueError(f"scales must lie in [-2^20, 2^20] (power-of-two exponents), got [{lo}, {hi}]")


class PackedPoT:
    """A packed power-of-two weight (layout: module docstring of :mod:`shiftadd.packed`).

    codes (uint8, (O, row_bytes)), scales (int32, (O,)), zero_codes (int32, (O,)),
    shape (the dense weight's shape), bits (4, 8 or 16 per code), dtype (the dense
    weight's dtype, what :meth:`unpack` returns).
    """

    __slots__ = ("codes", "scales", "zero_codes", "shape", "bits", "dtype")

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zero_codes: torch.Tensor, shape, bits: int,
                 dtype: torch.dtype = torch.float32, check_scales: bool = True):
        self.codes, self.scales, self.zero_codes = codes, scales, zero_codes
        self.shape, self.bits, self.dtype = torch.Size(shape), int(bits), dtype
        if self.bits not in CODE_BITS:
            raise ValueError(f"bits must be one of {CODE_BITS}, got {bits!r}")
        if len(self.shape) < 2:
            raise ValueError(f"shape must be (out_features, in_features, ...), got {tuple(self.shape)}")
        if codes.dtype != torch.uint8:
            raise TypeError(f"codes must be uint8, got {codes.dtype}")
        if scales.dtype != torch.int32 or zero_codes.dtype != torch.int32:
            raise TypeError(f"scales and zero_codes must be int32, got {scales.dtype} and {zero_codes.dtype}")
        o, rb = self.out_features, packed_row_bytes(self.in_features, self.bits)
        if tuple(codes.shape) != (o, rb) or tuple(scales.shape) != (o,) or tuple(zero_codes.shape) != (o,):
            raise ValueError(f"a {tuple(self.shape)} weight with {self.bits}-bit codes needs codes ({o}, {rb}), "
                             f"scales and zero_codes ({o},); got {tuple(codes.shape)}, {tuple(scales.shape)}, "
                             f"{tuple(zero_codes.shape)}")
        if check_scales:  # False where they come from pack_pot or a checked module (no host sync then)
            check_scale_range(scales)

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def nbytes(self) -> int:
        """Bytes of codes, scales and zero codes."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.zero_codes))

    def unpack(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return unpack_pot(self, dtype)

    def to(self, device) -> "PackedPoT":
        return PackedPoT(self.codes.to(device), self.scales.to(device), self.zero_codes.to(device), self.shape,
                         self.bits, self.dtype, check_scales=False)

    def __repr__(self) -> str:
        return (f"PackedPoT(shape={tuple(self.shape)}, bits={self.bits}, dtype={self.dtype}, "
                f"device={self.device}, nbytes={self.nbytes})")


def _analyze(w: torch.Tensor, row0: int, weight_bits: Optional[int]):
    """Rows of a weight chunk (rows, K) -> exponent data; raises for non powers of two."""
    wd = w.to(torch.float64)
    nz = wd != 0
    m, e = torch.frexp(wd)
    bad = (nz & (m.abs() != 0.5)) | ~torch.isfinite(wd)
    if bool(bad.any()):
        i, k = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"weight element ({row0 + i}, {k}) of the (O, K) view is {w[i, k].item()!r}, which is "
                         "not a power of two (±2^p) or 0; pack_pot stores shift weights only (quantize first, "
                         "e.g. ShiftLinear.quantized_weight())")
    p = (e.to(torch.int64) - 1).masked_fill(~nz, torch.iinfo(torch.int64).min)
    if weight_bits is not None:
        lo = -(2 ** (weight_bits - 1) - 1)
        out = nz & ((p < lo) | (p > 0))
        if bool(out.any()):
            i, k = (int(v) for v in out.nonzero()[0])
            raise ValueError(f"weight element ({row0 + i}, {k}) is 2^{int(p[i, k])}, outside the range "
                             f"[2^{lo}, 1] of a {weight_bits}-bit DeepShift quantizer (weight_bits={weight_bits})")
    any_nz = nz.any(1)
    E = torch.where(any_nz, p.amax(1) if p.shape[1] else torch.zeros_like(any_nz, dtype=torch.int64), 0)
    r = torch.where(nz, E[:, None] - p, 0)
    span = r.amax(1) if r.shape[1] else torch.zeros_like(E)
    return {"nz": nz, "neg": wd < 0, "E": E, "r": r, "span": span, "has_zero": (~nz).any(1)}


def _used(a: dict, bits: int) -> torch.Tensor:
    """(rows, 2^bits) bool: the codes the nonzero weights of each row use (span must fit)."""
    n = 1 << bits
    c = torch.where(a["nz"] & (a["r"] < n // 2), (a["neg"].to(torch.int64) << (bits - 1)) | a["r"], n)
    used = torch.zeros((c.shape[0], n + 1), dtype=torch.bool, device=c.device)
    return used.scatter_(1, c, True)[:, :n]


def _fits(a: dict, bits: int) -> torch.Tensor:
    """(rows,) bool: the row fits in `bits`-bit codes."""
    ok = a["span"] <= (1 << (bits - 1)) - 1
    if bits == 16:  # a finite float64 row uses at most 2 * 2098 of the 65536 codes
        return ok
    full = _used(a, bits).all(1) if bool(ok.any()) else torch.zeros_like(ok)
    return ok & ~(a["has_zero"] & full)


def _zero_codes(a: dict, bits: int) -> torch.Tensor:
    n = 1 << bits
    if bits == 16:
        zc = torch.full_like(a["E"], n - 1)
    else:  # the largest unused code
        unused = ~_used(a, bits)
        zc = n - 1 - unused.flip(1).to(torch.int8).argmax(1)
    return torch.where(a["has_zero"], zc, -1)


def _encode(a: dict, bits: int) -> tuple:
    zc = _zero_codes(a, bits)
    c = torch.where(a["nz"], (a["neg"].to(torch.int64) << (bits - 1)) | a["r"], zc[:, None])
    rows, k = c.shape
    if bits == 4:
        if k % 2:
            c = torch.cat([c, c.new_zeros((rows, 1))], 1)
        b = c[:, 0::2] | (c[:, 1::2] << 4)
    elif bits == 8:
        b = c
    else:
        b = torch.stack((c & 255, c >> 8), -1).reshape(rows, 2 * k)
    return b.to(torch.uint8), a["E"].to(torch.int32), zc.to(torch.int32)


def _chunks(w2: torch.Tensor):
    step = max(1, min(_CHUNK // max(w2.shape[1], 1), 1 << 14))
    for r0 in range(0, w2.shape[0], step):
        yield r0, w2[r0:r0 + step]


@torch.no_grad()
def pack_pot(weight: torch.Tensor, weight_bits: Optional[int] = None, *, code_bits: Optional[int] = None) -> PackedPoT:
    """Packs a power-of-two weight losslessly (layout: :mod:`shiftadd.packed`).

    weight: (O, K) or (O, C, kh, kw), floating, every element ±2^p or 0 (what the DeepShift
    quantizers produce, e.g. ``layer.quantized_weight()``); ValueError names the first
    element that is not.
    weight_bits: optional, the quantizer's bits (2..8): also check that every exponent
    lies in that quantizer's range [-(2^(b-1) - 1), 0].
    code_bits: 4, 8 or 16 to force a code width (ValueError if a channel does not fit);
    None (default) picks the narrowest that fits every output channel.
    Returns a :class:`PackedPoT` on the weight's device.
    """
    if not isinstance(weight, torch.Tensor) or not weight.dtype.is_floating_point:
        raise TypeError(f"weight must be a floating-point tensor, got "
                        f"{weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    if weight.dim() < 2:
        raise ValueError(f"weight must be (out_features, in_features, ...), got shape {tuple(weight.shape)}")
    if weight_bits is not None and (not isinstance(weight_bits, int) or not 2 <= weight_bits <= 8):
        raise ValueError(f"weight_bits must be None or an int in [2, 8], got {weight_bits!r}")
    if code_bits is not None and code_bits not in CODE_BITS:
        raise ValueError(f"code_bits must be None or one of {CODE_BITS}, got {code_bits!r}")
    w2 = weight.detach().reshape(weight.shape[0], math.prod(weight.shape[1:]))
    # pass 1: the narrowest width every row fits in (or check the forced one)
    bits = 4 if code_bits is None else code_bits
    for r0, w in _chunks(w2):
        a = _analyze(w, r0, weight_bits)
        if code_bits is not None:
            bad = ~_fits(a, code_bits)
            if bool(bad.any()):
                i = int(bad.nonzero()[0])
                why = (f"its exponents span {int(a['span'][i])} levels"
                       if int(a["span"][i]) > (1 << (code_bits - 1)) - 1
                       else f"it holds a zero and all {1 << code_bits} nonzero {code_bits}-bit values")
                raise ValueError(f"output channel {r0 + i} does not fit in {code_bits}-bit codes: {why}")
            continue
        while bits < 16 and not bool(_fits(a, bits).all()):
            bits = 8 if bits == 4 else 16
    # pass 2: encode
    codes, scales, zcs = [], [], []
    for r0, w in _chunks(w2):
        c, s, z = _encode(_analyze(w, r0, None), bits)
        codes.append(c), scales.append(s), zcs.append(z)
    rb = packed_row_bytes(w2.shape[1], bits)
    dev = weight.device
    cat = (lambda ts, shape, dt: torch.cat(ts) if ts else torch.empty(shape, dtype=dt, device=dev))
    return PackedPoT(cat(codes, (0, rb), torch.uint8), cat(scales, (0,), torch.int32), cat(zcs, (0,), torch.int32),
                     weight.shape, bits, weight.dtype, check_scales=False)


def unpack_pot(packed: PackedPoT, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The dense weight of a :class:`PackedPoT`: its shape, in ``dtype`` (default: the
    packed weight's own dtype, which round-trips bit for bit)."""
    if not isinstance(packed, PackedPoT):
        raise TypeError(f"unpack_pot expects a PackedPoT, got {type(packed).__name__}")
    dtype = packed.dtype if dtype is None else dtype
    o, k = packed.out_features, packed.in_features
    out = torch.empty((o, k), dtype=dtype, device=packed.device)
    step = max(1, _CHUNK // max(k, 1))
    for o0 in range(0, o, step):
        sl = slice(o0, min(o, o0 + step))
        out[sl] = decode_pot(packed.codes, packed.scales, packed.zero_codes, packed.bits, o, k, dtype, rows=sl)
    return out.reshape(packed.shape)
