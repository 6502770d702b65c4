"""The quantized adder inference path: adder_linear_int8 (exact integers) and AdderLinearInt8."""

import pytest
import torch
from conftest import cpu_isas, op
from hypothesis import given
from hypothesis import strategies as st

import shiftadd
from shiftadd import _dispatch
from shiftadd.nn import AdderLinear, AdderLinearInt8
from shiftadd.reference.adder import ADDER_INT8_MAX_K

FAMILY = "adder_linear_int8"


def by_hand(x, w):
    """-sum |x - w| in Python integers."""
    return torch.tensor([[-sum(abs(int(a) - int(b)) for a, b in zip(xr.tolist(), wr.tolist())) for wr in w] for xr in x],
                        dtype=torch.int64).reshape(x.shape[0], w.shape[0])


def randint8(*shape, device="cpu"):
    return torch.randint(-128, 128, shape, dtype=torch.int8, device=device)


def backends(device):
    dev = torch.device(device)
    out = [b for b in ("cuda", "cpu") if _dispatch.why_not(b, FAMILY, dev, torch.float32) is None]
    return out + ["reference"]


def test_reference_by_hand_and_extremes():
    x, w = randint8(3, 7), randint8(5, 7)
    torch.testing.assert_close(op("reference", FAMILY)(x, w).long(), by_hand(x, w), rtol=0, atol=0)
    lo = torch.full((2, 1000), -128, dtype=torch.int8)
    hi = torch.full((3, 1000), 127, dtype=torch.int8)
    assert op("reference", FAMILY)(lo, hi).eq(-255 * 1000).all()


@pytest.mark.parametrize("n,k,o", [(1, 1, 1), (3, 127, 5), (1, 1000, 3), (127, 3, 1), (70, 33, 65), (5, 4, 130),
                                   (0, 5, 3), (4, 0, 3), (4, 5, 0)])
def test_every_backend_exact(device, n, k, o):
    x, w = randint8(n, k, device=device), randint8(o, k, device=device)
    want = by_hand(x.cpu(), w.cpu()).to(torch.int32)
    for b in backends(device):
        got = op(b, FAMILY)(x, w)
        assert got.dtype == torch.int32 and got.device.type == torch.device(device).type, b
        torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0, msg=f"{b} n={n} k={k} o={o}")


@pytest.mark.parametrize("isa", cpu_isas() or ["generic"])
@given(n=st.integers(1, 40), k=st.integers(1, 300), o=st.integers(1, 40))
def test_cpu_every_instruction_set_matches_the_reference(isa, n, k, o):
    if _dispatch.why_not("cpu", FAMILY, torch.device("cpu"), torch.float32) is not None:
        pytest.skip("no compiled cpu backend")
    x, w = randint8(n, k), randint8(o, k)
    old = _dispatch._C.cpu_isa()
    _dispatch._C.set_cpu_isa(isa)
    try:
        got = op("cpu", FAMILY)(x, w)
    finally:
        _dispatch._C.set_cpu_isa(old)
    torch.testing.assert_close(got, op("reference", FAMILY)(x, w), rtol=0, atol=0)


def test_non_contiguous_and_offset_inputs(device):
    base = randint8(70, 132, device=device)
    w = randint8(9, 64, device=device)
    # offsets and row strides that allow (4, 68; stride 132) or forbid (1, 65) 32-bit loads
    for x in (base[:, 1:65], base[:, 4:68], base[3:20, ::2][:, :64], base[:64, :64].t()):
        want = by_hand(x.cpu(), w.cpu()).to(torch.int32)
        for b in backends(device):
            torch.testing.assert_close(op(b, FAMILY)(x, w).cpu(), want, rtol=0, atol=0, msg=b)


def test_functional_leading_dims_and_dispatch(device):
    x, w = randint8(2, 3, 50, device=device), randint8(7, 50, device=device)
    y = shiftadd.adder_linear_int8(x, w)
    assert y.shape == (2, 3, 7) and y.dtype == torch.int32
    torch.testing.assert_close(y.reshape(6, 7).cpu(), by_hand(x.reshape(6, 50).cpu(), w.cpu()).int(), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_opcheck(backend):
    if _dispatch.why_not(backend, FAMILY, torch.device("cpu"), torch.float32) is not None:
        pytest.skip(backend)
    torch.library.opcheck(op(backend, FAMILY), (randint8(4, 37), randint8(5, 37)),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))


