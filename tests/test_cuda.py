"""The compiled CUDA backend in depth (GPU only; skipped without a CUDA device or a CUDA
build of shiftadd._C).

tests/test_adder.py and tests/test_shift.py already run every usable backend on random
cases; these add what is specific to csrc/cuda: each kernel path (tiled and direct,
forced with SHIFTADD_CUDA_ALGO; fitted tiles and reduction splits with SHIFTADD_CUDA_TILES and SHIFTADD_CUDA_SPLIT_K), shapes past every tile size, every conv parameter
combination, the three dtypes, memory formats, empty sizes, NaN / Inf, the 32-bit
index limits, determinism, grids beyond 65535 blocks, and the quantizers bit for bit
(float64 included).
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import RTOL, rel_err
from test_packed import args_of, random_pot

from shiftadd import _dispatch, _ops
from shiftadd.packed import pack_pot


def _unavailable():
    if not torch.cuda.is_available():
        return "no CUDA device"
    return _dispatch.why_not("cuda", "adder_conv2d", torch.device("cuda"), torch.float32)


_REASON = _unavailable()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_REASON is not None, reason=f"cuda backend: {_REASON}")]

DEV = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MODES = ["addernet", "exact"]
ALGOS = ["auto", "tiled", "direct"]


@pytest.fixture(autouse=True)
def _strict_fp32():
    # the AdderNet weight gradient goes through cuDNN / cuBLAS: no TF32 in these comparisons
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@pytest.fixture
def algo(request, monkeypatch):
    monkeypatch.setenv("SHIFTADD_CUDA_ALGO", request.param)
    return request.param


def cuda_op(family):
    return _ops.op("cuda", family)


def ref_op(family):
    return _ops.op("reference", family)


def make(shape, dtype, layout="contiguous", scale=1.0):
    """A CUDA tensor of `shape` and `dtype` in the given layout (values drawn in float32)."""
    if layout == "strided":  # every other element of the last dimension
        base = (torch.randn(*shape[:-1], 2 * shape[-1], device=DEV) * scale).to(dtype)
        return base[..., ::2]
    if layout == "transposed":  # 2-D, column-major
        return (torch.randn(shape[::-1], device=DEV) * scale).to(dtype).t()
    t = (torch.randn(shape, device=DEV) * scale).to(dtype)
    if layout == "channels_last":
        t = t.contiguous(memory_format=torch.channels_last)
    return t


def check(got, want, dtype, what, memory_format=None, floor=0.0):
    """Relative error against the float64 `want`, over max(||want||, floor): a floor for
    sums that cancel, where ||want|| says nothing of the rounding of their terms."""
    assert got.device.type == "cuda", what
    assert got.dtype == dtype and got.shape == want.shape, (what, got.dtype, got.shape, want.shape)
    if memory_format is not None:
        assert got.is_contiguous(memory_format=memory_format), f"{what}: wrong memory format {got.stride()}"
    if floor > 0:
        err = (got.double() - want.double()).norm().item() / max(want.double().norm().item(), floor)
    else:
        err = rel_err(got, want)
    assert err <= RTOL[dtype], f"{what}: relative error {err:.3g} > {RTOL[dtype]:.0e} ({dtype})"


def run_linear(x, w, mode, dtype, what):
    xr, wr = x.double(), w.double()
    y = cuda_op("adder_linear")(x, w, mode)
    check(y, ref_op("adder_linear")(xr, wr, mode), dtype, f"{what} forward", torch.contiguous_format)
    g = make(y.shape, dtype)
    gr = g.double()
    # each grad input element sums n terms g * HardTanh or g * sign, each at most |g|: with
    # one output row and column (m = k = 1) the sum can cancel far below the terms (an
    # H100 run failed once at 1x1 -> 1000); the floor is 1 % of the bound sum_n |g|
    floor = 0.01 * (gr.abs().sum(1).norm() * x.shape[1] ** 0.5).item()
    check(cuda_op("adder_linear_grad_input")(g, x, w, mode), ref_op("adder_linear_grad_input")(gr, xr, wr, mode),
          dtype, f"{what} grad input", floor=floor)
    check(cuda_op("adder_linear_grad_weight")(g, x, w, mode), ref_op("adder_linear_grad_weight")(gr, xr, wr, mode),
          dtype, f"{what} grad weight", torch.contiguous_format)


def run_conv(x, w, args, mode, dtype, what, grad=None):
    xr, wr = x.double(), w.double()
    fmt = _ops.conv_memory_format(x)
    y = cuda_op("adder_conv2d")(x, w, *args, mode)
    check(y, ref_op("adder_conv2d")(xr, wr, *args, mode), dtype, f"{what} forward", fmt)
    g = make(y.shape, dtype) if grad is None else grad
    gr = g.double()
    check(cuda_op("adder_conv2d_grad_input")(g, x, w, *args, mode),
          ref_op("adder_conv2d_grad_input")(gr, xr, wr, *args, mode), dtype, f"{what} grad input", fmt)
    check(cuda_op("adder_conv2d_grad_weight")(g, x, w, *args, mode),
          ref_op("adder_conv2d_grad_weight")(gr, xr, wr, *args, mode), dtype, f"{what} grad weight",
          torch.contiguous_format)


# --------------------------------------------------------------------------------------
# linear: odd sizes (K never a multiple of a tile), every kernel path
# --------------------------------------------------------------------------------------

SIZES = [1, 3, 127, 1000]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("m,n,k", list(itertools.product(SIZES, SIZES, SIZES)))
def test_linear_odd_shapes_float32(m, n, k, mode):
    """x (m, k), weight (n, k): batch 1..1000 (the small batches run transposed), out 1..1000."""
    x, w = make((m, k), torch.float32), make((n, k), torch.float32)
    run_linear(x, w, mode, torch.float32, f"linear {m}x{k} -> {n}")


@pytest.mark.parametrize("algo", ALGOS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("m,n,k", [(1, 1000, 127), (3, 127, 1000), (127, 3, 1000), (1000, 127, 3), (130, 129, 301),
                                   (33, 40, 17)])
def test_linear_paths_and_dtypes(m, n, k, mode, dtype, algo):
    x, w = make((m, k), dtype), make((n, k), dtype)
    run_linear(x, w, mode, dtype, f"linear {m}x{k} -> {n} {algo}")


@pytest.mark.parametrize("layout", ["strided", "transposed"])
@pytest.mark.parametrize("mode", MODES)
def test_linear_non_contiguous(layout, mode):
    for m, n, k in [(3, 127, 1000), (127, 40, 33), (1000, 3, 127)]:
        x = make((m, k), torch.float32, layout)
        w = make((n, k), torch.float32, "transposed")  # the weight is made contiguous by the op
        assert not x.is_contiguous() and not w.is_contiguous()
        run_linear(x, w, mode, torch.float32, f"linear {layout} {m}x{k} -> {n}")


# --------------------------------------------------------------------------------------
# conv2d: every parameter combination, each path, layouts and dtypes
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("algo", ALGOS, indirect=True)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("groups", [1, 2, 8])  # 8: depthwise
@pytest.mark.parametrize("dilation", [1, 2])
@pytest.mark.parametrize("padding", [0, 1, 2])
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_conv_every_parameter_combination(stride, padding, dilation, groups, mode, algo):
    x = make((2, 8, 11, 9), torch.float32, "channels_last" if (stride + padding) % 2 else "contiguous")
    w = make((16, 8 // groups, 3, 3), torch.float32)
    args = ([stride, stride], [padding, padding], [dilation, dilation], groups)
    run_conv(x, w, args, mode, torch.float32, f"conv s{stride} p{padding} d{dilation} g{groups} {algo}")


CONV_CASES = [
    # x, weight, stride, padding, dilation, groups: past every tile (Og > 32, Cg > 32, K % 8 != 0)
    ((2, 34, 11, 13), (40, 34, 3, 3), (1, 1), (1, 1), (1, 1), 1),
    ((3, 12, 15, 9), (18, 4, 3, 3), (2, 1), (1, 0), (1, 2), 3),
    ((1, 16, 20, 20), (16, 1, 3, 3), (1, 1), (1, 1), (1, 1), 16),
    ((2, 70, 9, 7), (130, 35, 2, 3), (1, 2), (0, 1), (2, 1), 2),
    ((4, 5, 17, 6), (33, 5, 1, 1), (1, 1), (0, 0), (1, 1), 1),
    ((2, 3, 7, 7), (64, 3, 7, 7), (2, 2), (3, 3), (1, 1), 1),
]


def conv_case_id(c):
    return f"x{c[0]}w{c[1]}s{c[2]}p{c[3]}d{c[4]}g{c[5]}"


@pytest.mark.parametrize("algo", ALGOS, indirect=True)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CONV_CASES, ids=conv_case_id)
def test_conv_paths_dtypes_layouts(case, mode, dtype, layout, algo):
    run_conv_case(case, mode, dtype, layout, algo)


def run_conv_case(case, mode, dtype, layout, setting):
    xs, ws, stride, padding, dilation, groups = case
    x = make(xs, dtype, layout)
    w = make(ws, dtype)
    run_conv(x, w, (list(stride), list(padding), list(dilation), groups), mode, dtype,
             f"conv {case} {layout} {setting}")


def test_conv_non_contiguous_weight_and_grad():
    x = make((2, 6, 9, 8), torch.float32, "channels_last")
    w = make((6, 12, 3, 3), torch.float32).transpose(0, 1)  # (12, 6, 3, 3), not contiguous
    g = make((2, 12, 9, 8), torch.float32).transpose(2, 3).contiguous().transpose(2, 3)  # odd strides
    assert not w.is_contiguous() and not g.is_contiguous()
    run_conv(x, w, ([1, 1], [1, 1], [1, 1], 1), "exact", torch.float32, "conv odd strides", grad=g)


def test_conv_output_formats_follow_x():
    w = make((4, 3, 3, 3), torch.float32)
    for x, fmt in [(make((2, 3, 5, 5), torch.float32), torch.contiguous_format),
                   (make((2, 3, 5, 5), torch.float32, "channels_last"), torch.channels_last),
                   (make((2, 3, 1, 1), torch.float32, "channels_last"), torch.contiguous_format)]:
        y = cuda_op("adder_conv2d")(x, w, [1, 1], [2, 2], [1, 1], 1, "addernet")
        assert y.is_contiguous(memory_format=fmt)
        gx = cuda_op("adder_conv2d_grad_input")(torch.randn_like(y), x, w, [1, 1], [2, 2], [1, 1], 1, "exact")
        assert gx.is_contiguous(memory_format=fmt)


def test_grid_beyond_65535_blocks():
    """More (group, tile) pairs than a grid's y dimension holds: the kernels loop.  Depthwise
    groups are independent, so slices are checked against the reference."""
    G = 70000
    x = make((1, G, 3, 2), torch.float32)
    w = make((G, 1, 2, 2), torch.float32)
    args = ([1, 1], [1, 0], [1, 1])
    for a in ALGOS:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SHIFTADD_CUDA_ALGO", a)
            for mode in MODES:
                y = cuda_op("adder_conv2d")(x, w, *args, G, mode)
                g = torch.randn_like(y)
                dx = cuda_op("adder_conv2d_grad_input")(g, x, w, *args, G, mode)
                dw = cuda_op("adder_conv2d_grad_weight")(g, x, w, *args, G, mode)
                for c0 in (0, 65530, G - 7):
                    c = slice(c0, c0 + 7)
                    xs, ws, gs = x[:, c].double(), w[c].double(), g[:, c].double()
                    what = f"depthwise {G} {a} {mode} channels {c0}+7"
                    check(y[:, c], ref_op("adder_conv2d")(xs, ws, *args, 7, mode), torch.float32, what)
                    check(dx[:, c], ref_op("adder_conv2d_grad_input")(gs, xs, ws, *args, 7, mode), torch.float32, what)
                    check(dw[c], ref_op("adder_conv2d_grad_weight")(gs, xs, ws, *args, 7, mode), torch.float32, what)


# --------------------------------------------------------------------------------------
# kernel choices (kernels.h Tuning; the defaults fit/off/sat since 2026-11-23): forward
# tiles fitted to the channels (SHIFTADD_CUDA_TILES=fit), the tiled forward and grad input
# summed in reduction splits (SHIFTADD_CUDA_SPLIT_K: auto, few tiles for the SMs, or forced;
# 100 exceeds every case's stage count) and the saturate form of the AdderNet-mode grad
# input (SHIFTADD_CUDA_GIN=sat); classic/off/clamp are the kernels before them.
# Parameter "tiles/splits/gin".
# --------------------------------------------------------------------------------------

SPLITS = ["fit/off/sat", "fit/auto/sat", "classic/auto/clamp", "fit/3/sat", "fit/100/clamp", "classic/off/clamp"]


@pytest.fixture
def split_k(request, monkeypatch):
    tiles, splits, gin = request.param.split("/")
    monkeypatch.setenv("SHIFTADD_CUDA_TILES", tiles)
    monkeypatch.setenv("SHIFTADD_CUDA_SPLIT_K", splits)
    monkeypatch.setenv("SHIFTADD_CUDA_GIN", gin)
    monkeypatch.setenv("SHIFTADD_CUDA_ALGO", "tiled")
    return request.param


@pytest.mark.parametrize("split_k", SPLITS, indirect=True)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CONV_CASES + [
    ((16, 64, 8, 8), (64, 64, 3, 3), (1, 1), (1, 1), (1, 1), 1),     # ResNet-20 stage 3: 16 tiles
    ((4, 256, 14, 14), (256, 256, 3, 3), (1, 1), (1, 1), (1, 1), 1),  # ResNet-50 stage 3
    ((8, 16, 12, 12), (16, 16, 3, 3), (1, 1), (1, 1), (1, 1), 1),     # 16 channels: the 16-wide tile
    ((3, 12, 9, 10), (10, 6, 3, 3), (2, 1), (1, 1), (1, 2), 2),       # Og = 5, forced tiled
], ids=conv_case_id)
def test_split_k_conv(case, mode, dtype, layout, split_k):
    run_conv_case(case, mode, dtype, layout, f"tiles/split {split_k}")


@pytest.mark.parametrize("split_k", SPLITS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n,k", [(1, 1000, 127), (3, 127, 1000), (127, 3, 1000), (130, 129, 301), (64, 64, 4096),
                                   (600, 16, 77), (12, 300, 50)])
def test_split_k_linear(m, n, k, dtype, split_k):
    for mode in MODES:  # (3, 127, 1000): the transposed small-batch path
        run_linear(make((m, k), dtype, "strided"), make((n, k), dtype), mode, dtype, f"linear split {split_k}")


@pytest.mark.parametrize("split_k", ["fit/auto/sat", "fit/3/sat"], indirect=True)
def test_split_k_nan_inf_and_determinism(split_k):
    x, w = make((2, 40, 9, 9), torch.float32), make((48, 40, 3, 3), torch.float32)
    x[0, 1, 2, 2] = float("nan")
    x[1, 0, 0, 0] = float("inf")
    w[5, 1, -1, -1] = float("inf")
    args = ([1, 1], [1, 1], [1, 1], 1)
    for mode in MODES:
        y = cuda_op("adder_conv2d")(x, w, *args, mode)
        yr = ref_op("adder_conv2d")(x.double(), w.double(), *args, mode)
        g = torch.randn(yr.shape, device=DEV)
        dx = cuda_op("adder_conv2d_grad_input")(g, x, w, *args, mode)
        dxr = ref_op("adder_conv2d_grad_input")(g.double(), x.double(), w.double(), *args, mode)
        for a, b in ((y, yr), (dx, dxr)):
            assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf()), mode
            fin = b.isfinite()
            torch.testing.assert_close(a.double()[fin], b[fin], rtol=1e-4, atol=1e-3)
        # bit for bit, NaN where NaN (torch.equal counts NaN as different from itself)
        same = dict(rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(y, cuda_op("adder_conv2d")(x, w, *args, mode), **same)
        torch.testing.assert_close(dx, cuda_op("adder_conv2d_grad_input")(g, x, w, *args, mode), **same)


def test_split_k_tiles_and_gin_settings_are_checked(monkeypatch):
    x, w = make((2, 8, 5, 5), torch.float32), make((4, 8, 3, 3), torch.float32)
    monkeypatch.setenv("SHIFTADD_CUDA_SPLIT_K", "many")
    with pytest.raises(RuntimeError, match="SHIFTADD_CUDA_SPLIT_K must be auto, off or a number"):
        cuda_op("adder_conv2d")(x, w, [1, 1], [1, 1], [1, 1], 1, "addernet")
    monkeypatch.setenv("SHIFTADD_CUDA_SPLIT_K", "off")
    monkeypatch.setenv("SHIFTADD_CUDA_TILES", "wide")
    with pytest.raises(RuntimeError, match="SHIFTADD_CUDA_TILES must be fit or classic"):
        cuda_op("adder_conv2d")(x, w, [1, 1], [1, 1], [1, 1], 1, "addernet")
    monkeypatch.setenv("SHIFTADD_CUDA_TILES", "fit")
    monkeypatch.setenv("SHIFTADD_CUDA_GIN", "fast")
    with pytest.raises(RuntimeError, match="SHIFTADD_CUDA_GIN must be sat or clamp"):
        cuda_op("adder_conv2d_grad_input")(torch.randn(2, 4, 5, 5, device=DEV), x, w, [1, 1], [1, 1], [1, 1], 1,
                                           "addernet")


# --------------------------------------------------------------------------------------
# empty sizes, special values, limits, determinism, streams
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("algo", ALGOS, indirect=True)
@pytest.mark.parametrize("mode", MODES)
def test_empty_batches_and_sizes(mode, algo):
    f32 = torch.float32
    for xs, ws in [((0, 4, 6, 6), (5, 4, 3, 3)), ((2, 4, 6, 6), (0, 4, 3, 3)), ((2, 0, 6, 6), (5, 0, 3, 3))]:
        x, w = make(xs, f32), make(ws, f32)
        args = ([1, 1], [1, 1], [1, 1], 1)
        y = cuda_op("adder_conv2d")(x, w, *args, mode)
        torch.testing.assert_close(y, ref_op("adder_conv2d")(x, w, *args, mode))
        g = torch.randn_like(y)
        for fam in ("adder_conv2d_grad_input", "adder_conv2d_grad_weight"):
            torch.testing.assert_close(cuda_op(fam)(g, x, w, *args, mode), ref_op(fam)(g, x, w, *args, mode))
    for xs, ws in [((0, 5), (3, 5)), ((4, 5), (0, 5)), ((4, 0), (3, 0))]:
        x, w = make(xs, f32), make(ws, f32)
        y = cuda_op("adder_linear")(x, w, mode)
        torch.testing.assert_close(y, ref_op("adder_linear")(x, w, mode))
        g = torch.randn_like(y)
        for fam in ("adder_linear_grad_input", "adder_linear_grad_weight"):
            torch.testing.assert_close(cuda_op(fam)(g, x, w, mode), ref_op(fam)(g, x, w, mode))


@pytest.mark.parametrize("algo", ALGOS, indirect=True)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", [
    ((2, 40, 9, 9), (48, 40, 3, 3), (1, 1), (1, 1), (1, 1), 1),   # every position reached
    ((2, 20, 9, 9), (24, 20, 1, 1), (3, 3), (0, 0), (1, 1), 1),   # positions no output reads
    ((2, 20, 10, 9), (24, 10, 3, 2), (2, 3), (2, 1), (2, 1), 2),  # borders and stride phases
], ids=["reached", "skipped", "phases"])
def test_nan_and_inf_like_the_reference(case, mode, algo):
    xs, ws, stride, padding, dilation, groups = case
    args = (list(stride), list(padding), list(dilation), groups)
    x, w = make(xs, torch.float32), make(ws, torch.float32)
    x[0, 1, 2, 2] = float("nan")
    x[0, 3, 1, 1] = float("nan")  # a position stride 3 skips
    x[1, 0, 0, 0] = float("inf")
    x[1, 5, 4, 4] = -float("inf")
    x[1, 1, 3, 3] = float("inf")  # meets the +inf weight below: inf - inf
    w[3, 2, 0, 0] = -float("inf")
    w[5, 1, -1, -1] = float("inf")
    w[7, 3, 0, -1] = float("nan")
    y = cuda_op("adder_conv2d")(x, w, *args, mode)
    yr = ref_op("adder_conv2d")(x.double(), w.double(), *args, mode)
    g = torch.randn(yr.shape, device=DEV)
    g[0, 1, 0, 0] = float("nan")
    outs = [(y, yr)]
    for fam in ("adder_conv2d_grad_input", "adder_conv2d_grad_weight"):
        outs.append((cuda_op(fam)(g, x, w, *args, mode), ref_op(fam)(g.double(), x.double(), w.double(), *args, mode)))
    for i, (a, b) in enumerate(outs):
        assert torch.equal(a.isnan(), b.isnan()), f"output {i}: NaN positions differ ({mode}, {algo})"
        if i == 2 and mode == "addernet":
            continue  # cuDNN's weight gradient (not these kernels): its Inf/NaN split may depend on the algorithm
        assert torch.equal(a.isinf(), b.isinf()), f"output {i}: Inf positions differ ({mode}, {algo})"
        fin = b.isfinite()
        torch.testing.assert_close(a.double()[fin], b[fin], rtol=1e-4, atol=1e-3)


def test_nan_in_x_at_a_position_no_output_reads_gives_zero_gradient():
    """The gather formulation must not multiply a missing term by zero (0 * NaN = NaN)."""
    x = make((1, 32, 7, 7), torch.float32)
    w = make((32, 32, 1, 1), torch.float32)
    x[0, :, 1, 1] = float("nan")  # stride 2 reads rows/columns 0, 2, 4, 6 only
    for a in ALGOS:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SHIFTADD_CUDA_ALGO", a)
            g = torch.randn(1, 32, 4, 4, device=DEV)
            dx = cuda_op("adder_conv2d_grad_input")(g, x, w, [2, 2], [0, 0], [1, 1], 1, "addernet")
            assert bool((dx[0, :, 1, 1] == 0).all()), a
            assert not dx.isnan().any(), a


def test_too_large_for_32_bit_indexing_raises_clearly():
    """Expanded (stride-0) tensors give huge sizes without memory: the op must raise a clear
    error naming the quantity, before allocating anything."""
    x = torch.zeros(1, 1, 1, 1, device=DEV).expand(2 ** 16, 1, 2 ** 8, 2 ** 8)  # N*H*W = 2^32
    w = torch.randn(1, 1, 1, 1, device=DEV)
    with pytest.raises(RuntimeError, match=r"N\*Ho\*Wo is 2\^31 - 1024 or more.*32-bit indexing"):
        cuda_op("adder_conv2d")(x, w, [1, 1], [0, 0], [1, 1], 1, "addernet")
    # few outputs, too many input positions: the gradient w.r.t. x is refused
    g = torch.randn(2 ** 16, 1, 1, 1, device=DEV)
    with pytest.raises(RuntimeError, match=r"N\*H\*W is 2\^31 - 1024 or more"):
        cuda_op("adder_conv2d_grad_input")(g, x, w, [256, 256], [0, 0], [1, 1], 1, "exact")
    xl = torch.zeros(1, 4, device=DEV).expand(2 ** 31, 4)
    with pytest.raises(RuntimeError, match="2\\^31 or more"):
        cuda_op("adder_linear")(xl, torch.randn(3, 4, device=DEV), "addernet")


@pytest.mark.parametrize("algo", ALGOS, indirect=True)
def test_exact_weight_gradient_is_deterministic(algo):
    x = make((8, 32, 12, 12), torch.float32)
    w = make((48, 32, 3, 3), torch.float32)
    g = make((8, 48, 12, 12), torch.float32)
    args = ([1, 1], [1, 1], [1, 1], 1, "exact")
    a = cuda_op("adder_conv2d_grad_weight")(g, x, w, *args)
    b = cuda_op("adder_conv2d_grad_weight")(g, x, w, *args)
    assert torch.equal(a, b)
    ga = cuda_op("adder_conv2d_grad_input")(g, x, w, *args)
    assert torch.equal(ga, cuda_op("adder_conv2d_grad_input")(g, x, w, *args))


def test_runs_on_the_current_stream_and_device():
    x, w = make((4, 16, 10, 10), torch.float32), make((32, 16, 3, 3), torch.float32)
    want = ref_op("adder_conv2d")(x.double(), w.double(), [1, 1], [1, 1], [1, 1], 1, "addernet")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        y = cuda_op("adder_conv2d")(x, w, [1, 1], [1, 1], [1, 1], 1, "addernet")
    torch.cuda.current_stream().wait_stream(s)
    check(y, want, torch.float32, "side stream")
    if torch.cuda.device_count() > 1:
        x1, w1 = x.to("cuda:1"), w.to("cuda:1")
        y1 = cuda_op("adder_conv2d")(x1, w1, [1, 1], [1, 1], [1, 1], 1, "addernet")
        assert y1.device == x1.device
        check(y1.to(DEV), want, torch.float32, "second device")


def test_float64_is_refused_with_a_reason():
    x, w = make((2, 3), torch.float64), make((4, 3), torch.float64)
    with pytest.raises(RuntimeError, match="computes in float32, float16 and bfloat16"):
        cuda_op("adder_linear")(x, w, "addernet")


# --------------------------------------------------------------------------------------
# quantizers: bit-exact, all four dtypes, vectorised and scalar paths
# --------------------------------------------------------------------------------------

QDTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SPECIALS = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-40, -1e-40, 2.0 ** -127, -(2.0 ** -127),
            2.0 ** -126, 2.0 ** -149, 1.0, -1.0, 0.5, 0.75, 2 ** -0.5, 2 ** -1.5, 3e38, -3e38, 65504.0, 1e-8, -2.5,
            -3.5, 2.5]


def same_bits(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert torch.equal(a.isnan(), b.isnan()), f"{what}: NaN positions differ"
    fa, fb = torch.nan_to_num(a), torch.nan_to_num(b)
    diff = fa != fb
    assert not diff.any(), f"{what}: {int(diff.sum())} differ, e.g. {a[diff][:4].tolist()} vs {b[diff][:4].tolist()}"
    zero = b == 0
    assert torch.equal(torch.signbit(a[zero]), torch.signbit(b[zero])), f"{what}: signs of zeros differ"


def with_specials(t):
    if t.numel() >= len(SPECIALS):
        t.view(-1)[: len(SPECIALS)] = torch.tensor(SPECIALS, device=t.device)
    return t


@pytest.mark.parametrize("dtype", QDTYPES, ids=str)
@pytest.mark.parametrize("n", [0, 1, 7, 300, 4099, (1 << 20) + 3])
def test_quantizers_bit_exact(dtype, n):
    for scale in (1e-3, 1.0, 10.0):
        w = with_specials(torch.randn(n, device=DEV) * scale).to(dtype)
        u = torch.rand(n, device=DEV).to(dtype)
        for bits in range(2, 9):
            same_bits(cuda_op("quantize_pot_q")(w, bits, None), ref_op("quantize_pot_q")(w, bits, None),
                      f"q {dtype} n={n} b={bits}")
            got, want = cuda_op("quantize_pot_q")(w, bits, u), ref_op("quantize_pot_q")(w, bits, u)
            # stochastic: log2 may differ by an ulp between libms at a rounding boundary
            assert int((torch.nan_to_num(got) != torch.nan_to_num(want)).sum()) <= max(1, n // 100)
            p = with_specials(torch.rand(n, device=DEV) * 20 - 17)
            p[: n // 5] = p[: n // 5].round() + 0.5  # exact ties
            s = torch.rand(n, device=DEV) * 2 - 1
            p, s = p.to(dtype), s.to(dtype)
            same_bits(cuda_op("quantize_pot_ps")(p, s, bits, None), ref_op("quantize_pot_ps")(p, s, bits, None),
                      f"ps {dtype} n={n} b={bits}")
            same_bits(cuda_op("quantize_pot_ps")(p, s, bits, u), ref_op("quantize_pot_ps")(p, s, bits, u),
                      f"ps stochastic {dtype} n={n} b={bits}")
    for ib, fb in itertools.product([1, 2, 5, 16, 24, 32, 53, 64], [0, 1, 4, 16, 23, 64]):
        x = with_specials(torch.randn(n, device=DEV) * 2.0 ** (min(ib, 30) - 1)).to(dtype)
        same_bits(cuda_op("round_to_fixed")(x, ib, fb), ref_op("round_to_fixed")(x, ib, fb),
                  f"round_to_fixed {dtype} n={n} ({ib}, {fb})")


@pytest.mark.parametrize("dtype", QDTYPES, ids=str)
def test_quantizers_unaligned_and_non_contiguous(dtype):
    base = with_specials(torch.randn(4001, device=DEV)).to(dtype)
    for view in (base[1:3998], base[3:], base[::3], base[:4000].view(40, 100).t()):
        same_bits(cuda_op("round_to_fixed")(view, 8, 8), ref_op("round_to_fixed")(view, 8, 8), f"rtf view {dtype}")
        same_bits(cuda_op("quantize_pot_q")(view, 5, None), ref_op("quantize_pot_q")(view, 5, None), f"q view {dtype}")
        out = cuda_op("quantize_pot_ps")(view, view.flip(0), 4, None)
        same_bits(out, ref_op("quantize_pot_ps")(view, view.flip(0), 4, None), f"ps view {dtype}")
        assert out.is_contiguous()


@pytest.mark.parametrize("out_dtype", QDTYPES, ids=str)
@pytest.mark.parametrize("dtype", QDTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 7, 4099, (1 << 20) + 3])
def test_quantizers_to_out_dtype_bit_exact(dtype, out_dtype, n):
    """The fused quantize-and-decode (out_dtype) over every input/output dtype pair, the
    special values, and a view whose offset breaks the vector path's alignment."""
    w = with_specials(torch.randn(n + 1, device=DEV) * 0.3).to(dtype)
    p = with_specials(torch.rand(n + 1, device=DEV) * 20 - 17).to(dtype)
    s = (torch.rand(n + 1, device=DEV) * 2 - 1).to(dtype)
    for sl in (slice(0, n), slice(1, n + 1)):
        for bits in (2, 5, 8):
            same_bits(cuda_op("quantize_pot_q")(w[sl], bits, None, out_dtype),
                      ref_op("quantize_pot_q")(w[sl], bits, None, out_dtype), f"q {dtype}->{out_dtype} b={bits}")
            same_bits(cuda_op("quantize_pot_ps")(p[sl], s[sl], bits, None, out_dtype),
                      ref_op("quantize_pot_ps")(p[sl], s[sl], bits, None, out_dtype), f"ps {dtype}->{out_dtype} b={bits}")


