"""Packed power-of-two weights: the format (lossless round trip, the documented layout),
the packed float and exact integer ops (cpu kernels on every ISA, the reference, a plain
Python integer model), and the packed modules."""

import contextlib
import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import cpu_isas, is_interpreted, op, rel_err

import shiftadd
from shiftadd import _dispatch
from shiftadd.nn import PackedShiftConv2d, PackedShiftLinear, ShiftConv2d, ShiftLinear
from shiftadd.packed import PackedPoT, pack_pot, unpack_pot
from shiftadd.reference import quantize_pot_ps, quantize_pot_q, shift_range

BACKENDS = ["cpu", "triton", "reference"]  # the float op; triton runs under the interpreter without a GPU
INT_BACKENDS = ["cpu", "reference"]  # the exact integer op
FAMILIES = ["shift_linear_packed", "shift_linear_int"]


def available(backend, family="shift_linear_packed"):
    return _dispatch.why_not(backend, family, torch.device("cpu"), torch.float32) is None


def usable(backend, family="shift_linear_packed"):
    reason = _dispatch.why_not(backend, family, torch.device("cpu"), torch.float32)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")


_ISAS = cpu_isas()


@contextlib.contextmanager
def cpu_isa(name):
    """Runs the cpu kernels on instruction set `name` ("default": the widest)."""
    if name == "default":
        yield
        return
    _dispatch._C.set_cpu_isa(name)
    try:
        yield
    finally:
        _dispatch._C.set_cpu_isa(_ISAS[-1])


@pytest.fixture(params=["default"] + _ISAS[:-1])
def isa(request):
    """Runs the cpu kernels on each instruction set this CPU has (the widest is 'default')."""
    if request.param == "default":
        yield request.param
        return
    best = _ISAS[-1]
    _dispatch._C.set_cpu_isa(request.param)
    try:
        yield request.param
    finally:
        _dispatch._C.set_cpu_isa(best)


def same(a, b):
    """Equal values (0.0 == -0.0), NaN nowhere, dtype and shape equal."""
    return a.dtype == b.dtype and a.shape == b.shape and bool((a == b).all())


def args_of(p: PackedPoT):
    return p.codes, p.scales, p.zero_codes, p.bits, p.out_features, p.in_features


# --------------------------------------------------------------------------------------
# the format
# --------------------------------------------------------------------------------------


def every_value_rows(mode, bits, k, gen, zero=True):
    """Rows holding every value the quantizer can produce (each level, both signs where the
    quantizer makes them, zero), shuffled, padded to k with random ones of them."""
    lo, hi = shift_range(bits, mode)
    levels = torch.arange(lo, hi + 1, dtype=torch.float64)
    vals = torch.cat([torch.exp2(levels), -torch.exp2(levels)] + ([torch.zeros(1, dtype=torch.float64)] if zero else []))
    assert k >= len(vals)
    extra = vals[torch.randint(len(vals), (k - len(vals),), generator=gen)]
    row = torch.cat([vals, extra])
    return row[torch.randperm(k, generator=gen)]


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("mode", ["q", "ps"])
def test_round_trip_every_quantizer_value(mode, bits):
    """Every weight the quantizers produce packs and unpacks bit for bit: random float
    inputs through the quantizer, plus rows holding every value (full span, both signs,
    zero) in several shapes and dtypes."""
    gen = torch.Generator().manual_seed(bits * 7 + (mode == "q"))
    n_vals = 2 * (shift_range(bits, mode)[1] - shift_range(bits, mode)[0] + 1) + 1
    for shape in [(5, 17), (3, 2, 3, 3), (4, n_vals), (1, 1), (6, 2 * n_vals + 3)]:
        for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            k = math.prod(shape[1:])
            if mode == "q":
                w = quantize_pot_q((torch.randn(shape, generator=gen) * 4 ** torch.randn(shape, generator=gen))
                                   .to(dtype), bits)
            else:
                p = torch.rand(shape, generator=gen) * 2 * shift_range(bits, "ps")[0] - 1
                w = quantize_pot_ps(p.to(dtype), (torch.rand(shape, generator=gen) * 3 - 1.5).to(dtype), bits)
            w.view(shape[0], -1)[0, : min(k, 2)] = 0  # a zero in the first channel
            if k >= n_vals:  # channels with every value
                rows = torch.stack([every_value_rows(mode, bits, k, gen, zero=i % 2 == 0) for i in range(shape[0])])
                w = rows.to(dtype).reshape(shape)  # float16 flushes the smallest levels to 0: still valid
            packed = pack_pot(w, bits)
            back = unpack_pot(packed)
            assert same(back, w), (shape, dtype)
            assert packed.codes.numel() * 8 <= packed.bits * w.numel() + 8 * shape[0]


