"""Low-bit adder layers through thermometer codes and an int8 matrix product (shiftadd.thermometer):
exact against the integer reference on every device, and the int8 modules' bits option."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import shiftadd
from shiftadd import thermometer as T
from shiftadd.nn import AdderConv2d, AdderConv2dInt8, AdderLinear, AdderLinearInt8, quantize_adders_int8
from shiftadd.reference.adder import adder_linear_int8 as reference

BITS = [2, 3, 4]


def rand_bits(bits, *shape, device="cpu"):
    lo, hi = T.value_range(bits)
    return torch.randint(lo, hi + 1, shape, dtype=torch.int8, device=device)


@pytest.mark.parametrize("bits", BITS)
def test_codes_agree_in_all_but_the_difference(bits):
    """sum_t T(a)[t] T(b)[t] = L - 2 |a - b| for every pair of bits-bit values."""
    lo, hi = T.value_range(bits)
    v = torch.arange(lo, hi + 1, dtype=torch.int8)
    c = T.codes(v.unsqueeze(1), bits).int()  # (values, L)
    assert c.shape == (v.numel(), T.levels(bits)) and set(c.unique().tolist()) == {-1, 1}
    want = T.levels(bits) - 2 * (v.int()[:, None] - v.int()[None, :]).abs()
    assert torch.equal(c @ c.t(), want)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n,k,o", [(1, 1, 1), (3, 5, 7), (16, 3, 8), (17, 127, 9), (40, 1000, 33), (0, 5, 3),
                                   (4, 0, 3), (4, 5, 0)])
def test_thermometer_is_exact(device, bits, n, k, o):
    x, w = rand_bits(bits, n, k, device=device), rand_bits(bits, o, k, device=device)
    got = shiftadd.adder_linear_int8(x, w, bits=bits, impl="thermometer")
    assert got.dtype == torch.int32 and got.shape == (n, o) and got.device == x.device
    torch.testing.assert_close(got.cpu(), reference(x.cpu(), w.cpu()), rtol=0, atol=0)


@settings(max_examples=25, deadline=None)
@given(bits=st.sampled_from(BITS), n=st.integers(1, 40), k=st.integers(1, 200), o=st.integers(1, 40))
def test_thermometer_matches_the_sad_kernel(bits, n, k, o):
    x, w = rand_bits(bits, n, k), rand_bits(bits, o, k)
    torch.testing.assert_close(shiftadd.adder_linear_int8(x, w, bits=bits, impl="thermometer"),
                               shiftadd.adder_linear_int8(x, w, bits=bits, impl="sad"), rtol=0, atol=0)


def test_row_chunks_leading_dims_and_views(device, monkeypatch):
    monkeypatch.setattr(T, "_CHUNK_BYTES", 64)  # a chunk of 17 rows at a time (the padding floor)
    x = rand_bits(4, 2, 25, 30, device=device)
    w = rand_bits(4, 11, 60, device=device)[:, ::2]  # a strided weight view
    got = shiftadd.adder_linear_int8(x, w, bits=4, impl="thermometer")
    want = reference(x.reshape(-1, 30).cpu(), w.contiguous().cpu()).reshape(2, 25, 11)
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0)
    xt = rand_bits(3, 30, 19, device=device).t()  # non-contiguous rows
    torch.testing.assert_close(shiftadd.adder_linear_int8(xt, w.clamp(-4, 3), bits=3, impl="thermometer").cpu(),
                               reference(xt.contiguous().cpu(), w.clamp(-4, 3).contiguous().cpu()), rtol=0, atol=0)


def test_extremes_of_the_range():
    for bits in BITS:
        lo, hi = T.value_range(bits)
        x = torch.full((20, 300), lo, dtype=torch.int8)
        w = torch.full((3, 300), hi, dtype=torch.int8)
        got = shiftadd.adder_linear_int8(x, w, bits=bits, impl="thermometer")
        assert got.eq(-(hi - lo) * 300).all()


def test_bad_arguments_name_the_argument():
    x, w = rand_bits(4, 3, 5), rand_bits(4, 2, 5)
    with pytest.raises(ValueError, match=r"x holds values in \[8, 8\], outside the 4-bit range"):
        shiftadd.adder_linear_int8(torch.full((3, 5), 8, dtype=torch.int8), w, bits=4)
    with pytest.raises(ValueError, match=r"weight holds values in \[-3, -3\], outside the 2-bit range"):
        shiftadd.adder_linear_int8(x.clamp(-2, 1), torch.full((2, 5), -3, dtype=torch.int8), bits=2)
    for bad in (1, 5, 7, 9, True, 4.0, "4"):
        with pytest.raises(ValueError, match="bits must be 8, or 2..4"):
            shiftadd.adder_linear_int8(x, w, bits=bad)
    with pytest.raises(ValueError, match="impl must be one of"):
        shiftadd.adder_linear_int8(x, w, bits=4, impl="fast")
    with pytest.raises(ValueError, match="impl='thermometer' needs bits <= 4"):
        shiftadd.adder_linear_int8(x, w, impl="thermometer")


def test_choice_rule():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert T.choose("auto", cpu, 4) == "sad" and T.choose("auto", cpu, 8) == "sad"
    assert T.choose("auto", cuda, 2) == "thermometer" and T.choose("auto", cuda, 8) == "sad"
    assert T.choose("auto", cuda, 3) == "sad" and T.choose("auto", cuda, 4) == "sad"
    assert T.choose("thermometer", cpu, 3) == "thermometer" and T.choose("sad", cuda, 3) == "sad"


# ------------------------------------------------------------------------------ modules


@pytest.fixture
def force_thermometer(monkeypatch):
    """Makes `auto` choose the thermometer product on every device (on a CPU it is the
    compiled SAD kernel otherwise)."""
    real = T.choose
    monkeypatch.setattr(T, "choose", lambda impl, device, bits: real("thermometer" if bits <= 4 else impl,
                                                                       device, bits))


@pytest.mark.parametrize("bits", BITS)
def test_linear_module_at_low_bits(bits, device, force_thermometer):
    torch.manual_seed(0)
    layer = AdderLinear(40, 12, bias=True).to(device)
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(5, 3, 40, device=device)
    q = AdderLinearInt8.from_float(layer, float(x.abs().max()), bits=bits)
    lo, hi = T.value_range(bits)
    assert q.bits == bits and q.weight_q.min() >= lo and q.weight_q.max() <= hi
    assert q.scale == pytest.approx(max(float(layer.weight.detach().abs().max()), float(x.abs().max())) / hi)
    got = q(x)
    xq = torch.round(x.double() / q.scale).clamp(lo, hi)
    want = -(xq[..., None, :] - q.weight_q.double()).abs().sum(-1) * q.scale + q.bias.double()
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    assert f"bits={bits}" in repr(q)


@pytest.mark.parametrize("kw", [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, groups=2),
                                dict(kernel_size=(3, 1), dilation=2, padding=(2, 0))])
@pytest.mark.parametrize("impl", ["sad", "thermometer"])
def test_conv_module_at_4_bits_is_the_integer_conv(kw, impl, device, monkeypatch):
    from test_adder_int8 import _int8_conv_by_hand

    torch.manual_seed(0)
    layer = AdderConv2d(4, 6, **kw).to(device)
    x = torch.randn(2, 4, 9, 7, device=device)
    q = AdderConv2dInt8.from_float(layer, float(x.abs().max()), bits=4)
    real = T.choose
    monkeypatch.setattr(T, "choose", lambda _impl, device, bits: real(impl, device, bits))
    want = _int8_conv_by_hand(q, x.cpu().double() if device == "cpu" else x.double())
    got = q(x)
    torch.testing.assert_close(got.double(), want.to(got.device), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(q(x), got, rtol=0, atol=0)  # again, from the cached codes of every group


@pytest.mark.parametrize("conv", [False, True])
def test_a_new_weight_tensor_is_never_taken_for_the_old_one(conv, force_thermometer):
    """Replacing weight_q by a new tensor (which may land at the freed one's address, with
    the same _version) must rebuild the codes."""
    torch.manual_seed(0)
    shape = (6, 4, 3, 3) if conv else (16, 40)
    layer = AdderConv2d(4, 6, 3, padding=1) if conv else AdderLinear(40, 16)
    x = torch.randn(3, 4, 5, 5) if conv else torch.randn(3, 40)
    q = (AdderConv2dInt8 if conv else AdderLinearInt8).from_float(layer, float(x.abs().max()), bits=4)
    for _ in range(10):
        q(x)
        q.weight_q = torch.randint(-8, 8, shape, dtype=torch.int8)
        ref = (AdderConv2dInt8(q.weight_q.clone(), q.scale, None, 1, 1, bits=4) if conv
               else AdderLinearInt8(q.weight_q.clone(), q.scale, None, bits=4))
        torch.testing.assert_close(q(x), ref(x), rtol=0, atol=0)


def test_sizes_and_empty_features():
    with pytest.raises(ValueError, match="reaches 2\\^31"):
        T.check_size(2**31 // 15 + 1, 4)
    T.check_size(2**31 // 15, 4)
    q = AdderLinearInt8(torch.zeros(3, 0, dtype=torch.int8), 1.0, bits=4)
    assert torch.equal(q(torch.randn(2, 0)), torch.zeros(2, 3))


def test_state_dict_keeps_bits_and_the_codes_follow_loaded_weights(force_thermometer):
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    a = AdderLinearInt8.from_float(AdderLinear(16, 8), 3.0, bits=3)
    b = AdderLinearInt8.from_float(AdderLinear(16, 8), 3.0, bits=3)
    a(x)  # builds a's codes
    a.load_state_dict(b.state_dict())  # copies into a's storage: same pointer
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    d = AdderLinearInt8.from_float(AdderLinear(16, 8), 3.0, bits=3)
    d(x)
    d.weight_q.copy_(a.weight_q)  # an in-place write: same pointer, new version
    d.scale = a.scale
    torch.testing.assert_close(d(x), a(x), rtol=0, atol=0)
    c = AdderLinearInt8(torch.zeros(8, 16, dtype=torch.int8), 1.0)
    c.load_state_dict(b.state_dict())
    assert c.bits == 3 and c.scale == b.scale
    torch.testing.assert_close(c(x), b(x), rtol=0, atol=0)
    old = b.state_dict()
    old["_extra_state"] = {"scale": b.scale}  # saved before the bit width was
    c.load_state_dict(old)
    assert c.bits == 8


def test_module_bad_arguments():
    with pytest.raises(ValueError, match="weight_q holds values in"):
        AdderLinearInt8(torch.full((2, 3), 9, dtype=torch.int8), 1.0, bits=4)
    with pytest.raises(ValueError, match="bits must be 8, or 2..4"):
        AdderLinearInt8.from_float(AdderLinear(3, 2), 1.0, bits=6)
    with pytest.raises(ValueError, match="bits must be 8, or 2..4"):
        quantize_adders_int8(AdderLinear(3, 2), [torch.randn(2, 3)], bits=1)
    q = AdderLinearInt8.from_float(AdderLinear(3, 2), 1.0, bits=4)
    with pytest.raises(ValueError, match=r"x must be \(\.\.\., 3\)"):
        q(torch.randn(2, 4))


def test_quantize_a_model_to_4_bits(force_thermometer):
    from test_adder_int8 import small_adder_net

    model, x, want = small_adder_net(32)
    quantize_adders_int8(model, [x], bits=4)
    assert model[1].bits == 4 and model[5].bits == 4
    with torch.no_grad():
        got = model(x)
    # 4-bit operands: a coarse grid (15 steps), so only a loose agreement with the float net
    assert ((got - want).norm() / want.norm()).item() < 0.25


def test_mse_clip_picks_the_grid_closest_to_the_float_layer():
    from shiftadd.nn.adder import CLIP_FACTORS

    torch.manual_seed(0)
    layer = AdderConv2d(8, 6, 3, padding=1)
    x = torch.randn(16, 8, 6, 6)
    x[0, 0, 0, 0] = 12.0  # one outlier: a grid spanning it wastes 4 bits on it
    with torch.no_grad():
        y = layer(x)
        var = y.var(dim=(0, 2, 3), keepdim=True)

        def err(q):
            return float(((q(x) - y) ** 2 / var).mean())

        top = AdderConv2dInt8.from_float(layer, float(x.abs().max()), bits=4)
        best = quantize_adders_int8(layer, [x], bits=4)  # clip "mse" by default below 8 bits
        assert best.bits == 4 and best.scale < top.scale
        assert any(best.scale == pytest.approx(top.scale * f) for f in CLIP_FACTORS)
        assert err(best) < 0.5 * err(top)
        again = quantize_adders_int8(AdderConv2d(8, 6, 3, padding=1), iter([x]), bits=8)  # a one-shot iterator
        assert again.bits == 8
    with pytest.raises(ValueError, match="clip must be 'max' or 'mse'"):
        quantize_adders_int8(layer, [x], bits=4, clip="p99")


def test_recalibration_re_estimates_the_batchnorm_after_the_adders():
    torch.manual_seed(0)
    model = torch.nn.Sequential(AdderConv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4))
    x = torch.randn(8, 3, 5, 5)
    q = quantize_adders_int8(model, [x[:4], x[4:]], bits=4)
    with torch.no_grad():
        z = q[0](x)  # what the BatchNorm sees now
    torch.testing.assert_close(q[1].running_mean, z.mean((0, 2, 3)), rtol=1e-4, atol=1e-4)
    assert not q.training
    model2 = torch.nn.Sequential(AdderConv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4))
    quantize_adders_int8(model2, [x], bits=4, recalibrate=False)
    assert torch.equal(model2[1].running_mean, torch.zeros(4))  # untouched


def test_calibration_shapes_and_arguments():
    from shiftadd.nn.adder import quantize_int8

    torch.manual_seed(0)
    conv = AdderConv2d(3, 4, 3, padding=1)
    q = quantize_adders_int8(conv, [torch.randn(3, 6, 6), torch.randn(3, 6, 6)], bits=4)  # unbatched images
    assert isinstance(q, AdderConv2dInt8) and q.bits == 4
    lin = AdderLinear(8, 5)
    q = quantize_adders_int8(lin, [torch.randn(2, 7, 8), torch.randn(2, 3, 8), torch.randn(8)], bits=3)
    assert isinstance(q, AdderLinearInt8) and q.bits == 3  # sequences of other lengths, a 1-D input
    with pytest.raises(TypeError, match="recalibrate must be True, False or None"):
        quantize_adders_int8(AdderLinear(8, 5), [torch.randn(2, 8)], bits=4, recalibrate="no")
    with pytest.raises(ValueError, match="bits must be 8, or 2..4"):
        quantize_int8(torch.randn(3), 0.1, bits=6)
    model = torch.nn.Sequential(AdderLinear(8, 5), torch.nn.BatchNorm1d(5))
    with pytest.raises(ValueError, match="give batches of more than one sample, or recalibrate=False"):
        quantize_adders_int8(model, [torch.randn(1, 8)], bits=4)
    with pytest.raises(ValueError, match="calibration gave no batch"):
        quantize_adders_int8(torch.nn.Sequential(AdderLinear(8, 5)), iter([]), bits=4)


# ------------------------------------------------------------------ quantization-aware training


def test_fake_quantize_values_and_straight_through_gradient():
    from shiftadd.nn.adder import fake_quantize

    t = torch.tensor([-3.0, -0.74, -0.2, 0.0, 0.26, 0.5, 1.1, 2.0], requires_grad=True)
    y = fake_quantize(t, 0.25, 3)  # grid 0.25 * (-4 .. 3)
    torch.testing.assert_close(y.detach(), torch.tensor([-1.0, -0.75, -0.25, 0.0, 0.25, 0.5, 0.75, 0.75]))
    y.sum().backward()
    torch.testing.assert_close(t.grad, torch.tensor([0.0, 1, 1, 1, 1, 1, 0, 0]))


@pytest.mark.parametrize("bits", [4, 8])
def test_fake_quantized_model_is_what_the_int8_model_computes(bits):
    from test_adder_int8 import small_adder_net

    from shiftadd.nn import fake_quantize_adders

    model, x, _ = small_adder_net(32)
    fake_quantize_adders(model, [x[:16], x[16:]], bits=bits)
    assert model[1].quant[1] == bits and model[5].quant[1] == bits
    model.train()
    loss = model(x).square().mean()
    loss.backward()  # the straight-through gradients reach every weight
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        want = model(x)
    scales = (model[1].quant[0], model[5].quant[0])
    quantize_adders_int8(model, None, bits=bits)  # the trained scales, no calibration, no recalibration
    assert (model[1].scale, model[5].scale) == scales and model[5].bits == bits
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match=r"calibration is None, but 2 adder layer\(s\) have no scale trained"):
        quantize_adders_int8(small_adder_net(4)[0], None, bits=4)


def test_a_failed_conversion_keeps_the_trained_scales_and_modes():
    from test_adder_int8 import small_adder_net

    from shiftadd.nn import fake_quantize_adders

    model, x, _ = small_adder_net(32)
    fake_quantize_adders(model, [x], bits=4)
    trained = (model[1].quant, model[5].quant)
    model.train()
    model[2].eval()  # a frozen BatchNorm stays frozen
    with pytest.raises(ValueError, match=r"calibration is None, but 2 adder layer\(s\) have no scale trained at 8"):
        quantize_adders_int8(model, None)  # bits=8: the layers trained at 4
    with pytest.raises(ValueError, match="calibration gave no batch"):
        quantize_adders_int8(model, [], bits=4, recalibrate=True)
    with pytest.raises(ValueError, match="calibration gave no batch"):
        fake_quantize_adders(model, [], bits=3)
    assert (model[1].quant, model[5].quant) == trained
    assert model.training and model[1].training and not model[2].training
    model.eval()
    with torch.no_grad():
        want = model(x)
        quantize_adders_int8(model, None, bits=4)
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-4)


def test_trained_and_untrained_layers_convert_together():
    from test_adder_int8 import small_adder_net

    model, x, _ = small_adder_net(32)
    model[5].quant = (0.05, 4)  # only the classifier trained with its quantization
    quantize_adders_int8(model, [x], bits=4)
    assert model[5].scale == 0.05 and model[1].scale != 0.05


def test_negative_padding_is_refused():
    with pytest.raises(ValueError, match="padding must be non-negative"):
        AdderConv2d(3, 4, 3, padding=-1)
