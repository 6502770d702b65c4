"""Model zoo: every model x variant builds, runs forward and backward on digit-sized and
CIFAR-sized inputs; the AdderNet / ShiftAddNet structure rules; parameter counts."""

import pytest
import torch
from torch import nn

from shiftadd.models import MODELS, VARIANTS, build_model, make_conv, make_linear
from shiftadd.nn import AdderConv2d, AdderLinear, ShiftAddConv2d, ShiftConv2d, ShiftLinear

SHIFT_TYPES = (ShiftConv2d, ShiftLinear)
ADDER_TYPES = (AdderConv2d, AdderLinear)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead (and the cores are shared)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("shape", [(2, 1, 8, 8), (2, 3, 32, 32)], ids=["digits8", "cifar32"])
def test_forward_backward(name, variant, shape):
    torch.manual_seed(0)
    width = 1.0 if shape[-1] == 8 else 0.25  # keep the 32x32 adder cases fast
    model = build_model(name, variant, num_classes=7, in_channels=shape[1], width=width)
    x = torch.randn(shape)
    out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def _leaf_layers(model):
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear, ShiftAddConv2d) + SHIFT_TYPES
                                                        + ADDER_TYPES)]


def _first_conv_and_classifier(model):
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, ShiftConv2d, AdderConv2d, ShiftAddConv2d))]
    linears = [m for m in model.modules() if isinstance(m, (nn.Linear, ShiftLinear, AdderLinear))]
    return convs[0], linears[-1]


def _followers(model, layer_types, x):
    """For every call of a `layer_types` module, the module that consumed its output."""
    produced, consumers = {}, {}

    def out_hook(m, inp, out):
        if isinstance(m, layer_types):
            produced[id(out)] = m

    def pre_hook(m, inp):
        if inp and id(inp[0]) in produced:
            consumers.setdefault(produced[id(inp[0])], []).append(m)

    hs = []
    for m in model.modules():
        if len(list(m.children())) == 0 or isinstance(m, ShiftAddConv2d):
            hs.append(m.register_forward_hook(out_hook))
            hs.append(m.register_forward_pre_hook(pre_hook))
    try:
        model(x)
    finally:
        for h in hs:
            h.remove()
    return consumers


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("variant,layer", [("adder", AdderConv2d), ("shiftadd", ShiftAddConv2d)])
def test_adder_recipe_structure(name, variant, layer):
    model = build_model(name, variant, in_channels=1)
    first, head = _first_conv_and_classifier(model)
    assert type(first) is nn.Conv2d, "first conv must stay multiplicative"
    assert type(head) is nn.Linear, "classifier must stay multiplicative"
    adders = [m for m in model.modules() if isinstance(m, layer)]
    convs = [m for m in model.modules() if type(m) is nn.Conv2d]
    assert len(convs) == 1 and len(adders) == {"resnet20": 20, "resnet32": 32, "resnet56": 56, "vgg_small": 5}[name]
    if variant == "shiftadd":
        assert not any(isinstance(m, AdderConv2d) for m in model.modules() if m not in
                       [a.adder for a in adders])
    consumers = _followers(model, layer, torch.randn(2, 1, 8, 8))
    assert set(consumers) == set(adders), "some adder layers never ran"
    for m, cons in consumers.items():
        assert len(cons) == 1 and isinstance(cons[0], nn.BatchNorm2d), f"{m} is followed by {cons}"


def test_resnet20_adder_layer_count():
    model = build_model("resnet20", "adder")
    # 18 3x3 convs in the blocks + 2 option-B 1x1 shortcuts
    assert sum(isinstance(m, AdderConv2d) for m in model.modules()) == 20
    assert sum(isinstance(m, AdderConv2d) and m.kernel_size == (1, 1) for m in model.modules()) == 2


@pytest.mark.parametrize("name", MODELS)
def test_shift_variant_is_all_shift(name):
    model = build_model(name, "shift", in_channels=1)
    assert not any(type(m) in (nn.Conv2d, nn.Linear) for m in model.modules())
    shifts = [m for m in model.modules() if isinstance(m, SHIFT_TYPES)]
    assert shifts and all(m.mode == "ps" and m.weight_bits == 5 for m in shifts)
    model = build_model(name, "shift", mode="q", weight_bits=4, multiplicative_ends=True)
    first, head = _first_conv_and_classifier(model)
    assert type(first) is nn.Conv2d and type(head) is nn.Linear
    shifts = [m for m in model.modules() if isinstance(m, SHIFT_TYPES)]
    assert shifts and all(m.mode == "q" and m.weight_bits == 4 for m in shifts)