_BAD_QUANTIZER_CALLS = """
import torch, shiftadd
w = torch.randn(5, device="cuda")
calls = [("quantize_pot_q", (w, 9, None), "weight_bits must be in"),
         ("quantize_pot_q", (w, 5, torch.rand(4, device="cuda")), "noise must have the shape"),
         ("round_to_fixed", (w, 0, 4), "int_bits must be in")]
for name, args, match in calls:
    try:
        getattr(torch.ops.shiftadd, name)(*args)
    except RuntimeError as e:
        assert match in str(e), (name, str(e))
    else:
        raise AssertionError(name + " accepted bad arguments")
print("ok")
"""


def test_quantizers_reject_bad_arguments():
    # In a child process: on the H100 (torch 2.11) the first of these calls crashed the
    # process with a segmentation fault instead of raising; a crash must fail this test,
    # not take the test run down with it.
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", _BAD_QUANTIZER_CALLS], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), \
        f"exit status {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"


# --------------------------------------------------------------------------------------
# packed power-of-two linear: the GEMV kernel (4-bit codes, K % 8 == 0, batch <= 16) and
# the decode + cuBLAS path (everything else)
# --------------------------------------------------------------------------------------

PACKED_CASES = [  # (O, K, code bits, exponent span, top exponent, fraction of zeros)
    (7, 8, 4, 7, 0, 0), (37, 1000, 4, 6, -3, 0.1), (129, 264, 4, 7, 2, 0), (16, 1001, 4, 6, 0, 0.1),
    (11, 67, 8, 100, 0, 0.1), (5, 24, 16, 300, 40, 0.1), (3, 40, 4, 6, -100, 0.1), (300, 4104, 4, 6, 0, 0.1),
]


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 16, 17, 64])
@pytest.mark.parametrize("case", PACKED_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_packed_linear_matches_dense(backend, case, n, dtype):
    """Both GPU backends (this file is otherwise about the cuda one): the Triton kernel's
    split-K GEMV and tiled paths as well."""
    reason = _dispatch.why_not(backend, "shift_linear_packed", torch.device(DEV), dtype)
    if reason is not None:
        pytest.skip(reason)

    o, k, bits, span, top, zeros = case
    gen = torch.Generator().manual_seed(o * 1000 + k + n)
    w = random_pot(o, k, gen, span, top, zeros, dtype=torch.float64 if bits == 16 else torch.float32)
    p = pack_pot(w, code_bits=bits).to(DEV)
    x = torch.randn(n, k, generator=gen).to(DEV, dtype)
    bias = torch.randn(o, generator=gen).to(DEV, dtype)
    for b in (bias, None):
        y = _ops.op(backend, "shift_linear_packed")(x, *args_of(p), b)
        want = F.linear(x.double(), w.to(DEV).float().double(), None if b is None else b.double())
        assert y.dtype == dtype and y.shape == (n, o) and y.device.type == "cuda"
        # beyond float16's range, or all below its normal range (relative error is meaningless)
        if n and not (dtype == torch.float16 and not 2.0 ** -14 <= want.abs().max() <= 6e4):
            assert rel_err(y, want) <= RTOL[dtype], (case, n, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_packed_linear_strided_x_and_unaligned_codes(dtype):
    gen = torch.Generator().manual_seed(5)
    w = random_pot(40, 96, gen, 6, 0, 0.1)
    p = pack_pot(w, code_bits=4).to(DEV)
    base = torch.randn(6, 200, generator=gen).to(DEV, dtype)
    for x in (base[:, 3:99], base[:, 8:104]):  # row stride 200; the first not 16-byte aligned
        want = F.linear(x.double(), w.to(DEV).double())
        assert rel_err(cuda_op("shift_linear_packed")(x, *args_of(p), None), want) <= RTOL[dtype]
    # codes at an odd address: the decode + cuBLAS path
    store = torch.zeros(p.codes.numel() + 1, dtype=torch.uint8, device=DEV)
    codes = store[1:].view(p.codes.shape)
    codes.copy_(p.codes)
    y = cuda_op("shift_linear_packed")(x, codes, p.scales, p.zero_codes, p.bits, p.out_features, p.in_features, None)
    assert rel_err(y, want) <= RTOL[dtype]


@pytest.mark.parametrize("shift", [130, -150])
def test_packed_linear_weights_beyond_float32_like_the_reference(shift):
    """Channel exponents that put decoded weights past float32's range: inf or 0 weights,
    as the reference decodes, on the GEMV path (n <= 16) and the decode path (n = 17)."""
    gen = torch.Generator().manual_seed(9)
    p = pack_pot(random_pot(24, 64, gen, 6, 0, 0.1), code_bits=4).to(DEV)
    p.scales = p.scales + shift
    for n in (16, 17):
        x = torch.randn(n, 64, generator=gen).to(DEV)
        y = cuda_op("shift_linear_packed")(x, *args_of(p), None)
        torch.testing.assert_close(y, ref_op("shift_linear_packed")(x, *args_of(p), None), equal_nan=True)


# --------------------------------------------------------------------------------------
# every Triton launch configuration (the suite itself runs only the first of each list)
# --------------------------------------------------------------------------------------

_TRITON_CONFIG_CHECK = """
import torch, shiftadd
from shiftadd import _ops
from shiftadd.packed import pack_pot

def check(name, got, want, tol):
    err = ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()
    assert err <= tol, f"{name}: relative error {err:.3g} > {tol}"

t, r = (lambda f: _ops.op("triton", f)), (lambda f: _ops.op("reference", f))
torch.manual_seed(0)
for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
    x, w = torch.randn(130, 70, device="cuda", dtype=dtype), torch.randn(45, 70, device="cuda", dtype=dtype)
    g = torch.randn(130, 45, device="cuda", dtype=dtype)
    check("linear", t("adder_linear")(x, w, "addernet"), r("adder_linear")(x, w, "addernet"), tol)
    for mode in ("addernet", "exact"):
        for fam in ("adder_linear_grad_input", "adder_linear_grad_weight"):
            check(fam + " " + mode, t(fam)(g, x, w, mode), r(fam)(g, x, w, mode), tol)
    xc, wc = torch.randn(3, 8, 11, 13, device="cuda", dtype=dtype), torch.randn(12, 4, 3, 3, device="cuda", dtype=dtype)
    args = ([2, 1], [1, 2], [1, 2], 2)
    y = r("adder_conv2d")(xc, wc, *args, "addernet")
    check("conv", t("adder_conv2d")(xc, wc, *args, "addernet"), y, tol)
    gc = torch.randn_like(y)
    for mode in ("addernet", "exact"):
        for fam in ("adder_conv2d_grad_input", "adder_conv2d_grad_weight"):
            check(fam + " " + mode, t(fam)(gc, xc, wc, *args, mode), r(fam)(gc, xc, wc, *args, mode), tol)
    e = torch.randint(-6, 1, (100, 1048), device="cuda").double()
    wp = (torch.exp2(e) * torch.where(torch.rand(100, 1048, device="cuda") < 0.5, -1.0, 1.0)).float()
    for bits in (4, 8):
        p = pack_pot(wp, code_bits=bits)
        a = (p.codes, p.scales, p.zero_codes, p.bits, p.out_features, p.in_features)
        for n in (3, 20):
            xp = torch.randn(n, 1048, device="cuda", dtype=dtype)
            check(f"packed {bits}-bit n={n}", t("shift_linear_packed")(xp, *a, None), r("shift_linear_packed")(xp, *a, None), tol)
print("ok")
"""


@pytest.mark.parametrize("index", range(8))
def test_every_triton_launch_config(index):
    import os
    import subprocess
    import sys

    reason = _dispatch.why_not("triton", "adder_linear", torch.device(DEV), torch.float32)
    if reason is not None:
        pytest.skip(reason)
    env = dict(os.environ, SHIFTADD_TRITON_CONFIG=str(index))
    r = subprocess.run([sys.executable, "-c", _TRITON_CONFIG_CHECK], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), f"config {index}:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