def test_bad_arguments_name_the_argument():
    x, w = randint8(4, 8), randint8(3, 8)
    with pytest.raises(TypeError, match="x must be an int8"):
        shiftadd.adder_linear_int8(x.float(), w)
    with pytest.raises(TypeError, match="weight must be an int8"):
        shiftadd.adder_linear_int8(x, w.int())
    with pytest.raises(ValueError, match=r"x must be \(\.\.\., 8\)"):
        shiftadd.adder_linear_int8(randint8(4, 9), w)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        shiftadd.adder_linear_int8(x, randint8(3, 8, 1))
    for b in ("cpu", "reference"):
        if _dispatch.why_not(b, FAMILY, torch.device("cpu"), torch.float32) is not None:
            continue
        with pytest.raises(RuntimeError, match="x must be int8"):
            op(b, FAMILY)(x.short(), w)
        with pytest.raises(RuntimeError, match="features"):
            op(b, FAMILY)(x, randint8(3, 9))
    # past the K where the int32 sum could overflow: a clear error, checked before any work
    big = torch.empty((1, ADDER_INT8_MAX_K + 1), dtype=torch.int8, device="meta")
    with pytest.raises(RuntimeError, match="could overflow"):
        op("reference", FAMILY)(big, big)


def test_adder_linear_int8_module_tracks_the_float_layer():
    torch.manual_seed(0)
    layer = AdderLinear(256, 64, bias=True)
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(32, 256)
    q = AdderLinearInt8.from_float(layer, act_absmax=float(x.abs().max()))
    with torch.no_grad():
        want, got = layer(x), q(x)
    # each |x - w| moves by at most one step s (two roundings of s/2): |error| <= s K per output
    assert (got - want).abs().max() <= q.scale * 256
    assert ((got - want).norm() / want.norm()).item() < 2e-3
    assert q.weight_q.dtype == torch.int8 and q.weight_q.element_size() * q.weight_q.numel() == 64 * 256
    sd = q.state_dict()
    assert set(sd) == {"weight_q", "bias", "_extra_state"}
    other = AdderLinearInt8.from_float(layer, act_absmax=1000.0)  # another calibration
    other.load_state_dict(sd)
    assert other.scale == q.scale
    torch.testing.assert_close(other(x), got, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_adder_int8_modules_in_other_float_dtypes(dtype):
    """Large sums (K = 4096: |y| far past float16's 65504) come back finite and rounded once."""
    from shiftadd.nn import AdderConv2d, AdderConv2dInt8

    torch.manual_seed(0)
    layer = AdderLinear(4096, 4)
    x = torch.randn(3, 4096)
    q = AdderLinearInt8.from_float(layer, act_absmax=float(x.abs().max()))
    with torch.no_grad():
        want = q(x).double()
        got = q(x.to(dtype))
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert ((got.double() - want).norm() / want.norm()).item() < {torch.float64: 1e-7}.get(dtype, 1e-2)
    conv = AdderConv2d(64, 4, 3, padding=1)
    xc = torch.randn(1, 64, 5, 5)
    qc = AdderConv2dInt8.from_float(conv, float(xc.abs().max()))
    with torch.no_grad():
        yc = qc(xc.to(dtype))
    assert yc.dtype == dtype and torch.isfinite(yc).all()


def test_adder_linear_int8_module_bad_arguments():
    with pytest.raises(TypeError, match="AdderLinear"):
        AdderLinearInt8.from_float(torch.nn.Linear(3, 2), 1.0)
    with pytest.raises(ValueError, match="act_absmax"):
        AdderLinearInt8.from_float(AdderLinear(3, 2), float("nan"))
    q = AdderLinearInt8.from_float(AdderLinear(3, 2), 1.0)
    with pytest.raises(TypeError, match="floating point"):
        q(torch.ones(1, 3, dtype=torch.int64))


def _int8_conv_by_hand(layer_q, x):
    """The int8 conv from its definition: quantize the padded input, then the float64
    adder conv of the integer tensors (exact: integers below 2^53), times the scale."""
    from shiftadd.nn.adder import quantize_int8

    mode = "constant" if layer_q.padding_mode == "zeros" else layer_q.padding_mode
    xq = quantize_int8(torch.nn.functional.pad(x, layer_q._reversed_padding_repeated_twice, mode=mode), layer_q.scale,
                       layer_q.bits)
    y = op("reference", "adder_conv2d")(xq.double(), layer_q.weight_q.double(), list(layer_q.stride), [0, 0],
                                        list(layer_q.dilation), layer_q.groups, "addernet")
    return y * layer_q.scale


@pytest.mark.parametrize("kw", [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, padding=1),
                                dict(kernel_size=(3, 1), dilation=2, padding=(2, 0)), dict(kernel_size=3, groups=2),
                                dict(kernel_size=3, padding="same", padding_mode="reflect"), dict(kernel_size=1)])