@pytest.mark.parametrize("bits", range(2, 9))
def test_width_is_the_narrowest_lossless_one(bits):
    gen = torch.Generator().manual_seed(bits)
    lo, _ = shift_range(bits, "ps")
    # PS: at most 2^(b-1) - 1 levels, 2 signs and zero
    ps = torch.stack([every_value_rows("ps", bits, 4 * 2 ** bits, gen) for _ in range(3)])
    assert pack_pot(ps).bits == (4 if bits <= 4 else 8)
    # Q: 2^(b-1) levels, 2 signs: a channel without a zero fits in b bits, with one it does not
    q = torch.stack([every_value_rows("q", bits, 4 * 2 ** bits, gen, zero=False) for _ in range(3)])
    assert pack_pot(q).bits == (4 if bits <= 4 else 8)
    col = q[:, :1].clone()
    col[1] = 0
    q = torch.cat([q, col], 1)  # a zero in channel 1 only
    want = 4 if bits <= 3 else (8 if bits <= 7 else 16)
    packed = pack_pot(q, bits)
    assert packed.bits == want and same(unpack_pot(packed), q)
    # the zero takes the largest unused code; channels without zeros have none
    assert packed.zero_codes[0] == -1 and packed.zero_codes[2] == -1
    if bits == 4:
        with pytest.raises(ValueError, match="channel 1 does not fit in 4-bit codes: it holds a zero and all 16"):
            pack_pot(q, code_bits=4)
    if bits == 8:
        with pytest.raises(ValueError, match="does not fit in 8-bit codes"):
            pack_pot(q, code_bits=8)


def test_layout_by_hand():
    w = torch.tensor([[1.0, -0.5, 0.0, 0.25, 2.0 ** -7],
                      [0.0, 0.0, 0.0, 0.0, 0.0],
                      [-4.0, 2.0, 8.0, -(2.0 ** -20), 8.0]])
    p = pack_pot(w)
    # row 0: E = 0; codes 0, 8|1, zero, 2, 7; the zero takes 15 (unused), low nibble first
    # row 1: all zero: E = 0, zero code 15; row 2: E = 3: codes 8|1, 2, 0, 8|23: does not fit 4 bits
    assert p.bits == 8
    assert p.scales.tolist() == [0, 0, 3] and p.zero_codes.tolist() == [255, 255, -1]
    assert p.codes.tolist() == [[0, 0x81, 0xFF, 2, 7], [0xFF] * 5, [0x81, 2, 0, 0x80 | 23, 0]]
    p4 = pack_pot(w[:2])
    assert p4.bits == 4 and p4.scales.tolist() == [0, 0] and p4.zero_codes.tolist() == [15, 15]
    assert p4.codes.tolist() == [[0x90, 0x2F, 0x07], [0xFF, 0xFF, 0x0F]]
    p16 = pack_pot(w, code_bits=16)
    assert p16.codes[0].tolist() == [0, 0, 1, 0x80, 0xFF, 0xFF, 2, 0, 7, 0] and p16.zero_codes[0] == 0xFFFF
    # a used deepest negative level moves the zero to the next unused code
    p = pack_pot(torch.tensor([[1.0, -(2.0 ** -7), 0.0]]))
    assert p.zero_codes.tolist() == [14] and p.codes.tolist() == [[0xF0, 0x0E]]
    for q in (p4, p16):
        assert same(unpack_pot(q), w[: q.out_features])


