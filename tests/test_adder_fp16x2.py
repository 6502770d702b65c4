"""The adder forward in fp16x2 arithmetic (adder_linear_fp16x2 / adder_conv2d_fp16x2,
``accumulate="fp16x2"``): float16 partial sums of 16 columns added in float32.

The reference reproduces the CUDA kernel's sums bit for bit; it is checked here against
an independent numpy float16 loop and against float64 (float16-level error), and the
CUDA kernel against it on the GPU (bit for bit, every kernel path, layouts and conv
parameters).  Dispatch: where no fp16x2 kernel runs, the float32-accumulating op runs.
"""

import itertools

import numpy as np
import pytest
import torch
from conftest import DEVICES, op

import shiftadd
from shiftadd import _dispatch
from shiftadd import functional as SF
from shiftadd import nn as snn
from shiftadd.reference.adder import FP16X2_CHUNK

LIN, CONV = "adder_linear_fp16x2", "adder_conv2d_fp16x2"


def numpy_fp16x2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The documented summation, one scalar at a time in numpy float16 / float32."""
    R, K = a.shape
    O = b.shape[0]
    out = np.zeros((R, O), dtype=np.float16)
    for r, o in itertools.product(range(R), range(O)):
        acc = np.float32(0)
        for c0 in range(0, K, FP16X2_CHUNK):
            h = np.float16(0)
            for k in range(c0, min(c0 + FP16X2_CHUNK, K)):
                h = np.float16(h + np.abs(np.float16(a[r, k] - b[o, k])))
            acc = np.float32(acc + np.float32(h))
        out[r, o] = np.float16(-acc)
    return out


def halves(*shape, scale=1.0, device="cpu"):
    return (torch.randn(*shape, device=device) * scale).half()


@pytest.mark.parametrize("n,k,o", [(1, 1, 1), (3, 15, 2), (2, 16, 3), (4, 17, 5), (2, 47, 3)])
def test_reference_sums_as_documented(n, k, o):
    x, w = halves(n, k, scale=3), halves(o, k, scale=3)
    want = torch.from_numpy(numpy_fp16x2(x.numpy(), w.numpy()))
    assert torch.equal(op("reference", LIN)(x, w, "addernet"), want)


# worst-case relative error: the float16 rounding of each |a - b|, of each of the chunk's
# partial sums and of the output, u = 2^-11 each
BOUND = (FP16X2_CHUNK + 1) * 2.0 ** -11


@pytest.mark.parametrize("k", [1, 16, 17, 127, 1000, 4096])
def test_reference_error_is_float16_level(k):
    """Against float64: inside the worst-case bound; for long sums the mean error is that
    of rounding the exact result to float16 (the float32-accumulating kernels' error).
    Measured (64 x 48 outputs, randn): max / mean 1.9e-3 / 4.2e-4 at K = 16 (rounding
    alone 4.8e-4 / 1.8e-4), 6.1e-4 / 2.3e-4 at K = 1000 (4.7e-4 / 2.2e-4)."""
    torch.manual_seed(k)
    x, w = halves(64, k), halves(48, k)
    exact = op("reference", "adder_linear")(x.double(), w.double(), "addernet")
    got = op("reference", LIN)(x, w, "addernet").double()
    nz = exact != 0
    rel = ((got - exact).abs() / exact.abs())[nz]
    rounded = ((exact.half().double() - exact).abs() / exact.abs())[nz]
    assert rel.max() <= BOUND, f"max relative error {rel.max():.3g}"
    if k >= 1000:
        assert rel.mean() <= 1.1 * rounded.mean(), f"mean {rel.mean():.3g} vs float16 rounding {rounded.mean():.3g}"


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("case", [
    ((2, 3, 7, 9), (16, 3, 3, 3), (1, 1), (1, 1), (1, 1), 1),
    ((2, 8, 6, 5), (12, 4, 3, 3), (1, 2), (2, 1), (2, 1), 2),
    ((1, 4, 9, 7), (40, 1, 5, 5), (2, 2), (2, 2), (1, 1), 4),
], ids=str)
def test_reference_conv_matches_float64(case, channels_last):
    xs, ws, stride, padding, dilation, groups = case
    torch.manual_seed(0)
    x, w = halves(*xs, scale=2), halves(*ws, scale=2)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    args = (list(stride), list(padding), list(dilation), groups, "addernet")
    got = op("reference", CONV)(x, w, *args)
    exact = op("reference", "adder_conv2d")(x.double(), w.double(), *args)
    assert got.dtype == torch.float16 and got.shape == exact.shape
    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last
    torch.testing.assert_close(got.double(), exact, rtol=BOUND, atol=0)


def test_reference_channels_last_sums_in_tap_major_order():
    """Channels-last x sums its columns as (i, j, c), as the kernel reads them: the same
    as an NCHW call on the permuted problem (a 1x1-spatial x viewed through a 3x1 kernel)."""
    torch.manual_seed(1)
    x = halves(2, 20, 3, 1, scale=4)
    w = halves(9, 20, 3, 1, scale=4)
    xcl = x.contiguous(memory_format=torch.channels_last)
    args = ([1, 1], [0, 0], [1, 1], 1, "addernet")
    got = op("reference", CONV)(xcl, w, *args)
    cols = x.permute(0, 2, 3, 1).reshape(2, 60)        # (i, j, c) order
    wcols = w.permute(0, 2, 3, 1).reshape(9, 60)
    want = torch.from_numpy(numpy_fp16x2(cols.numpy(), wcols.numpy())).view(2, 1, 1, 9).permute(0, 3, 1, 2)
    assert torch.equal(got.contiguous(), want.contiguous())


def test_refuses_other_dtypes_and_handles_empty_sums():
    x, w = torch.randn(2, 5), torch.randn(3, 5)
    with pytest.raises(TypeError, match="must be float16"):
        op("reference", LIN)(x, w, "addernet")
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), pytest.raises(RuntimeError, match="must be float16"):  # the fake kernel
        op("reference", LIN)(torch.empty(2, 5), torch.empty(3, 5), "addernet")
    y = op("reference", LIN)(halves(4, 0), halves(3, 0), "addernet")
    assert torch.equal(y, torch.zeros(4, 3, dtype=torch.float16)) and not y.signbit().any()
    y = op("reference", CONV)(halves(2, 0, 4, 4), halves(3, 0, 3, 3), [1, 1], [1, 1], [1, 1], 1, "addernet")
    assert y.shape == (2, 3, 4, 4) and not y.any() and not y.signbit().any()


@pytest.mark.parametrize("device", DEVICES)
def test_dispatch_falls_back_to_float32_sums(device):
    x16 = halves(4, 8, device=device)
    assert _dispatch.adder_forward_op("adder_linear", x16.float(), "fp16x2") == _dispatch.get_op("adder_linear", x16.float())
    with shiftadd.use_backend("reference"):
        assert _dispatch.adder_forward_op("adder_linear", x16, "fp16x2") == op("reference", LIN)
        assert _dispatch.adder_forward_op("adder_conv2d", x16, "fp16x2") == op("reference", CONV)
        assert _dispatch.adder_forward_op("adder_linear", x16, "fp32") == op("reference", "adder_linear")
    if device == "cpu" and _dispatch.why_not("cpu", "adder_linear", torch.device("cpu"), torch.float16) is None:
        # the cpu backend has no fp16x2 kernel: its float32-accumulating op runs
        assert _dispatch.adder_forward_op("adder_linear", x16, "fp16x2") == op("cpu", "adder_linear")
    with pytest.raises(ValueError, match="accumulate must be one of"):
        SF.adder_linear(x16, halves(3, 8, device=device), accumulate="fp8")
    with pytest.raises(ValueError, match="accumulate must be one of"):
        snn.AdderConv2d(3, 4, 3, accumulate="half")


def test_gradients_are_those_of_the_float32_op():
    torch.manual_seed(2)
    x, w = halves(6, 37, scale=0.5), halves(20, 37, scale=0.5)
    for mode in ("addernet", "exact"):
        grads = []
        for family in (LIN, "adder_linear"):
            xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
            y = op("reference", family)(xr, wr, mode)
            y.backward(torch.ones_like(y))
            grads.append((xr.grad, wr.grad))
        assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_modules_and_autocast():
    lin = snn.AdderLinear(16, 24, accumulate="fp16x2")
    conv = snn.AdderConv2d(4, 16, 3, padding=1, accumulate="fp16x2")
    assert "accumulate=fp16x2" in repr(lin) and "accumulate" not in repr(snn.AdderLinear(16, 24))
    x = torch.randn(3, 16)
    xc = torch.randn(2, 4, 5, 5).half()
    with shiftadd.use_backend("reference"):  # the modules pass accumulate on: the fp16x2 sums, bit for bit
        lin.half()
        assert torch.equal(lin(x.half()), op("reference", LIN)(x.half(), lin.weight.detach(), "addernet"))
        conv.half()
        y = conv(xc)
        assert torch.equal(y, op("reference", CONV)(xc, conv.weight.detach(), [1, 1], [1, 1], [1, 1], 1, "addernet"))
        y.sum().backward()
        assert conv.weight.grad is not None and conv.weight.grad.dtype == torch.float16
    lin.float()
    # autocast: fp16x2 layers compute in float16 under float16 autocast, others in float32
    with torch.autocast("cpu", dtype=torch.float16):
        assert lin(x).dtype == torch.float16
        assert snn.AdderLinear(16, 24)(x).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lin(x).dtype == torch.float32


@pytest.mark.parametrize("family", [LIN, CONV])
def test_opcheck_reference(family):
    if family == LIN:
        args = (halves(5, 7).requires_grad_(), halves(3, 7).requires_grad_())
    else:
        args = (halves(2, 4, 6, 5).requires_grad_(), halves(6, 2, 3, 2).requires_grad_(), [2, 1], [1, 1], [1, 2], 2)
    torch.library.opcheck(op("reference", family), (*args, "addernet"),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))


# --------------------------------------------------------------------------------------
# the CUDA kernel (GPU only): bit for bit the reference
# --------------------------------------------------------------------------------------

def _cuda_reason():
    if not torch.cuda.is_available():
        return "no CUDA device"
    return _dispatch.why_not("cuda", LIN, torch.device("cuda"), torch.float16)


_CUDA_REASON = _cuda_reason()
needs_cuda = pytest.mark.skipif(_CUDA_REASON is not None, reason=f"cuda backend: {_CUDA_REASON}")

LINEAR_CASES = [(1, 1, 9), (3, 127, 40), (5, 33, 300), (70, 100, 65), (40, 300, 17), (130, 17, 129), (2, 1000, 64),
                (33, 64, 12), (7, 50, 5), (300, 1001, 257)]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("n,k,o", LINEAR_CASES)
def test_cuda_linear_bit_exact(n, k, o, strided):
    torch.manual_seed(n * 1000 + k)
    x = halves(n, 2 * k if strided else k, scale=2, device="cuda")
    x = x[:, ::2] if strided else x  # the view on the GPU: the kernel reads the strides
    w = halves(o, k, scale=2, device="cuda")
    got = op("cuda", LIN)(x, w, "addernet")
    assert torch.equal(got.cpu(), op("reference", LIN)(x.cpu(), w.cpu(), "addernet"))


CONV_CASES = [(2, 3, 7, 9, 16, 3, 1, 1, 1, 1), (1, 16, 8, 8, 32, 3, 2, 1, 1, 1), (2, 8, 6, 5, 48, 3, 1, 2, 2, 2),
              (3, 6, 5, 5, 18, 1, 1, 0, 1, 1), (1, 4, 9, 7, 40, 5, 2, 2, 1, 4), (2, 32, 4, 4, 33, 3, 1, 1, 1, 1),
              (1, 5, 1, 1, 20, 3, 1, 1, 1, 1), (4, 16, 32, 32, 16, 3, 1, 1, 1, 1), (2, 64, 8, 8, 64, 3, 1, 1, 1, 1),
              (2, 12, 5, 6, 6, 3, 1, 1, 1, 3)]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_cuda_conv_bit_exact(case, channels_last):
    n, c, h, w_, o, k, s, p, d, g = case
    torch.manual_seed(sum(case))
    x, w = halves(n, c, h, w_, scale=2), halves(o, c // g, k, k, scale=2)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    args = ([s, s], [p, p], [d, d], g, "addernet")
    got = op("cuda", CONV)(x.cuda(), w.cuda(), *args)
    want = op("reference", CONV)(x, w, *args)
    assert got.is_contiguous(memory_format=torch.channels_last) == want.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got.cpu(), want)


@pytest.mark.gpu
@needs_cuda
def test_cuda_empty_sizes_gradients_and_opcheck():
    dev = "cuda"
    assert op("cuda", LIN)(halves(0, 5, device=dev), halves(3, 5, device=dev), "addernet").shape == (0, 3)
    y = op("cuda", LIN)(halves(4, 0, device=dev), halves(3, 0, device=dev), "addernet")
    assert torch.equal(y, torch.zeros(4, 3, dtype=torch.float16, device=dev))
    with pytest.raises(RuntimeError, match="must be float16"):
        op("cuda", LIN)(torch.randn(2, 5, device=dev), torch.randn(3, 5, device=dev), "addernet")
    x, w = halves(6, 37, device=dev).requires_grad_(), halves(20, 37, device=dev).requires_grad_()
    op("cuda", LIN)(x, w, "exact").sum().backward()
    gx, gw = x.grad, w.grad
    x.grad = w.grad = None
    op("cuda", "adder_linear")(x, w, "exact").sum().backward()
    assert torch.equal(gx, x.grad) and torch.equal(gw, w.grad)
    for family, args in ((LIN, (halves(5, 7, device=dev), halves(3, 7, device=dev))),
                         (CONV, (halves(2, 4, 6, 5, device=dev), halves(6, 2, 3, 2, device=dev), [2, 1], [1, 1],
                                 [1, 2], 2))):
        torch.library.opcheck(op("cuda", family), (args[0].requires_grad_(), args[1].requires_grad_(), *args[2:],
                                                   "addernet"))
