"""Power-of-two quantizers and shift layers (DeepShift, Elhoushi et al., 2021)."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import is_interpreted, op
from hypothesis import given
from hypothesis import strategies as st

import shiftadd
from shiftadd import _dispatch
from shiftadd.reference import shift_range

QUANT_BACKENDS = ["cuda", "triton", "cpu", "reference"]
FAST_BACKENDS = ["cuda", "triton", "cpu"]  # compared against the reference
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def usable(backend, family, device, dtype):
    reason = _dispatch.why_not(backend, family, torch.device(device), dtype)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")


# --------------------------------------------------------------------------------------
# the reference against the written rules
# --------------------------------------------------------------------------------------


def test_q_rule_by_hand():
    w = torch.tensor([0.3, -0.3, 0.75, 0.7, 1e-9, -5.0, 0.0, 2 ** -2.5 + 1e-7, 2 ** -2.5 - 1e-7], dtype=torch.float64)
    q = op("reference", "quantize_pot_q")(w, 5, None)
    # log2 0.3 = -1.74 -> -2; 0.75 -> -0.415 -> 0; 0.7 -> -0.515 -> -1; tiny -> clamp 2^-15; -5 -> clamp 1
    want = torch.tensor([0.25, -0.25, 1.0, 0.5, 2.0 ** -15, -1.0, 0.0, 0.25, 0.125], dtype=torch.float64)
    torch.testing.assert_close(q, want, rtol=0, atol=0)


def test_ps_rule_by_hand():
    p = torch.tensor([-1.4, -1.6, 3.0, -20.0, -2.5, -3.5], dtype=torch.float64)
    s = torch.tensor([0.7, -0.7, 0.2, -1.0, 1.0, -0.51], dtype=torch.float64)
    w = op("reference", "quantize_pot_ps")(p, s, 5, None)
    # round half to even: -2.5 -> -2, -3.5 -> -4; clamp P into [-14, 0]; sign(round(0.2)) = 0
    want = torch.tensor([0.5, -0.25, 0.0, -(2.0 ** -14), 0.25, -(2.0 ** -4)], dtype=torch.float64)
    torch.testing.assert_close(w, want, rtol=0, atol=0)


def test_round_to_fixed_rule_by_hand():
    x = torch.tensor([0.3, -0.3, 1e6, -1e6, 2.75], dtype=torch.float64)
    y = op("reference", "round_to_fixed")(x, 4, 2)
    # floor(x * 4) / 4, clamped into [-8, 7]
    torch.testing.assert_close(y, torch.tensor([0.25, -0.5, 7.0, -8.0, 2.75], dtype=torch.float64), rtol=0, atol=0)


@pytest.mark.parametrize("bits", range(2, 9))
def test_shift_ranges(bits):
    assert shift_range(bits, "q") == (-(2 ** (bits - 1) - 1), 0)
    assert shift_range(bits, "ps") == (-(2 ** (bits - 1) - 2), 0)
    w = torch.logspace(-140, 2, 1000, base=2, dtype=torch.float64)
    q = op("reference", "quantize_pot_q")(torch.cat([w, -w]), bits, None)
    e = torch.log2(q.abs())
    assert e.min() == shift_range(bits, "q")[0] and e.max() == 0 and torch.equal(e, e.round())


# --------------------------------------------------------------------------------------
# backends against the reference: bit-exact
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", FAST_BACKENDS)
@given(bits=st.integers(2, 8), n=st.integers(0, 300), scale=st.sampled_from([1e-3, 0.1, 1.0, 10.0]),
       stochastic=st.booleans())
def test_quantize_q_bit_exact(backend, dtype, device, bits, n, scale, stochastic):
    usable(backend, "quantize_pot_q", device, dtype)
    w = (torch.randn(n, device=device) * scale).to(dtype)
    noise = torch.rand(n, device=device).to(dtype) if stochastic else None
    got = op(backend, "quantize_pot_q")(w, bits, noise)
    want = op("reference", "quantize_pot_q")(w, bits, noise)
    assert got.dtype == dtype and got.shape == w.shape
    if stochastic:  # log2 may differ by an ulp between libms: allow a rare flip at the boundary
        assert (got != want).sum().item() <= max(1, n // 100)
    else:
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", FAST_BACKENDS)
@given(bits=st.integers(2, 8), n=st.integers(0, 300), stochastic=st.booleans())
def test_quantize_ps_bit_exact(backend, dtype, device, bits, n, stochastic):
    usable(backend, "quantize_pot_ps", device, dtype)
    p = (torch.rand(n, device=device) * 20 - 17).to(dtype)
    p[: n // 5] = p[: n // 5].round() + 0.5  # exact ties
    s = (torch.rand(n, device=device) * 2 - 1).to(dtype)
    noise = torch.rand(n, device=device).to(dtype) if stochastic else None
    got = op(backend, "quantize_pot_ps")(p, s, bits, noise)
    want = op("reference", "quantize_pot_ps")(p, s, bits, noise)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", FAST_BACKENDS)
@given(ib=st.integers(1, 20), fb=st.integers(0, 20), n=st.integers(0, 300))
def test_round_to_fixed_bit_exact(backend, dtype, device, ib, fb, n):
    usable(backend, "round_to_fixed", device, dtype)
    x = (torch.randn(n, device=device) * 2 ** (ib - 1)).to(dtype)
    torch.testing.assert_close(op(backend, "round_to_fixed")(x, ib, fb), op("reference", "round_to_fixed")(x, ib, fb),
                               rtol=0, atol=0)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_quantizers_special_values(backend, device):
    usable(backend, "quantize_pot_q", device, torch.float32)
    v = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0], device=device)
    for fam, args in (("quantize_pot_q", (v, 5, None)), ("quantize_pot_ps", (v, v.flip(0), 5, None)),
                      ("round_to_fixed", (v, 16, 16))):
        torch.testing.assert_close(op(backend, fam)(*args), op("reference", fam)(*args), equal_nan=True,
                                   rtol=0, atol=0)


OUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", FAST_BACKENDS)
@given(bits=st.integers(2, 8), n=st.integers(0, 300), stochastic=st.booleans())
def test_quantize_to_out_dtype_bit_exact(backend, dtype, out_dtype, device, bits, n, stochastic):
    """The fused quantize-and-decode: the power of two written directly in out_dtype, as
    the reference computes it (exact value, rounded once)."""
    usable(backend, "quantize_pot_q", device, dtype)
    if is_interpreted(backend, device) and torch.bfloat16 in (dtype, out_dtype):
        pytest.skip("the Triton interpreter has no bfloat16")
    if backend == "triton" and out_dtype == torch.float64:
        pytest.skip("the Triton kernels write float16, bfloat16 and float32")
    w = (torch.randn(n, device=device) * 0.3).to(dtype)
    w[: n // 7] = 0.0
    p = (torch.rand(n, device=device) * 20 - 17).to(dtype)
    s = (torch.rand(n, device=device) * 2 - 1).to(dtype)
    noise = torch.rand(n, device=device).to(dtype) if stochastic else None
    for fam, args in (("quantize_pot_q", (w, bits, noise)), ("quantize_pot_ps", (p, s, bits, noise))):
        got = op(backend, fam)(*args, out_dtype)
        want = op("reference", fam)(*args, out_dtype)
        assert got.dtype == out_dtype and got.shape == args[0].shape and got.is_contiguous()
        if stochastic and fam == "quantize_pot_q":  # log2 may differ by an ulp between libms
            assert (got != want).sum().item() <= max(1, n // 100)
        else:
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        if fam == "quantize_pot_q" and not stochastic:  # and it is the same-dtype result, converted
            torch.testing.assert_close(got, op(backend, fam)(*args).to(out_dtype), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_quantize_every_dtype_pair_with_special_values(backend, device):
    """Every input/output dtype pair (bits 2, 5, 8), with NaN, zeros of both signs and tiny
    values, against the reference bit for bit (NaN positions and signs of zeros too)."""
    usable(backend, "quantize_pot_q", device, torch.float32)
    specials = [float("nan"), 0.0, -0.0, 1e-40, -(2.0 ** -127), 2.0 ** -25, -(2.0 ** -24), 2.0 ** -14, 0.7, -3.0]
    for dtype in DTYPES:
        for out in OUT_DTYPES:
            if backend == "triton" and (torch.float64 in (dtype, out) or (is_interpreted(backend, device)
                                                                          and torch.bfloat16 in (dtype, out))):
                continue
            w = torch.cat([torch.tensor(specials), torch.randn(500) * 0.3]).to(dtype).to(device)
            p = torch.cat([torch.tensor(specials), torch.rand(500) * 20 - 17]).to(dtype).to(device)
            sg = torch.cat([torch.tensor(specials).flip(0), torch.rand(500) * 2 - 1]).to(dtype).to(device)
            for bits in (2, 5, 8):
                for fam, args in (("quantize_pot_q", (w, bits, None)), ("quantize_pot_ps", (p, sg, bits, None))):
                    got, want = op(backend, fam)(*args, out), op("reference", fam)(*args, out)
                    what = f"{fam} {dtype}->{out} b={bits}"
                    assert got.dtype == out, what
                    assert torch.equal(got.isnan(), want.isnan()), what
                    assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(want)), what
                    assert torch.equal(got.signbit() & ~got.isnan(), want.signbit() & ~want.isnan()), what


def test_ps_gradient_keeps_weights_below_float16_range(device):
    """dL/dP = dL/dW * W * ln 2 with W as quantized in the input's dtype, also when the
    float16 output flushed W to 0 (8 bits: exponents down to 2^-126)."""
    p = torch.tensor([-30.0, -26.0, -3.0, -100.0], device=device, requires_grad=True)
    s = torch.ones(4, device=device, requires_grad=True)
    for backend in ("cpu", "reference"):
        if _dispatch.why_not(backend, "quantize_pot_ps", torch.device(device), torch.float32) is not None:
            continue
        wq = op(backend, "quantize_pot_ps")(p, s, 8, None, torch.float16)
        assert wq[0].item() == 0.0 and wq[2].item() == 0.125  # 2^-30 is below float16's range
        g = torch.ones(4, device=device, dtype=torch.float16)
        gp, gs = torch.autograd.grad(wq, (p, s), g)
        w32 = op(backend, "quantize_pot_ps")(p.detach(), s.detach(), 8, None)
        torch.testing.assert_close(gp, w32 * math.log(2.0), rtol=0, atol=0)
        assert gp[0].item() > 0 and gs.dtype == torch.float32


def test_quantize_out_dtype_only_the_four_float_dtypes():
    w = torch.randn(4)
    for backend in ("cpu", "reference"):
        with pytest.raises((RuntimeError, TypeError), match="out_dtype must be float32"):
            op(backend, "quantize_pot_q")(w, 5, None, torch.float8_e4m3fn)
    with pytest.raises(RuntimeError, match="out_dtype must be float32"):
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode() as mode:
            op("cpu", "quantize_pot_q")(mode.from_tensor(w), 5, None, torch.float8_e4m3fn)


def test_quantize_to_float16_rounds_tiny_powers_once():
    """2^-25 is half-way between float16's 0 and 2^-24: round to even gives 0; 2^-24 stays."""
    w = torch.tensor([2.0 ** -25, -(2.0 ** -24), 2.0 ** -30, 0.5], dtype=torch.float32)
    want = torch.tensor([0.0, -(2.0 ** -24), 0.0, 0.5], dtype=torch.float16)
    for backend in ("cpu", "reference"):
        got = op(backend, "quantize_pot_q")(w, 8, None, torch.float16)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", QUANT_BACKENDS)