def test_round_trip_extremes_and_conv_shapes():
    # exponents far apart (float64 subnormals, large positive), a 16-bit width
    w = torch.tensor([[2.0 ** -1074, -(2.0 ** 1023), 0.0, 1.0], [2.0 ** 100, 2.0 ** 99, -(2.0 ** 93), 0.0]],
                     dtype=torch.float64)
    p = pack_pot(w)
    assert p.bits == 16 and p.scales.tolist() == [1023, 100] and same(unpack_pot(p), w)
    assert same(unpack_pot(pack_pot(w[1:])), w[1:]) and pack_pot(w[1:]).bits == 4
    # float32 subnormals
    w = torch.tensor([[2.0 ** -149, -(2.0 ** -140), 2.0 ** -126]])
    assert same(unpack_pot(pack_pot(w)), w)
    # conv weight, empty dims, unpack to another dtype
    w = quantize_pot_q(torch.randn(4, 3, 3, 3), 4)
    p = pack_pot(w)
    assert p.shape == w.shape and same(unpack_pot(p), w) and same(unpack_pot(p, torch.float64), w.double())
    for shape in [(0, 5), (3, 0), (0, 0, 3, 3)]:
        assert unpack_pot(pack_pot(torch.zeros(shape))).shape == shape
    # -0.0 decodes to +0.0
    assert unpack_pot(pack_pot(torch.tensor([[-0.0, 1.0]]))).tolist() == [[0.0, 1.0]]


