"""Adder operators: every backend against the float64 reference, and the reference
against a brute-force loop implementation of AdderNet's definition."""

import itertools

import pytest
import torch
from conftest import assert_close_rel, cpu_isas, is_interpreted, op, rel_err
from hypothesis import given
from hypothesis import strategies as st

import shiftadd
from shiftadd import _dispatch

BACKENDS = ["cuda", "triton", "cpu"]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
MODES = ["addernet", "exact"]


def skip_unless_usable(backend, family, device, dtype):
    reason = _dispatch.why_not(backend, family, torch.device(device), dtype)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")


# --------------------------------------------------------------------------------------
# brute-force definitions (tiny shapes, float64, python loops)
# --------------------------------------------------------------------------------------


def naive_conv(x, w, stride, padding, dilation, groups, g=None, mode="addernet"):
    """Forward, and with g the input and weight gradients, straight from the formulas:
    every (n, o, oy, ox) x (c, i, j) term, padded positions read as zero."""
    N, C, H, W = x.shape
    O, Cg, kh, kw = w.shape
    Og = O // groups
    Ho = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    Wo = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    y = torch.zeros(N, O, Ho, Wo, dtype=torch.float64)
    dx, dw = torch.zeros_like(x, dtype=torch.float64), torch.zeros_like(w, dtype=torch.float64)
    f = (lambda d: max(-1.0, min(1.0, d))) if mode == "addernet" else (lambda d: float((d > 0) - (d < 0)))
    sgn = lambda d: float((d > 0) - (d < 0))  # noqa: E731
    for n, o, oy, ox in itertools.product(range(N), range(O), range(Ho), range(Wo)):
        gi = o // Og
        acc = 0.0
        for cl, i, j in itertools.product(range(Cg), range(kh), range(kw)):
            c = gi * Cg + cl
            iy, ix = oy * stride[0] - padding[0] + i * dilation[0], ox * stride[1] - padding[1] + j * dilation[1]
            inside = 0 <= iy < H and 0 <= ix < W
            xv = float(x[n, c, iy, ix]) if inside else 0.0
            wv = float(w[o, cl, i, j])
            acc += abs(xv - wv)
            if g is not None:
                gv = float(g[n, o, oy, ox])
                if inside:
                    dx[n, c, iy, ix] += gv * f(wv - xv)
                dw[o, cl, i, j] += gv * ((xv - wv) if mode == "addernet" else sgn(xv - wv))
        y[n, o, oy, ox] = -acc
    return y if g is None else (y, dx, dw)


CONV_CASES = [
    # x shape, w shape, stride, padding, dilation, groups
    ((2, 3, 5, 6), (4, 3, 3, 3), (1, 1), (1, 1), (1, 1), 1),
    ((1, 4, 7, 5), (6, 2, 2, 3), (2, 1), (1, 2), (1, 2), 2),
    ((2, 4, 6, 6), (4, 1, 3, 3), (2, 2), (0, 1), (2, 1), 4),
    ((1, 2, 4, 4), (3, 2, 1, 1), (3, 2), (2, 0), (1, 1), 1),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CONV_CASES)
def test_reference_conv_matches_brute_force(case, mode):
    xs, ws, stride, padding, dilation, groups = case
    x, w = torch.randn(xs, dtype=torch.float64), torch.randn(ws, dtype=torch.float64)
    args = (list(stride), list(padding), list(dilation), groups, mode)
    y = op("reference", "adder_conv2d")(x, w, *args)
    g = torch.randn_like(y)
    y0, dx0, dw0 = naive_conv(x, w, stride, padding, dilation, groups, g, mode)
    torch.testing.assert_close(y, y0)
    torch.testing.assert_close(op("reference", "adder_conv2d_grad_input")(g, x, w, *args), dx0)
    torch.testing.assert_close(op("reference", "adder_conv2d_grad_weight")(g, x, w, *args), dw0)


@pytest.mark.parametrize("mode", MODES)
def test_reference_linear_matches_definition(mode):
    x, w, g = torch.randn(5, 7, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    d = x[:, None, :] - w[None, :, :]  # (N, O, K)
    torch.testing.assert_close(op("reference", "adder_linear")(x, w, mode), -d.abs().sum(-1))
    f = (-d).clamp(-1, 1) if mode == "addernet" else (-d).sign()
    torch.testing.assert_close(op("reference", "adder_linear_grad_input")(g, x, w, mode), (g[:, :, None] * f).sum(1))
    fw = d if mode == "addernet" else d.sign()
    torch.testing.assert_close(op("reference", "adder_linear_grad_weight")(g, x, w, mode), (g[:, :, None] * fw).sum(0))


def test_reference_gradcheck_exact_mode():
    """In exact mode the gradients are the true derivative: gradcheck holds (away from kinks)."""
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    ref = op("reference", "adder_conv2d")
    assert torch.autograd.gradcheck(lambda a, b: ref(a, b, [2, 1], [1, 1], [1, 1], 1, "exact"), (x, w))
    xl = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    wl = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: op("reference", "adder_linear")(a, b, "exact"), (xl, wl))