def test_quantize_to_out_dtype_gradients_in_the_input_dtype(backend, device):
    usable(backend, "quantize_pot_ps", device, torch.float32)
    out = torch.float16 if is_interpreted(backend, device) else torch.bfloat16
    g = torch.randn(5, 7, device=device).to(out)
    w = torch.randn(5, 7, device=device, requires_grad=True)
    wq = op(backend, "quantize_pot_q")(w, 5, None, out)
    (gw,) = torch.autograd.grad(wq, w, g)
    assert wq.dtype == out and gw.dtype == torch.float32
    torch.testing.assert_close(gw, g.float(), rtol=0, atol=0)

    p = (torch.rand(5, 7, device=device) * -10).requires_grad_()
    s = (torch.rand(5, 7, device=device) * 2 - 1).requires_grad_()
    wq = op(backend, "quantize_pot_ps")(p, s, 5, None, out)
    gp, gs = torch.autograd.grad(wq, (p, s), g)
    assert gp.dtype == gs.dtype == torch.float32
    torch.testing.assert_close(gs, g.float(), rtol=0, atol=0)
    torch.testing.assert_close(gp, g.float() * wq.detach().float() * math.log(2.0))


def test_quantize_out_dtype_bad_values_name_the_argument():
    w = torch.randn(4)
    with pytest.raises(TypeError, match="out_dtype"):
        shiftadd.quantize_pot(w, out_dtype=torch.int32)
    with pytest.raises(RuntimeError, match="out_dtype"):
        op("cpu", "quantize_pot_q")(w, 5, None, torch.int32)
    with pytest.raises(RuntimeError, match="out_dtype"):
        op("cpu", "quantize_pot_ps")(w, w, 5, None, torch.complex64)
    with pytest.raises(TypeError, match="out_dtype"):
        op("reference", "quantize_pot_q")(w, 5, None, torch.int64)