def test_adder_conv2d_int8_is_the_integer_conv_and_tracks_the_float_layer(kw, device):
    from shiftadd.nn import AdderConv2d, AdderConv2dInt8

    torch.manual_seed(0)
    layer = AdderConv2d(4, 6, **kw).to(device)
    x = torch.randn(2, 4, 9, 7, device=device)
    q = AdderConv2dInt8.from_float(layer, act_absmax=float(x.abs().max()))
    with torch.no_grad():
        got, want = q(x), layer(x)
    assert got.shape == want.shape and got.dtype == x.dtype
    # exactly the integer conv of the quantized operands
    torch.testing.assert_close(got.double(), _int8_conv_by_hand(q, x), rtol=1e-6, atol=0)
    k = layer.weight[0].numel()
    assert (got - want).abs().max() <= q.scale * k
    assert ((got - want).norm() / want.norm()).item() < 1e-2
    torch.testing.assert_close(q(x[0]), got[0])  # unbatched input


def small_adder_net(batch: int):
    """(model in eval mode, an input batch, the float model's output on it): a conv stem, an
    adder conv with BatchNorm, and an adder classifier, on 6x6 single-channel images."""
    from shiftadd.nn import AdderConv2d

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), AdderConv2d(4, 8, 3, padding=1),
                                torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.Flatten(), AdderLinear(8 * 36, 10))
    model.eval()
    x = torch.randn(batch, 1, 6, 6)
    with torch.no_grad():
        return model, x, model(x)


def test_quantize_adders_int8_replaces_every_adder_layer():
    from shiftadd.nn import AdderConv2dInt8, quantize_adders_int8

    model, x, want = small_adder_net(16)
    quantize_adders_int8(model, [x[:8], (x[8:], None)])
    assert isinstance(model[1], AdderConv2dInt8) and isinstance(model[5], AdderLinearInt8)
    with torch.no_grad():
        got = model(x)
    assert (got.argmax(1) == want.argmax(1)).float().mean() >= 0.9
    assert ((got - want).norm() / want.norm()).item() < 5e-2
    with pytest.raises(ValueError, match="no batch"):
        quantize_adders_int8(torch.nn.Sequential(AdderLinear(3, 2)), [])
    single = quantize_adders_int8(AdderLinear(3, 2), [torch.randn(4, 3)])
    assert isinstance(single, AdderLinearInt8)


def test_quantize_adders_int8_replaces_every_use_of_a_shared_layer():
    from torch import nn

    from shiftadd.nn import quantize_adders_int8

    torch.manual_seed(0)
    a = AdderLinear(8, 8)
    one = nn.Sequential(a, nn.BatchNorm1d(8), a, nn.BatchNorm1d(8))  # used twice in one parent
    two = nn.Sequential(nn.Sequential(a, nn.BatchNorm1d(8)), nn.Sequential(a, nn.BatchNorm1d(8)))
    for model, first, second in ((one, lambda m: m[0], lambda m: m[2]), (two, lambda m: m[0][0], lambda m: m[1][0])):
        q = quantize_adders_int8(model, [torch.randn(16, 8)])
        assert isinstance(first(q), AdderLinearInt8) and first(q) is second(q)


def test_int8_modules_run_from_inference_mode_and_compile():
    """Inference tensors have no version counter and torch.compile cannot guard on one: the
    weight-row cache is skipped there, never an error."""
    from shiftadd.nn import AdderConv2d, AdderConv2dInt8, quantize_adders_int8

    torch.manual_seed(0)
    x = torch.randn(3, 8)
    with torch.inference_mode():
        m = AdderLinearInt8.from_float(AdderLinear(8, 4), 3.0)
        y = m(x)
        q = quantize_adders_int8(torch.nn.Sequential(AdderLinear(8, 8), torch.nn.BatchNorm1d(8)), [torch.randn(4, 8)])
        q(x)
    torch.testing.assert_close(m(x), y)  # and outside the block
    conv = AdderConv2dInt8.from_float(AdderConv2d(3, 4, 3, padding=1), 3.0)
    xc = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        for layer, inp in ((AdderLinearInt8.from_float(AdderLinear(8, 4), 3.0), x), (conv, xc)):
            layer(inp)  # a cached eager call first
            fn = torch.compile(layer, backend="aot_eager", fullgraph=True)
            torch.testing.assert_close(fn(inp), layer(inp))
            torch.testing.assert_close(fn(inp + 1), layer(inp + 1))


def test_int8_scale_from_a_tensor_or_numpy_scalar():
    import numpy as np

    layer = AdderLinear(8, 4)
    x = torch.randn(5, 8)
    want = AdderLinearInt8.from_float(layer, float(x.abs().max())).scale
    assert AdderLinearInt8.from_float(layer, x.abs().max()).scale == want
    assert AdderLinearInt8.from_float(layer, np.float32(x.abs().max())).scale == want
    with pytest.raises(ValueError, match="act_absmax"):
        AdderLinearInt8.from_float(layer, torch.tensor([1.0, 2.0]))
