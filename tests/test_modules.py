"""Drop-in modules: constructor compatibility, state_dict, .to(), eta scaling, autocast,
torch.compile."""

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import op, rel_err
from torch import nn

import shiftadd
from shiftadd.nn import AdderConv2d, AdderLinear, ShiftAddConv2d, ShiftConv2d, ShiftLinear


def conv_modules():
    return [
        AdderConv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2, bias=True),
        ShiftConv2d(4, 6, 3, stride=1, padding=1, groups=2, mode="ps"),
        ShiftConv2d(4, 6, (3, 1), stride=(2, 1), padding=(1, 0), mode="q", act_bits=(16, 16)),
        ShiftAddConv2d(4, 6, 3, stride=2, padding=1),
    ]


@pytest.mark.parametrize("i", range(4))
def test_conv_modules_match_nn_conv2d_geometry(i):
    m = conv_modules()[i]
    ref = nn.Conv2d(4, 6, m.kernel_size, m.stride, m.padding, m.dilation, m.groups)
    x = torch.randn(2, 4, 9, 11)
    assert m(x).shape == ref(x).shape
    assert m(x[0]).shape == ref(x[0]).shape  # unbatched input
    for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
        assert getattr(m, name) == getattr(ref, name), name


@pytest.mark.parametrize("i", range(4))
def test_state_dict_round_trip(i):
    a, b = conv_modules()[i], conv_modules()[i]
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b.load_state_dict(torch.load(buf))
    x = torch.randn(2, 4, 9, 9)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    c = copy.deepcopy(a)
    torch.testing.assert_close(a(x), c(x), rtol=0, atol=0)


def test_extra_repr_names_the_settings():
    r = repr(AdderConv2d(3, 8, 3, padding=1, eta=None, grad_mode="exact"))
    assert "AdderConv2d(3, 8, kernel_size=(3, 3)" in r and "eta=None" in r and "grad_mode=exact" in r
    r = repr(ShiftLinear(5, 2, mode="q", weight_bits=4, act_bits=(8, 8)))
    assert "mode=q" in r and "weight_bits=4" in r and "act_bits=(8, 8)" in r


def test_to_dtype_keeps_results():
    torch.manual_seed(0)
    net = nn.Sequential(AdderConv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), ShiftConv2d(4, 4, 1), nn.Flatten(),
                        AdderLinear(4 * 25, 3, bias=True), ShiftLinear(3, 2))
    x = torch.randn(2, 3, 5, 5)
    y32 = net(x)
    net64 = copy.deepcopy(net).to(torch.float64)
    y64 = net64(x.double())
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y64.float(), y32, rtol=1e-4, atol=1e-3)
    assert next(net.to("meta").parameters()).device.type == "meta"


def test_adder_modules_are_the_functional_op():
    m = AdderConv2d(4, 6, 3, padding=1, bias=True)
    nn.init.normal_(m.bias)
    x = torch.randn(2, 4, 7, 7)
    want = op("reference", "adder_conv2d")(x, m.weight, [1, 1], [1, 1], [1, 1], 1, "addernet") + m.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(m(x), want)
    lin = AdderLinear(5, 3)
    xl = torch.randn(2, 4, 5)
    torch.testing.assert_close(lin(xl), op("reference", "adder_linear")(xl.reshape(8, 5), lin.weight, "addernet").view(2, 4, 3))


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_padding_modes_match_nn_conv2d(mode):
    m = AdderConv2d(2, 3, 3, padding=1, padding_mode=mode)
    x = torch.randn(1, 2, 6, 6)
    xp = F.pad(x, (1, 1, 1, 1), mode=mode)
    torch.testing.assert_close(m(x), shiftadd.adder_conv2d(xp, m.weight))


def test_same_padding_with_even_kernel():
    m = AdderConv2d(2, 3, 4, padding="same")
    x = torch.randn(1, 2, 7, 6)
    y = m(x)
    assert y.shape == (1, 3, 7, 6)
    torch.testing.assert_close(y, shiftadd.adder_conv2d(F.pad(x, (1, 2, 1, 2)), m.weight))


@pytest.mark.parametrize("eta", [0.2, 1.5, None])
def test_eta_scales_the_weight_gradient(eta):
    """AdderNet eq. 13: grad_W <- eta * sqrt(numel) * grad_W / ||grad_W||; bias untouched."""
    torch.manual_seed(0)
    m = AdderConv2d(3, 5, 3, padding=1, bias=True, eta=eta)
    ref = copy.deepcopy(m)
    ref.eta = None
    x, g = torch.randn(2, 3, 6, 6), torch.randn(2, 5, 6, 6)
    m(x).backward(g)
    ref(x).backward(g)
    raw = ref.weight.grad
    want = raw if eta is None else raw * eta * math.sqrt(raw.numel()) / raw.norm()
    torch.testing.assert_close(m.weight.grad, want)
    torch.testing.assert_close(m.bias.grad, ref.bias.grad)
    if eta is not None:
        assert abs(m.weight.grad.norm().item() - eta * math.sqrt(raw.numel())) < 1e-3


def test_eta_with_zero_gradient_stays_finite():
    m = AdderLinear(4, 3)
    m(torch.randn(2, 4)).mul(0).sum().backward()
    assert torch.isfinite(m.weight.grad).all() and m.weight.grad.abs().sum() == 0