def test_pack_rejects_non_powers_of_two():
    for bad in (0.3, float("inf"), float("nan"), 3.0):
        w = torch.ones(3, 4)
        w[2, 1] = bad
        with pytest.raises(ValueError, match=r"weight element \(2, 1\) .* not a power of two"):
            pack_pot(w)
    with pytest.raises(ValueError, match="outside the range .* 4-bit DeepShift quantizer"):
        pack_pot(torch.tensor([[2.0 ** -8, 1.0]]), 4)
    with pytest.raises(ValueError, match="outside the range"):
        pack_pot(torch.tensor([[2.0, 1.0]]), 4)
    with pytest.raises(TypeError, match="floating-point"):
        pack_pot(torch.ones(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="out_features, in_features"):
        pack_pot(torch.ones(4))
    with pytest.raises(ValueError, match="code_bits"):
        pack_pot(torch.ones(2, 2), code_bits=5)
    p = pack_pot(torch.ones(2, 3))
    with pytest.raises(ValueError, match="needs codes"):
        PackedPoT(p.codes[:, :1], p.scales, p.zero_codes, (2, 3), 4)
    with pytest.raises(ValueError, match="bits must be one of"):
        PackedPoT(p.codes, p.scales, p.zero_codes, (2, 3), 5)


# --------------------------------------------------------------------------------------
# the float op: cpu kernels (each ISA) and reference against float64 on the dense weight
# --------------------------------------------------------------------------------------


def random_pot(o, k, gen, span, e_top=0, zero_frac=0.1, dtype=torch.float32):
    e = e_top - torch.randint(0, span + 1, (o, k), generator=gen)
    w = torch.exp2(e.double()) * torch.where(torch.rand(o, k, generator=gen) < 0.5, -1.0, 1.0)
    w = w.masked_fill(torch.rand(o, k, generator=gen) < zero_frac, 0)
    if o > 2:
        w[1] = 0  # an all-zero channel
    return w.to(dtype)


CASES = [  # (O, K, code bits, exponent span, top exponent, fraction of zeros); spans of 7 in 4 bits:
    # no zeros (a zero and all 16 values would not fit)
    (7, 1, 4, 7, 0, 0), (9, 33, 4, 7, 0, 0), (13, 129, 4, 6, -3, 0.1), (5, 16, 4, 7, 2, 0.1),
    (11, 67, 8, 100, 0, 0.1), (6, 31, 8, 127, -20, 0.1), (4, 8, 8, 3, 0, 0.5),
    (5, 23, 16, 300, 40, 0.1), (3, 40, 4, 6, -100, 0.1),
    (20, 1048, 4, 6, 0, 0.1),  # Triton: the split-K GEMV with 3 splits, the last one shorter
]


@pytest.mark.parametrize("n", [0, 1, 3, 5, 17])
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_linear_matches_dense(backend, case, n):
    usable(backend)
    isas = _ISAS[:-1] if backend == "cpu" else []
    for isa in ["default"] + isas:  # the cpu kernels of every instruction set this CPU has
        with cpu_isa(isa):
            check_packed_linear(backend, case, n)


def check_packed_linear(backend, case, n):
    o, k, bits, span, top, zeros = case
    gen = torch.Generator().manual_seed(o * 1000 + k + n)
    w = random_pot(o, k, gen, span, top, zeros, dtype=torch.float64 if bits == 16 else torch.float32)
    p = pack_pot(w, code_bits=bits)
    assert p.bits == bits
    x = torch.randn(n, k, generator=gen)
    bias = torch.randn(o, generator=gen)
    for b in (bias, None):
        y = op(backend, "shift_linear_packed")(x, *args_of(p), b)
        want = F.linear(x.double(), w.float().double(), None if b is None else b.double())
        assert y.dtype == torch.float32 and y.shape == (n, o)
        if n:
            assert rel_err(y, want) <= 1e-6, (case, n)


def test_packed_linear_subnormal_weights(isa):
    """float32 subnormal weights decode exactly (x scaled so that the products are normal)."""
    usable("cpu")
    gen = torch.Generator().manual_seed(1)
    w = random_pot(5, 37, gen, 6, -141)
    assert (w.abs().max() < 2.0 ** -126) and (w.abs().max() > 0)
    x = torch.randint(-8, 8, (3, 37), generator=gen).float() * 2.0 ** 40
    for bits in (4, 8):
        p = pack_pot(w, code_bits=bits)
        want = F.linear(x.double(), w.double())
        for backend in filter(available, BACKENDS):
            assert torch.equal(op(backend, "shift_linear_packed")(x, *args_of(p), None).double(), want)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_packed_linear_dtypes_and_strides(dtype, isa):
    usable("cpu")
    gen = torch.Generator().manual_seed(3)
    w = random_pot(19, 45, gen, 7)
    p = pack_pot(w)
    x = torch.randn(45, 6, generator=gen).to(dtype).t()  # non-contiguous
    bias = torch.randn(19, generator=gen).to(dtype)
    y = op("cpu", "shift_linear_packed")(x, *args_of(p), bias)
    ref = op("reference", "shift_linear_packed")(x, *args_of(p), bias)
    assert y.dtype == dtype and not x.is_contiguous()
    tol = {torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert rel_err(y, F.linear(x.double(), w.double(), bias.double())) <= tol
    assert rel_err(y, ref) <= tol


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_triton_packed_linear_16_bit_inputs(dtype, bits):
    """float16 with 4-bit codes runs the float16 tensor-core path (w' = ±2^-m exact), other
    16-bit cases bfloat16 or IEEE float32; the channel scale 2^E is applied afterwards."""
    reason = _dispatch.why_not("triton", "shift_linear_packed", torch.device("cpu"), dtype)
    if reason is not None:
        pytest.skip(reason)
    gen = torch.Generator().manual_seed(5)
    w = random_pot(21, 77, gen, 7 if bits == 4 else 40, -20, zero_frac=0 if bits == 4 else 0.1)  # 2^-27 .. 2^-20 (4-bit): most below float16's range
    p = pack_pot(w, code_bits=bits)
    x = (torch.randn(6, 77, generator=gen) * 2.0 ** 10).to(dtype)
    bias = (torch.randn(21, generator=gen) * 2.0 ** -10).to(dtype)
    y = op("triton", "shift_linear_packed")(x, *args_of(p), bias)
    assert y.dtype == dtype
    assert rel_err(y, F.linear(x.double(), w.double(), bias.double())) <= 2e-3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_opcheck(backend, family):
    usable(backend, family)
    gen = torch.Generator().manual_seed(0)
    p = pack_pot(random_pot(6, 21, gen, 7))
    if family == "shift_linear_packed":
        args = (torch.randn(3, 21, generator=gen), *args_of(p), torch.randn(6, generator=gen))
    else:
        args = (torch.randint(-1000, 1000, (3, 21), generator=gen), *args_of(p))
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if not is_interpreted(backend, "cpu"):  # fake tensors reach an interpreted Triton kernel under compile
        utils += ("test_aot_dispatch_dynamic",)
    torch.library.opcheck(op(backend, family), args, test_utils=utils)


def test_packed_ops_are_inference_only():
    p = pack_pot(random_pot(4, 8, torch.Generator().manual_seed(0), 3))
    x = torch.randn(2, 8, requires_grad=True)
    for backend in filter(available, BACKENDS):
        y = op(backend, "shift_linear_packed")(x, *args_of(p), None)
        with pytest.raises(RuntimeError, match="inference-only"):
            y.sum().backward()
    with pytest.raises(RuntimeError, match="inference-only"):
        shiftadd.shift_linear_packed(x, p).sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_packed_arguments(backend):
    usable(backend)
    p = pack_pot(torch.ones(4, 5))
    f = op(backend, "shift_linear_packed")
    x = torch.randn(2, 5)
    c, s, z, b, o, k = args_of(p)
    for bad, msg in [((x, c.to(torch.int32), s, z, b, o, k, None), "codes must be uint8"),
                     ((x, c, s.long(), z, b, o, k, None), "scales must be int32"),
                     ((x, c, s, z.long(), b, o, k, None), "zero_codes must be int32"),
                     ((x, c, s, z, 5, o, k, None), "bits must be 4, 8 or 16"),
                     ((x, c, s, z, 8, o, k, None), r"codes must have shape \(4, 5\)"),
                     ((x, c[:3], s, z, b, o, k, None), r"codes must have shape"),
                     ((x, c, s[:3], z, b, o, k, None), r"scales must have shape"),
                     ((torch.randn(2, 6), c, s, z, b, o, k, None), r"x must be"),
                     ((x, c, s, z, b, o, k, torch.ones(4, dtype=torch.float64)), "bias"),
                     ((x, c, s, z, b, o, k, torch.ones(3)), "bias")]:
        with pytest.raises(RuntimeError, match=msg):
            f(*bad)
    if backend in INT_BACKENDS:
        with pytest.raises(RuntimeError, match="x_int must be"):
            op(backend, "shift_linear_int")(x, c, s, z, b, o, k)
    # the public wrappers
    with pytest.raises(ValueError, match=r"x must be \(\.\.\., 5\)"):
        shiftadd.shift_linear_packed(torch.randn(2, 4), p)
    with pytest.raises(TypeError, match="PackedPoT"):
        shiftadd.shift_linear_packed(x, torch.ones(4, 5))
    with pytest.raises(TypeError, match="signed integer"):
        shiftadd.shift_linear_int(x, p)
    with pytest.raises(TypeError, match="signed integer"):
        shiftadd.shift_linear_int(x.to(torch.uint8), p)


# --------------------------------------------------------------------------------------
# exact integer mode against plain Python integers
# --------------------------------------------------------------------------------------


def python_shift_linear(x_int: torch.Tensor, w: torch.Tensor) -> list:
    """y[n][o] = sum_k sign(w) * (x >> -p) for w = ±2^p, p <= 0 (x << p for p > 0), in
    Python integers, from the dense weight (independent of the packed codes)."""
    xs, ws = x_int.tolist(), w.double().tolist()
    out = []
    for xr in xs:
        row = []
        for wr in ws:
            acc = 0
            for xv, wv in zip(xr, wr):
                if wv == 0:
                    continue
                m, e = math.frexp(abs(wv))
                assert m == 0.5
                p = e - 1
                t = xv >> -p if p <= 0 else xv << p
                acc += t if wv > 0 else -t
            row.append(acc)
        out.append(row)
    return out


INT_CASES = [  # (O, K, code bits, span, top exponent, x bound, x dtype)
    (5, 17, 4, 6, 0, 2 ** 20, torch.int32), (7, 33, 4, 6, 0, 2 ** 40, torch.int64),
    (4, 9, 8, 60, -4, 2 ** 62, torch.int64),  # shifts past the value: 0 or -1
    (3, 12, 8, 90, -1, 2 ** 30, torch.int32),  # shifts past the width (>= 64)
    (6, 15, 4, 6, 5, 2 ** 40, torch.int64),  # positive channel scales: left shifts
    (4, 10, 16, 200, 3, 2 ** 50, torch.int64), (3, 7, 4, 3, 0, 100, torch.int8), (2, 5, 8, 20, 0, 2 ** 14, torch.int16),
]


@pytest.mark.parametrize("n", [0, 1, 3, 17])
@pytest.mark.parametrize("case", INT_CASES, ids=str)
@pytest.mark.parametrize("backend", INT_BACKENDS)
def test_integer_mode_is_bit_exact(backend, case, n):
    usable(backend, "shift_linear_int")
    o, k, bits, span, top, bound, dtype = case
    gen = torch.Generator().manual_seed(o * 100 + k + n)
    w = random_pot(o, k, gen, span, top, zero_frac=0.2, dtype=torch.float64)
    p = pack_pot(w, code_bits=bits)
    x = torch.randint(-bound, bound, (n, k), generator=gen, dtype=torch.int64).to(dtype)
    if n:
        x[0, 0] = -bound  # the most negative value
    y = op(backend, "shift_linear_int")(x, *args_of(p))
    assert y.dtype == torch.int64 and y.shape == (n, o)
    assert y.tolist() == python_shift_linear(x, w)


def test_integer_mode_through_the_module_and_fixed_point():
    torch.manual_seed(0)
    layer = ShiftLinear(40, 9, mode="q", weight_bits=6).eval()
    packed = layer.pack()
    x = torch.randn(4, 40)
    f = 16
    x_int = torch.floor(x * 2 ** f).to(torch.int64)
    y_int = packed.forward_int(x_int.t().contiguous().t())  # non-contiguous
    assert y_int.tolist() == python_shift_linear(x_int, layer.quantized_weight().detach())
    # y_int * 2^-f approximates the float layer (each shift floors: error < K * 2^-f)
    y = F.linear(x, layer.quantized_weight())
    assert (y_int.double() * 2.0 ** -f - y.double()).abs().max() < 2 * 40 * 2.0 ** -f + 1e-4
    assert shiftadd.shift_linear_int(x_int.reshape(2, 2, 40), packed.packed_weight()).shape == (2, 2, 9)


# --------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("act_bits", [None, (8, 8)])
@pytest.mark.parametrize("bits", [3, 5, 8])
@pytest.mark.parametrize("mode", ["q", "ps"])
def test_packed_linear_module_matches_the_shift_layer(mode, bits, act_bits):
    torch.manual_seed(bits)
    layer = ShiftLinear(67, 23, mode=mode, weight_bits=bits, act_bits=act_bits).eval()
    packed = layer.pack()
    assert isinstance(packed, PackedShiftLinear)
    assert packed.code_bits in (4, 8) and (bits > 3 or packed.code_bits == 4)
    assert same(packed.unpacked_weight(), layer.quantized_weight().detach())
    x = torch.randn(2, 3, 67)
    with torch.no_grad():
        assert rel_err(packed(x), layer(x)) <= 1e-5
    assert packed.codes.numel() <= 23 * 67  # 8 bits or less per weight


@pytest.mark.parametrize("kw", [dict(padding=1), dict(stride=2, groups=2, bias=False), dict(padding="same", dilation=2),
                                dict(padding=1, padding_mode="reflect")], ids=str)
@pytest.mark.parametrize("mode", ["q", "ps"])
def test_packed_conv_module_matches_the_shift_layer(mode, kw):
    torch.manual_seed(0)
    layer = ShiftConv2d(4, 6, 3, mode=mode, weight_bits=4, **kw).eval()
    packed = layer.pack()
    assert isinstance(packed, PackedShiftConv2d) and packed.code_bits == 4
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        assert rel_err(packed(x), layer(x)) <= 1e-5
        assert rel_err(packed(x[0]), layer(x[0])) <= 1e-5


def test_convert_train_then_pack_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, stride=2),
        torch.nn.BatchNorm2d(8), torch.nn.Flatten(), torch.nn.Linear(8 * 3 * 3, 16), torch.nn.ReLU(),
        torch.nn.Linear(16, 5))
    model, n = shiftadd.convert(model, to="shift", skip_first=False, skip_last=False, mode="q", weight_bits=5)
    assert n == 4
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(6, 3, 8, 8)
    F.cross_entropy(model(x), torch.randint(0, 5, (6,))).backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        want = model(x)
    model, n = shiftadd.pack_model(model)
    assert n == 4 and not any(isinstance(m, (ShiftLinear, ShiftConv2d)) for m in model.modules())
    with torch.no_grad():
        assert rel_err(model(x), want) <= 1e-5
    # ShiftAddNet blocks: the shift half is packed
    block = shiftadd.nn.ShiftAddConv2d(3, 4, 3, padding=1).eval()
    with torch.no_grad():
        want = block(x)
        block, n = shiftadd.pack_model(block)
        assert n == 1 and isinstance(block.shift, PackedShiftConv2d) and rel_err(block(x), want) <= 1e-5
    layer, n = shiftadd.pack_model(ShiftLinear(4, 2))
    assert n == 1 and isinstance(layer, PackedShiftLinear)