@pytest.mark.parametrize("mode", ["q", "ps"])
def test_shift_layers_under_autocast_quantize_into_the_autocast_dtype(mode, monkeypatch):
    """Under autocast a float32 master weight is quantized straight into bfloat16 (one op
    call with out_dtype), and the layer's output and gradients are what quantizing in
    float32 and casting would give."""
    torch.manual_seed(0)
    lin = shiftadd.nn.ShiftLinear(24, 16, mode=mode, weight_bits=5)
    x = torch.randn(8, 24)
    seen = []
    real = shiftadd.functional.quantize_pot

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append((kwargs.get("out_dtype"), out.dtype))
        return out

    monkeypatch.setattr(shiftadd.functional, "quantize_pot", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
    assert y.dtype == torch.bfloat16 and seen == [(torch.bfloat16, torch.bfloat16)]
    y.float().sum().backward()
    grads = {n: p.grad.clone() for n, p in lin.named_parameters()}
    assert all(g.dtype == torch.float32 for g in grads.values())

    monkeypatch.setattr(shiftadd.functional, "quantize_pot", real)
    lin.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        params = dict(lin.named_parameters())
        w32 = (shiftadd.quantize_pot(params["weight"], 5) if mode == "q" else
               shiftadd.quantize_pot(params["shift"], 5, mode="ps", sign=params["sign"]))
        y2 = F.linear(x, w32, lin.bias)
    torch.testing.assert_close(y, y2, rtol=0, atol=0)
    y2.float().sum().backward()
    for n, p in lin.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=0, atol=0)