@pytest.mark.parametrize("name", MODELS)
def test_conv_variant_has_no_custom_layers(name):
    model = build_model(name, "conv")
    assert not any(isinstance(m, SHIFT_TYPES + ADDER_TYPES + (ShiftAddConv2d,)) for m in model.modules())


def test_layer_kwargs_reach_layers():
    model = build_model("resnet20", "shiftadd", eta=0.1, grad_mode="exact", weight_bits=6)
    blocks = [m for m in model.modules() if isinstance(m, ShiftAddConv2d)]
    assert all(b.adder.eta == 0.1 and b.adder.grad_mode == "exact" and b.shift.weight_bits == 6 for b in blocks)
    model = build_model("vgg_small", "adder", eta=None)
    assert all(m.eta is None for m in model.modules() if isinstance(m, AdderConv2d))
    with pytest.raises(TypeError, match="unknown layer arguments"):
        build_model("resnet20", "adder", etaa=0.1)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet18")
    with pytest.raises(ValueError, match="unknown variant"):
        build_model("resnet20", "mult")


# Option-A CIFAR ResNets (He et al. 2016; the "0.27M / 0.46M / 0.85M" of the paper):
# 269,722 / 464,154 / 853,018 parameters.  Option B adds two 1x1 shortcut convs
# (16*32 + 32*64 weights) and their BatchNorms (2 * (32 + 64)): 2,752 more.
@pytest.mark.parametrize("name,option_a", [("resnet20", 269_722), ("resnet32", 464_154), ("resnet56", 853_018)])
def test_resnet_param_counts(name, option_a):
    n = sum(p.numel() for p in build_model(name, "conv", num_classes=10, in_channels=3).parameters())
    assert n == option_a + 16 * 32 + 32 * 64 + 2 * (32 + 64)
    if name == "resnet20":
        assert round(n / 1e6, 2) == 0.27


def test_width_multiplier_rounds_channels():
    m = build_model("resnet20", "conv", width=0.5, in_channels=1)
    assert (m.conv1.out_channels, m.layer2[0].conv1.out_channels, m.layer3[0].conv1.out_channels) == (8, 16, 32)
    m = build_model("resnet20", "conv", width=0.01, in_channels=1)  # never below one channel
    assert m.conv1.out_channels == 1 and m.fc.in_features == 1
    assert m(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    v = build_model("vgg_small", "conv", width=0.3)
    convs = [c.out_channels for c in v.modules() if isinstance(c, nn.Conv2d)]
    assert convs == [19, 19, 38, 38, 77, 77]
    with pytest.raises(ValueError):
        build_model("resnet20", width=0)


@pytest.mark.parametrize("op", VARIANTS)
def test_make_conv_geometry(op):
    kw = dict(eta=0.2, mode="ps", weight_bits=5)  # one dict for every op (what a NAS passes)
    layer = make_conv(op, 4, 6, 3, stride=2, **kw)
    assert layer.kernel_size == (3, 3) and layer.stride == (2, 2) and layer.padding == (1, 1)
    out = layer(torch.randn(2, 4, 9, 9))
    assert out.shape == (2, 6, 5, 5)
    conv = make_conv(op, 4, 6, 1)
    assert conv.padding == (0, 0)
    expected = {"conv": nn.Conv2d, "shift": ShiftConv2d, "adder": AdderConv2d, "shiftadd": ShiftAddConv2d}[op]
    assert type(layer) is expected
    bias_holder = layer.adder if op == "shiftadd" else layer
    assert bias_holder.bias is None  # bias off by default
    lin = make_linear(op, 5, 3, **kw)
    assert lin(torch.randn(4, 5)).shape == (4, 3)
    assert type(lin) is {"conv": nn.Linear, "shift": ShiftLinear, "adder": AdderLinear, "shiftadd": ShiftLinear}[op]


def test_make_conv_errors():
    with pytest.raises(ValueError, match="op must be one of"):
        make_conv("mult", 1, 1, 3)
    with pytest.raises(TypeError, match="unknown layer arguments"):
        make_conv("conv", 1, 1, 3, foo=1)
    sa = make_conv("shiftadd", 2, 2, 3, mode="q")
    assert sa.shift.mode == "q"