def test_packed_state_dict_round_trip():
    torch.manual_seed(0)
    for layer in (ShiftLinear(20, 7, mode="q", weight_bits=8, act_bits=(6, 10)), ShiftLinear(20, 7, weight_bits=3),
                  ShiftConv2d(4, 6, 3, padding=1, weight_bits=6, bias=False)):
        packed = layer.eval().pack()
        sd = packed.state_dict()
        conv = isinstance(layer, ShiftConv2d)
        fresh = (PackedShiftConv2d(4, 6, 3, padding=1, bias=False) if conv
                 else PackedShiftLinear(20, 7))  # built with the default 4-bit codes
        fresh.load_state_dict(sd)
        x = torch.randn(2, 4, 5, 5) if conv else torch.randn(3, 20)
        assert fresh.code_bits == packed.code_bits and fresh.act_bits == packed.act_bits
        assert same(fresh(x), packed(x))
        assert same(fresh.unpacked_weight(), layer.quantized_weight().detach())


def test_packed_module_compiles():
    torch.manual_seed(0)
    packed = ShiftLinear(24, 8, mode="q", weight_bits=4).eval().pack()
    x = torch.randn(3, 24)
    fn = torch.compile(packed, fullgraph=True, backend="eager")
    assert same(fn(x), packed(x))