def test_quantize_non_contiguous_input():
    w = torch.randn(6, 8)[:, ::2]
    torch.testing.assert_close(shiftadd.quantize_pot(w), op("reference", "quantize_pot_q")(w.contiguous(), 5, None))


# --------------------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", QUANT_BACKENDS)
def test_straight_through_gradients(backend, device):
    usable(backend, "quantize_pot_ps", device, torch.float32)
    g = torch.randn(5, 7, device=device)
    w = torch.randn(5, 7, device=device, requires_grad=True)
    (gw,) = torch.autograd.grad(op(backend, "quantize_pot_q")(w, 5, None), w, g)
    torch.testing.assert_close(gw, g, rtol=0, atol=0)  # dL/dW = dL/dWq

    p = (torch.rand(5, 7, device=device) * -10).requires_grad_()
    s = (torch.rand(5, 7, device=device) * 2 - 1).requires_grad_()
    wq = op(backend, "quantize_pot_ps")(p, s, 5, None)
    gp, gs = torch.autograd.grad(wq, (p, s), g)
    torch.testing.assert_close(gs, g, rtol=0, atol=0)  # dL/dS = dL/dW
    torch.testing.assert_close(gp, g * wq.detach() * math.log(2.0))  # dL/dP = dL/dW * W * ln 2

    x = torch.randn(5, 7, device=device, requires_grad=True)
    (gx,) = torch.autograd.grad(op(backend, "round_to_fixed")(x, 4, 3), x, g)
    torch.testing.assert_close(gx, g, rtol=0, atol=0)