def test_reference_is_independent_of_its_chunk_size(monkeypatch):
    x, w = torch.randn(3, 5, 9, 9, dtype=torch.float64), torch.randn(7, 5, 3, 3, dtype=torch.float64)
    args = ([1, 1], [1, 1], [1, 1], 1, "exact")
    y = op("reference", "adder_conv2d")(x, w, *args)
    g = torch.randn_like(y)
    full = [op("reference", f)(g, x, w, *args) for f in ("adder_conv2d_grad_input", "adder_conv2d_grad_weight")]
    monkeypatch.setenv("SHIFTADD_REF_CHUNK_MB", "0.01")  # forces many row, channel and batch chunks
    torch.testing.assert_close(op("reference", "adder_conv2d")(x, w, *args), y)
    for f, want in zip(("adder_conv2d_grad_input", "adder_conv2d_grad_weight"), full):
        torch.testing.assert_close(op("reference", f)(g, x, w, *args), want)


# --------------------------------------------------------------------------------------
# backends against the reference
# --------------------------------------------------------------------------------------


def make(shape, dtype, device, layout="contiguous"):
    """Random values of `dtype` in the given layout (the layout is made after the cast, so
    a strided half tensor really is strided)."""
    if layout == "strided":
        return torch.randn(*shape[:-1], 2 * shape[-1], device=device).to(dtype)[..., ::2]
    t = torch.randn(shape, dtype=torch.float32, device=device).to(dtype)
    if layout == "channels_last" and len(shape) == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    return t


def check_against_reference(backend, family, x, w, args, mode, dtype):
    """Forward through the backend's op, gradients through autograd (so the registered
    backward is exercised), all against the float64 reference."""
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    xb, wb = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y = op(backend, family)(xb, wb, *args, mode)
    yr = op("reference", family)(xr, wr, *args, mode)
    assert y.dtype == x.dtype and y.shape == yr.shape
    if family == "adder_conv2d":
        assert y.is_contiguous(memory_format=shiftadd._ops.conv_memory_format(x))
    assert_close_rel(y, yr, dtype, f"{backend} {family} forward")
    if y.numel() == 0:
        return
    g = torch.randn(yr.shape, dtype=torch.float64, device=x.device)
    gx, gw = torch.autograd.grad(y, (xb, wb), g.to(dtype))
    gxr, gwr = torch.autograd.grad(yr, (xr, wr), g.to(dtype).double())
    assert gx.dtype == x.dtype and gw.dtype == w.dtype
    assert_close_rel(gx, gxr, dtype, f"{backend} {family} grad input ({mode})")
    if x.is_cuda and family == "adder_conv2d" and mode == "addernet" and dtype == torch.float32 \
            and torch.backends.cudnn.allow_tf32:
        # the AdderNet weight gradient's GEMM part is cuDNN's conv weight-gradient, in TF32 when torch allows it
        assert rel_err(gw, gwr) < 3e-3, f"{backend} {family} grad weight ({mode}, TF32)"
    else:
        assert_close_rel(gw, gwr, dtype, f"{backend} {family} grad weight ({mode})")