@pytest.mark.parametrize("act_bits", [None, (8, 8)])
@pytest.mark.parametrize("mode,bits", [("ps", 4), ("ps", 5), ("q", 3), ("q", 8)])
def test_shift_linear_picks_the_packed_path_in_inference(mode, bits, act_bits):
    usable("cpu")
    torch.manual_seed(0)
    layer = ShiftLinear(70, 33, mode=mode, weight_bits=bits, act_bits=act_bits)
    x = torch.randn(5, 70)
    dense = layer(x)  # training mode: the dense path
    assert layer.inference_path(x) == "dense" and getattr(layer, "_packed_cache", None) is None
    layer.eval()
    assert layer.inference_path(x) == "dense"  # autograd would need the parameters' gradients
    with torch.no_grad():
        assert layer.inference_path(x) == "packed"
        assert layer.inference_path(torch.randn(17, 70)) == "dense"  # compute-bound batch
        y = layer(x)
        assert layer._packed_cache is not None
        assert rel_err(y, dense) <= 1e-6
        assert rel_err(layer(x[:1]), dense[:1]) <= 1e-6
        with shiftadd.use_backend("reference"):  # no packed kernel: the dense path
            assert layer.inference_path(x) == "dense"
        # a parameter change invalidates the packed cache
        p = layer.weight if mode == "q" else layer.shift
        p.mul_(0.5) if mode == "q" else p.sub_(1.0)
        xr, br = x, layer.bias
        if act_bits is not None:
            xr, br = shiftadd.round_to_fixed(x, *act_bits), shiftadd.round_to_fixed(br, *act_bits)
        assert rel_err(layer(x), F.linear(xr, layer.quantized_weight(), br)) <= 1e-6
    layer.requires_grad_(False)
    assert layer.inference_path(x) == "packed"  # frozen parameters: no gradient needed
    # new parameter objects and dtype round trips also rebuild the packed weight
    with torch.no_grad():
        name = "weight" if mode == "q" else "shift"
        setattr(layer, name, torch.nn.Parameter(getattr(layer, name).detach().clone() * 0.25 if mode == "q"
                                                else getattr(layer, name).detach().clone() - 1.0))
        layer.double().float()
        xr, br = x, layer.bias
        if act_bits is not None:
            xr, br = shiftadd.round_to_fixed(x, *act_bits), shiftadd.round_to_fixed(br, *act_bits)
        assert rel_err(layer(x), F.linear(xr, layer.quantized_weight(), br)) <= 1e-6