def test_shift_modules_quantized_weight_and_penalty():
    m = ShiftConv2d(3, 4, 3, mode="ps", weight_bits=5)
    w = m.quantized_weight()
    e = torch.log2(w.abs()[w != 0])
    assert torch.equal(e, e.round()) and e.min() >= -14 and e.max() <= 0
    x = torch.randn(1, 3, 5, 5)
    torch.testing.assert_close(m(x), F.conv2d(x, w, m.bias))
    torch.testing.assert_close(m.shift_penalty(), 0.5 * (2.0 ** m.shift.detach()).square().sum())
    assert ShiftLinear(3, 2, mode="q").shift_penalty().item() == 0


def test_stochastic_rounding_only_in_training():
    torch.manual_seed(0)
    m = ShiftLinear(16, 8, mode="q", rounding="stochastic").eval()
    x = torch.randn(4, 16)
    torch.testing.assert_close(m(x), m(x), rtol=0, atol=0)
    m.train()
    outs = {tuple(m(x).flatten().tolist()) for _ in range(5)}
    assert len(outs) > 1


def test_shiftadd_block_is_shift_then_adder():
    m = ShiftAddConv2d(3, 4, 3, stride=2, padding=1)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(m(x), m.adder(m.shift(x)))
    assert m.shift.mode == "ps" and m.shift.weight_bits == 5 and m.adder.kernel_size == (3, 3)


class MixedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.shift = ShiftConv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.adder = AdderConv2d(8, 8, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.block = ShiftAddConv2d(8, 8, 1)
        self.fc = AdderLinear(8, 10, bias=True)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.bn1(self.shift(x)))
        x = F.relu(self.bn2(self.adder(x)))
        x = self.block(x)
        return self.fc(x.mean((2, 3)))


def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    net = MixedNet()
    net_c = copy.deepcopy(net)
    x = torch.randn(4, 3, 8, 8)
    y = net(x)
    y.square().sum().backward()
    compiled = torch.compile(net_c, fullgraph=True)
    yc = compiled(x)
    yc.square().sum().backward()
    torch.testing.assert_close(yc, y, rtol=1e-4, atol=1e-4)
    for (name, p), pc in zip(net.named_parameters(), net_c.parameters()):
        assert rel_err(pc.grad, p.grad) < 1e-4, name  # fp32 reassociation in the compiled graph


def test_compile_under_each_cpu_backend():
    x = torch.randn(2, 3, 6, 6)
    m = AdderConv2d(3, 4, 3, padding=1)
    for backend in ("reference", "cpu") if shiftadd._dispatch._C is not None else ("reference",):
        with shiftadd.use_backend(backend):
            torch.testing.assert_close(torch.compile(m, fullgraph=True)(x), m(x))


def test_autocast_runs_adder_layers_in_float32():
    """Under autocast the adder ops take float32 (as torch.cdist), whatever their inputs' dtype."""
    m = AdderConv2d(3, 4, 3, padding=1, bias=True)
    lin = AdderLinear(4, 2)
    conv = nn.Conv2d(3, 3, 1)
    x = torch.randn(2, 3, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)  # a bfloat16 activation, as a multiplicative layer leaves it
        y = m(h)
        z = lin(y.mean((2, 3)))
    assert h.dtype == torch.bfloat16 and y.dtype == torch.float32 and z.dtype == torch.float32
    want = op("reference", "adder_conv2d")(h.float(), m.weight, [1, 1], [1, 1], [1, 1], 1, "addernet")
    torch.testing.assert_close(y, want + m.bias.view(1, -1, 1, 1))
    z.sum().backward()
    assert m.weight.grad.dtype == torch.float32 and torch.isfinite(m.weight.grad).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_modules_move_to_cuda_and_back():
    net = MixedNet()
    x = torch.randn(2, 3, 8, 8)
    y = net(x)
    yc = net.cuda()(x.cuda())
    torch.testing.assert_close(yc.cpu(), y, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(net.cpu()(x), y)


def test_eta_scaling_survives_a_loss_scaler():
    """AdderNet's scaling ignores the loss scale; after GradScaler-style unscaling,
    renormalize_eta_grads restores the weight gradient's size (and direction)."""
    from shiftadd.nn import renormalize_eta_grads

    torch.manual_seed(0)
    m = AdderConv2d(3, 4, 3, padding=1, eta=0.2)
    ref = copy.deepcopy(m)
    x = torch.randn(2, 3, 5, 5)
    ref(x).square().sum().backward()
    scale = 65536.0
    (m(x).square().sum() * scale).backward()
    m.weight.grad.div_(scale)  # what scaler.unscale_ does
    assert m.weight.grad.norm() < 1e-3 * ref.weight.grad.norm()
    renormalize_eta_grads(m)
    torch.testing.assert_close(m.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-6)


def test_vmap_over_adder_layers():
    torch.manual_seed(0)
    m = AdderLinear(8, 4).eval()
    x = torch.randn(5, 1, 8)
    torch.testing.assert_close(torch.func.vmap(m)(x), m(x))


def test_conv_modules_take_nn_conv2d_positional_arguments():
    args = (4, 8, 3, 1, 1, 1, 1, False, "reflect")  # nn.Conv2d's order, padding_mode included
    ref = nn.Conv2d(*args)
    x = torch.randn(2, 4, 6, 6)
    for cls in (AdderConv2d, ShiftConv2d, ShiftAddConv2d):
        m = cls(*args)
        first = m.shift if cls is ShiftAddConv2d else m  # ShiftAddNet: the shift conv pads, the adder follows
        assert first.padding_mode == "reflect" and m(x).shape == ref(x).shape, cls.__name__