@st.composite
def conv_cases(draw, tiny):
    groups = draw(st.sampled_from([1, 2, 3]))
    cg = draw(st.integers(1, 2 if tiny else 5))
    og = draw(st.integers(1, 3 if tiny else 40))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    ph, pw = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    n = draw(st.integers(0, 2 if tiny else 3))
    top = 6 if tiny else 12
    h = draw(st.integers(max(1, dh * (kh - 1) + 1 - 2 * ph), top))
    w = draw(st.integers(max(1, dw * (kw - 1) + 1 - 2 * pw), top))
    layout = draw(st.sampled_from(["contiguous", "channels_last", "strided"]))
    return dict(x=(n, cg * groups, h, w), w=(og * groups, cg, kh, kw), args=([sh, sw], [ph, pw], [dh, dw], groups),
                layout=layout)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_conv2d_backend_matches_reference(backend, dtype, mode, device, data):
    skip_unless_usable(backend, "adder_conv2d", device, dtype)
    case = data.draw(conv_cases(tiny=is_interpreted(backend, device)))
    x = make(case["x"], dtype, device, case["layout"])
    w = make(case["w"], dtype, device)
    check_against_reference(backend, "adder_conv2d", x, w, case["args"], mode, dtype)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_linear_backend_matches_reference(backend, dtype, mode, device, data):
    skip_unless_usable(backend, "adder_linear", device, dtype)
    tiny = is_interpreted(backend, device)
    n = data.draw(st.integers(0, 9 if tiny else 130))
    k = data.draw(st.integers(1, 9 if tiny else 300))
    o = data.draw(st.integers(1, 9 if tiny else 70))
    layout = data.draw(st.sampled_from(["contiguous", "strided"]))
    check_against_reference(backend, "adder_linear", make((n, k), dtype, device, layout), make((o, k), dtype, device),
                            (), mode, dtype)


def each_cpu_isa():
    """Yields each instruction set this CPU runs the kernels on, with it selected; restores
    the previous one afterwards."""
    old = _dispatch._C.cpu_isa()
    try:
        for isa in cpu_isas():
            _dispatch._C.set_cpu_isa(isa)
            yield isa
    finally:
        _dispatch._C.set_cpu_isa(old)


def each_isa_and_dtype(case, mode, env, algo, monkeypatch):
    """For a CPU-algorithm test: forces `algo` through the environment variable `env`, then
    on each instruction set and in float32 and float64 checks the forward of `case` against
    the reference and yields (isa, dtype, x, w, args), x and w fresh copies to modify."""
    if not cpu_isas():
        pytest.skip("shiftadd._C not loaded")
    monkeypatch.setenv(env, algo)
    xs, ws, args, layout = case
    for isa in each_cpu_isa():
        for dtype in (torch.float32, torch.float64):
            x, w = make(xs, dtype, "cpu", layout), make(ws, dtype, "cpu")
            check_against_reference("cpu", "adder_conv2d", x, w, args, mode, dtype)
            yield isa, dtype, x.clone(), w.clone(), args