@pytest.mark.parametrize("family,args", [
    ("quantize_pot_q", lambda: (torch.randn(4, 6, requires_grad=True), 5, None)),
    ("quantize_pot_q", lambda: (torch.randn(4, 6, requires_grad=True), 3, torch.rand(4, 6))),
    ("quantize_pot_ps", lambda: (torch.rand(4, 6, requires_grad=True) * -8, torch.randn(4, 6, requires_grad=True), 5,
                                 None)),
    ("quantize_pot_q", lambda: (torch.randn(4, 6, requires_grad=True), 5, None, torch.float16)),
    ("quantize_pot_ps", lambda: (torch.rand(4, 6, requires_grad=True) * -8, torch.randn(4, 6, requires_grad=True), 4,
                                 None, torch.float16)),
    ("round_to_fixed", lambda: (torch.randn(4, 6, requires_grad=True), 8, 8)),
])
@pytest.mark.parametrize("backend", QUANT_BACKENDS)
def test_opcheck(backend, family, args):
    usable(backend, family, "cpu", torch.float32)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if not is_interpreted(backend, "cpu"):  # fake tensors reach an interpreted Triton kernel under compile
        utils += ("test_aot_dispatch_dynamic",)
    torch.library.opcheck(op(backend, family), args(), test_utils=utils)


def test_stochastic_rounding_is_unbiased_in_the_log_domain():
    torch.manual_seed(0)
    w = torch.full((200_000,), 0.3)
    q = shiftadd.quantize_pot(w, rounding="stochastic")
    assert set(q.unique().tolist()) == {0.25, 0.5}
    assert abs(torch.log2(q).mean().item() - math.log2(0.3)) < 0.01
    p = torch.full((200_000,), -2.3)
    wq = shiftadd.quantize_pot(p, mode="ps", sign=torch.ones_like(p), rounding="stochastic")
    assert abs(torch.log2(wq).mean().item() + 2.3) < 0.01


def test_stochastic_rounding_follows_the_generator():
    w = torch.randn(100)
    a = shiftadd.quantize_pot(w, rounding="stochastic", generator=torch.Generator().manual_seed(3))
    b = shiftadd.quantize_pot(w, rounding="stochastic", generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# --------------------------------------------------------------------------------------
# shift layers (functional)
# --------------------------------------------------------------------------------------


def test_shift_linear_is_linear_with_the_pot_weight():
    x, w, b = torch.randn(3, 5, 8), torch.randn(6, 8), torch.randn(6)
    wq = op("reference", "quantize_pot_q")(w, 5, None)
    torch.testing.assert_close(shiftadd.shift_linear(x, w, b), F.linear(x, wq, b))
    torch.testing.assert_close(shiftadd.shift_linear(x, wq, b, mode="pot"), F.linear(x, wq, b))
    xr, br = (op("reference", "round_to_fixed")(t, 4, 4) for t in (x, b))
    torch.testing.assert_close(shiftadd.shift_linear(x, w, b, act_bits=(4, 4)), F.linear(xr, wq, br))


def test_shift_conv2d_is_conv_with_the_pot_weight():
    x = torch.randn(2, 4, 9, 9)
    p, s = torch.rand(6, 2, 3, 3) * -6, torch.randn(6, 2, 3, 3)
    wq = op("reference", "quantize_pot_ps")(p, s, 4, None)
    got = shiftadd.shift_conv2d(x, p, None, 2, 1, 1, 2, mode="ps", sign=s, weight_bits=4)
    torch.testing.assert_close(got, F.conv2d(x, wq, None, 2, 1, 1, 2))


def test_shift_conv2d_gradients_flow_to_shift_and_sign():
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    p = (torch.rand(4, 3, 3, 3) * -6).requires_grad_()
    s = torch.randn(4, 3, 3, 3, requires_grad=True)
    y = shiftadd.shift_conv2d(x, p, padding=1, mode="ps", sign=s)
    y.square().sum().backward()
    wq = op("reference", "quantize_pot_ps")(p.detach(), s.detach(), 5, None)
    xd = x.detach().requires_grad_()
    wd = wq.clone().requires_grad_()
    F.conv2d(xd, wd, padding=1).square().sum().backward()
    torch.testing.assert_close(x.grad, xd.grad)
    torch.testing.assert_close(s.grad, wd.grad)
    torch.testing.assert_close(p.grad, wd.grad * wq * math.log(2.0))
