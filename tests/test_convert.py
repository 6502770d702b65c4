"""shiftadd.convert: which layers are replaced, and how they are initialised."""

import copy

import pytest
import torch
from torch import nn

import shiftadd
from shiftadd.nn import AdderConv2d, AdderLinear, ShiftAddConv2d, ShiftConv2d, ShiftLinear


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 10),
    )


def kinds(model):
    return [type(m).__name__ for m in model.modules()
            if isinstance(m, (nn.Conv2d, nn.Linear, AdderConv2d, AdderLinear, ShiftConv2d, ShiftLinear,
                              ShiftAddConv2d))]


def test_adder_keeps_first_conv_and_classifier():
    model, n = shiftadd.convert(small_net(), to="adder")
    assert n == 3
    assert kinds(model) == ["Conv2d", "AdderConv2d", "AdderConv2d", "AdderLinear", "Linear"]
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_shift_all_layers_and_depth():
    model, n = shiftadd.convert(small_net(), to="shift", skip_first=False, skip_last=False)
    assert n == 5 and kinds(model) == ["ShiftConv2d", "ShiftConv2d", "ShiftConv2d", "ShiftLinear", "ShiftLinear"]
    model, n = shiftadd.convert(small_net(), to="shift", skip_first=False, skip_last=False, depth=2)
    assert n == 2 and kinds(model) == ["Conv2d", "Conv2d", "Conv2d", "ShiftLinear", "ShiftLinear"]
    model, n = shiftadd.convert(small_net(), to="shift", layers=("conv",))
    assert n == 2 and kinds(model) == ["Conv2d", "ShiftConv2d", "ShiftConv2d", "Linear", "Linear"]


def test_depth_beyond_the_eligible_layers_converts_them_all():
    for depth in (3, 4, 6, 100):
        model, n = shiftadd.convert(small_net(), to="shift", depth=depth)
        assert n == 3 and kinds(model) == ["Conv2d", "ShiftConv2d", "ShiftConv2d", "ShiftLinear", "Linear"], depth


def test_a_bare_layer_is_converted_when_not_skipped():
    for layer, want in ((nn.Conv2d(3, 4, 3), AdderConv2d), (nn.Linear(5, 6), AdderLinear)):
        same, n = shiftadd.convert(layer, to="adder")  # the only layer is the first and the last: kept
        assert same is layer and n == 0
        new, n = shiftadd.convert(layer, to="adder", skip_first=False, skip_last=False)
        assert type(new) is want and n == 1
        torch.testing.assert_close(new.weight, layer.weight)


def test_shiftadd_blocks():
    model, n = shiftadd.convert(small_net(), to="shiftadd")
    assert n == 3
    assert kinds(model) == ["Conv2d", "ShiftAddConv2d", "ShiftConv2d", "AdderConv2d", "ShiftAddConv2d", "ShiftConv2d",
                            "AdderConv2d", "ShiftLinear", "Linear"]
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_from_weights_q_keeps_power_of_two_models_exact():
    """A model whose weights already are powers of two computes the same after conversion."""
    net = small_net().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(shiftadd.quantize_pot(m.weight))
    x = torch.randn(2, 3, 8, 8)
    want = net(x)
    model, _ = shiftadd.convert(copy.deepcopy(net), to="shift", mode="q", skip_first=False, skip_last=False)
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    model, _ = shiftadd.convert(copy.deepcopy(net), to="shift", mode="ps", skip_first=False, skip_last=False)
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)


def test_from_weights_copies_and_settings_pass_through():
    net = small_net()
    model, _ = shiftadd.convert(copy.deepcopy(net), to="adder", eta=None, grad_mode="exact")
    conv = model[3][0]
    assert isinstance(conv, AdderConv2d) and conv.eta is None and conv.grad_mode == "exact"
    torch.testing.assert_close(conv.weight, net[3][0].weight)
    lin = model[9]
    torch.testing.assert_close(lin.bias, net[9].bias)
    fresh, _ = shiftadd.convert(copy.deepcopy(net), to="adder", from_weights=False)
    assert not torch.equal(fresh[3][0].weight, net[3][0].weight)


def test_converted_keeps_device_dtype_and_mode():
    net = small_net().double().eval()
    model, _ = shiftadd.convert(net, to="shift", weight_bits=4)
    m = model[3][0]
    assert m.shift.dtype == torch.float64 and not m.training and m.weight_bits == 4


def test_bad_arguments():
    with pytest.raises(ValueError, match="to must be one of"):
        shiftadd.convert(small_net(), to="multiply")
    with pytest.raises(TypeError, match="unknown layer arguments"):
        shiftadd.convert(small_net(), to="adder", etta=0.1)
    with pytest.raises(ValueError, match="layers"):
        shiftadd.convert(small_net(), layers=("attention",))