# shapes past every CPU tile size (rows > 96, k > 256, o > 32, k not a multiple of any block)
LARGE_CASES = [
    ("adder_linear", (131, 301), (67, 301), ()),
    ("adder_linear", (3, 1000), (127, 1000), ()),
    ("adder_conv2d", (2, 34, 11, 13), (40, 34, 3, 3), ([1, 1], [1, 1], [1, 1], 1)),
    ("adder_conv2d", (3, 12, 15, 9), (18, 4, 3, 3), ([2, 1], [1, 0], [1, 2], 3)),
    ("adder_conv2d", (1, 16, 20, 20), (16, 1, 3, 3), ([1, 1], [1, 1], [1, 1], 16)),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", LARGE_CASES, ids=lambda c: f"{c[0]}{c[1]}x{c[2]}")
def test_cpu_kernels_on_every_instruction_set(case, mode):
    """The vectorised CPU kernels exist in generic, AVX2 and AVX-512 builds; each one runs here."""
    if not cpu_isas():
        pytest.skip("shiftadd._C not loaded")
    family, xs, ws, args = case
    for _ in each_cpu_isa():
        for dtype in (torch.float32, torch.float64):
            x = make(xs, dtype, "cpu", "channels_last" if len(xs) == 4 else "contiguous")
            check_against_reference("cpu", family, x, make(ws, dtype, "cpu"), args, mode, dtype)


STRIDE1_CASES = [  # stride-1 convs: the CPU grad input has a direct (tap-gather) and a GEMM algorithm
    ((2, 16, 9, 11), (16, 16, 3, 3), ([1, 1], [1, 1], [1, 1], 1), "contiguous"),
    ((3, 20, 10, 12), (24, 10, 3, 3), ([1, 1], [2, 0], [2, 1], 2), "channels_last"),
    ((1, 5, 13, 7), (7, 5, 5, 3), ([1, 1], [2, 1], [1, 1], 1), "strided"),
    ((2, 8, 6, 19), (8, 1, 3, 3), ([1, 1], [1, 1], [1, 1], 8), "contiguous"),  # depthwise, ragged row blocks
]


@pytest.mark.parametrize("algo", ["gemm", "direct"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", STRIDE1_CASES, ids=lambda c: f"{c[0]}x{c[1]}")
def test_cpu_grad_input_algorithms(case, mode, algo, monkeypatch):
    """Both CPU grad-input algorithms (SHIFTADD_CPU_GRAD_INPUT forces one) on every ISA,
    against the reference, with NaN and inf on border pixels (the direct kernel's exact
    fallback) as well as finite inputs."""
    for isa, dtype, x, w, args in each_isa_and_dtype(case, mode, "SHIFTADD_CPU_GRAD_INPUT", algo, monkeypatch):
        x[0, 0, 0, 0] = float("nan")
        x[-1, -1, -1, -1] = float("inf")
        g = torch.randn(op("reference", "adder_conv2d")(x, w, *args, mode).shape, dtype=dtype)
        a = op("cpu", "adder_conv2d_grad_input")(g, x, w, *args, mode)
        b = op("reference", "adder_conv2d_grad_input")(g.double(), x.double(), w.double(), *args, mode)
        assert torch.equal(a.isnan(), b.isnan()), f"{isa} {dtype}: NaN positions differ"
        fin = b.isfinite()
        torch.testing.assert_close(a.double()[fin], b[fin], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("algo", ["gemm", "direct"])
@pytest.mark.parametrize("case", STRIDE1_CASES, ids=lambda c: f"{c[0]}x{c[1]}")
def test_cpu_exact_grad_weight_algorithms(case, algo, monkeypatch):
    """Both CPU exact weight-gradient algorithms (SHIFTADD_CPU_GRAD_WEIGHT forces one) on
    every ISA against the reference, with NaN / inf in x and W (sign 0 / +-1) and in grad_out
    (the direct kernel leaves a non-finite grad_out to the GEMM path)."""
    for isa, dtype, x, w, args in each_isa_and_dtype(case, "exact", "SHIFTADD_CPU_GRAD_WEIGHT", algo, monkeypatch):
        x[0, 0, 0, 0], x[-1, -1, -1, -1], w[0, 0, 0, 0] = float("nan"), float("inf"), float("-inf")
        shape = op("reference", "adder_conv2d")(x, w, *args, "exact").shape
        for g in (make(shape, dtype, "cpu", "strided"),
                  torch.randn(shape, dtype=dtype).index_fill_(0, torch.tensor([0]), float("inf"))):
            a = op("cpu", "adder_conv2d_grad_weight")(g, x, w, *args, "exact")
            b = op("reference", "adder_conv2d_grad_weight")(g.double(), x.double(), w.double(), *args, "exact")
            assert torch.equal(a.isnan(), b.isnan()), f"{isa} {dtype}: NaN positions differ"
            fin = b.isfinite()
            torch.testing.assert_close(a.double()[fin], b[fin], rtol=1e-4, atol=1e-4)


def test_set_cpu_isa_rejects_unknown():
    if not cpu_isas():
        pytest.skip("shiftadd._C not loaded")
    with pytest.raises(RuntimeError, match="unknown instruction set"):
        _dispatch._C.set_cpu_isa("sse9")


# --------------------------------------------------------------------------------------
# special values and sizes
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_propagate_like_the_reference(backend, device):
    skip_unless_usable(backend, "adder_conv2d", device, torch.float32)
    x = torch.randn(2, 3, 5, 5, device=device)
    w = torch.randn(4, 3, 3, 3, device=device)
    x[0, 1, 2, 2] = float("nan")
    x[1, 0, 0, 0] = float("inf")
    w[3, 2, 1, 1] = float("-inf")
    args = ([1, 1], [1, 1], [1, 1], 1)
    for mode in MODES:
        y = op(backend, "adder_conv2d")(x, w, *args, mode)
        yr = op("reference", "adder_conv2d")(x.double(), w.double(), *args, mode)
        torch.testing.assert_close(y.double(), yr, rtol=1e-5, atol=1e-4, equal_nan=True)
        g = torch.randn_like(y)
        for fam in ("adder_conv2d_grad_input", "adder_conv2d_grad_weight"):
            a = op(backend, fam)(g, x, w, *args, mode)
            b = op("reference", fam)(g.double(), x.double(), w.double(), *args, mode)
            assert torch.equal(a.isnan(), b.isnan()), f"{fam} {mode}: NaN positions differ"
            fin = b.isfinite()
            torch.testing.assert_close(a.double()[fin], b[fin], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_grad_out_like_the_reference(backend, device):
    """An inf or NaN in grad_out reaches the weight and input gradients as in the
    reference (the CPU exact weight gradient has a separate path for finite grad_out)."""
    skip_unless_usable(backend, "adder_conv2d", device, torch.float32)
    x, w = torch.randn(2, 3, 6, 6, device=device), torch.randn(4, 3, 3, 3, device=device)
    x[0, 0, 2, 2] = w[1, 0, 1, 1]  # an exact zero difference: sign 0, and inf * 0 = NaN
    args = ([1, 1], [1, 1], [1, 1], 1)
    g = torch.randn(2, 4, 6, 6, device=device)
    g[0, 1, 1, 1], g[1, 2, 3, 3] = float("inf"), float("nan")
    for mode in MODES:
        for fam in ("adder_conv2d_grad_input", "adder_conv2d_grad_weight"):
            a = op(backend, fam)(g, x, w, *args, mode)
            b = op("reference", fam)(g.double(), x.double(), w.double(), *args, mode)
            assert torch.equal(a.isnan(), b.isnan()), f"{fam} {mode}: NaN positions differ"
            assert torch.equal(a.isinf(), b.isinf()), f"{fam} {mode}: inf positions differ"
            fin = b.isfinite()
            torch.testing.assert_close(a.double()[fin], b[fin], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_empty_and_degenerate_sizes(backend, device):
    skip_unless_usable(backend, "adder_linear", device, torch.float32)
    lin = op(backend, "adder_linear")
    assert lin(torch.randn(0, 5, device=device), torch.randn(3, 5, device=device), "addernet").shape == (0, 3)
    assert lin(torch.randn(4, 5, device=device), torch.randn(0, 5, device=device), "addernet").shape == (4, 0)
    z = lin(torch.randn(4, 0, device=device), torch.randn(3, 0, device=device), "addernet")
    assert z.shape == (4, 3) and bool((z == 0).all())
    conv = op(backend, "adder_conv2d")
    x, w = torch.randn(0, 4, 6, 6, device=device), torch.randn(5, 4, 3, 3, device=device)
    y = conv(x, w, [1, 1], [1, 1], [1, 1], 1, "addernet")
    assert y.shape == (0, 5, 6, 6)
    g = torch.randn(0, 5, 6, 6, device=device)
    assert op(backend, "adder_conv2d_grad_input")(g, x, w, [1, 1], [1, 1], [1, 1], 1, "exact").shape == x.shape
    dw = op(backend, "adder_conv2d_grad_weight")(g, x, w, [1, 1], [1, 1], [1, 1], 1, "exact")
    assert dw.shape == w.shape and bool((dw == 0).all())


# --------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------

FAMILY_ARGS = {
    "adder_linear": lambda d: ((torch.randn(5, 7, device=d), torch.randn(3, 7, device=d)), ()),
    "adder_conv2d": lambda d: ((torch.randn(2, 4, 6, 5, device=d), torch.randn(6, 2, 3, 2, device=d)),
                               ([2, 1], [1, 1], [1, 2], 2)),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", list(FAMILY_ARGS))
@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_opcheck(backend, family, mode, device):
    skip_unless_usable(backend, family, device, torch.float32)
    (x, w), conv = FAMILY_ARGS[family](device)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if not is_interpreted(backend, device):
        utils += ("test_aot_dispatch_dynamic",)
    torch.library.opcheck(op(backend, family), (x.requires_grad_(), w.requires_grad_(), *conv, mode),
                          test_utils=utils)
    y = op(backend, family)(x.detach(), w.detach(), *conv, mode)
    g = torch.randn_like(y)
    for suffix in ("_grad_input", "_grad_weight"):
        torch.library.opcheck(op(backend, family + suffix), (g, x.detach(), w.detach(), *conv, mode),
                              test_utils=utils)


def test_double_backward_raises_clearly():
    x = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(2, 4, requires_grad=True)
    y = shiftadd.adder_linear(x, w)
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()


@pytest.mark.slow
def test_reference_memory_is_bounded_on_resnet50_stage3_layer():
    """32x256x14x14, 3x3, 256 outputs: the unfold approach needs about 30 GB; the reference
    must stay within 1 GB of extra memory (peak RSS measured in a fresh process)."""
    import subprocess
    import sys

    code = (
        "import resource, torch, shiftadd\n"
        "from shiftadd import _ops\n"
        "x = torch.randn(32, 256, 14, 14); w = torch.randn(256, 256, 3, 3)\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "y = _ops.op('reference', 'adder_conv2d')(x, w, [1, 1], [1, 1], [1, 1], 1, 'addernet')\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    extra = int(out.stdout.strip().splitlines()[-1])
    assert extra < 1 << 30, f"reference used {extra / 2**30:.2f} GB extra"