def test_shift_linear_in_inference_compiles_fullgraph():
    """Under torch.compile the layer keeps the dense path (the packed cache is Python
    state), so an eval-mode graph compiles without breaks and matches eager."""
    torch.manual_seed(0)
    layer = ShiftLinear(24, 8, mode="ps", weight_bits=4).eval()
    x = torch.randn(3, 24)
    with torch.no_grad():
        eager = layer(x)
        compiled = torch.compile(layer, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_pack_model_replaces_every_use_of_a_shared_layer():
    s = ShiftLinear(8, 8)
    model = torch.nn.Sequential(s, torch.nn.ReLU(), s).eval()  # one layer, used twice in one parent
    x = torch.randn(3, 8)
    with torch.no_grad():
        want = model(x)
    packed, n = shiftadd.pack_model(model)
    assert n == 1 and packed[0] is packed[2] and isinstance(packed[0], PackedShiftLinear)
    with torch.no_grad():
        assert rel_err(packed(x), want) <= 1e-6


def test_packed_modules_compile_fullgraph():
    """PackedShiftConv2d decodes in Python: its argument checks must trace (no tensor in a
    torch._check message closure)."""
    torch.manual_seed(0)
    conv = ShiftConv2d(3, 4, 3, padding=1).eval().pack()
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        fn = torch.compile(conv, backend="aot_eager", fullgraph=True)
        assert same(fn(x), conv(x)) and same(fn(x + 1), conv(x + 1))


def test_shift_linear_packed_path_keeps_the_dense_path_dtype_rules():
    """Autocast, a mixed input dtype and inference-mode parameters take the dense path,
    so the result's dtype (and a mixed-dtype error) does not depend on the batch size."""
    usable("cpu")
    torch.manual_seed(0)
    layer = ShiftLinear(8, 4).eval()
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for rows in (2, 17):
                x = torch.randn(rows, 8)
                assert layer.inference_path(x) == "dense" and layer(x).dtype == torch.bfloat16
            assert PackedShiftLinear.from_shift(layer)(torch.randn(2, 8)).dtype == torch.bfloat16  # as F.linear
        nb = ShiftLinear(8, 4, bias=False).eval()
        for rows in (2, 20):
            with pytest.raises(RuntimeError, match="dtype"):
                nb(torch.randn(rows, 8, dtype=torch.float64))
    with torch.inference_mode():
        made = ShiftLinear(8, 4).eval()  # inference tensors have no version counter to key a cache on
        x = torch.randn(3, 8)
        assert made.inference_path(x) == "dense"
        assert rel_err(made(x), F.linear(x, made.quantized_weight(), made.bias)) <= 1e-6


def test_copies_of_a_shift_linear_do_not_carry_its_packed_cache():
    usable("cpu")
    layer = ShiftLinear(64, 32).eval()
    with torch.no_grad():
        layer(torch.randn(2, 64))
    assert layer._packed_cache is not None
    assert copy.deepcopy(layer)._packed_cache is None
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=False)._packed_cache is None
    assert layer._packed_cache is not None  # the original keeps it
