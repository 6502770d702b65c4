"""Bad input gets a clear error naming the argument, never a crash or a silent answer."""

import pytest
import torch

import shiftadd
from shiftadd import _dispatch, _ops

F_BACKENDS = ["cpu", "reference"]


def conv(**kw):
    args = dict(x=torch.randn(2, 4, 6, 6), weight=torch.randn(6, 4, 3, 3))
    args.update(kw)
    return shiftadd.adder_conv2d(args.pop("x"), args.pop("weight"), **args)


@pytest.mark.parametrize("kw,err,match", [
    (dict(x=torch.randint(0, 3, (2, 4, 6, 6))), TypeError, "x must be a floating-point tensor"),
    (dict(weight=torch.randn(6, 4, 3, 3, dtype=torch.float64)), TypeError, "weight dtype torch.float64 does not match x"),
    (dict(x=torch.randn(4, 6, 6, 1, 1)), ValueError, "x must be 4-D"),
    (dict(weight=torch.randn(6, 4, 3)), ValueError, "weight must be 4-D"),
    (dict(groups=3), ValueError, r"in_channels \(4\) must be divisible by groups \(3\)"),
    (dict(weight=torch.randn(5, 2, 3, 3), groups=2), ValueError, r"out_channels \(5\) must be divisible by groups"),
    (dict(weight=torch.randn(6, 3, 3, 3)), ValueError, "weight expects 3 input channels"),
    (dict(padding=-1), ValueError, "padding must be non-negative"),
    (dict(stride=0), ValueError, "stride must be positive"),
    (dict(dilation=(1, 0)), ValueError, "dilation must be positive"),
    (dict(groups=0), ValueError, "groups must be a positive int"),
    (dict(padding="full"), ValueError, "padding must be an int, a pair, 'valid' or 'same'"),
    (dict(padding="same", stride=2), ValueError, "padding='same' needs stride 1"),
    (dict(x=torch.randn(2, 4, 2, 2)), ValueError, "smaller than the dilated kernel"),
    (dict(bias=torch.randn(5)), ValueError, r"bias must have shape \(6,\)"),
    (dict(grad_mode="approx"), ValueError, "grad_mode must be one of"),
    (dict(x=[1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
    (dict(weight=torch.randn(6, 4, 0, 0)), ValueError, "kernel size must be positive"),
    (dict(stride=1.0), ValueError, "stride must be an int or a pair of ints, got 1.0"),
    (dict(dilation=None), ValueError, "dilation must be an int or a pair of ints, got None"),
])
def test_adder_conv2d_bad_arguments(kw, err, match):
    with pytest.raises(err, match=match):
        conv(**kw)


def test_device_mismatch_names_both_devices():
    with pytest.raises(RuntimeError, match="weight is on meta but x is on cpu"):
        shiftadd.adder_linear(torch.randn(2, 3), torch.randn(4, 3, device="meta"))
    with pytest.raises(RuntimeError, match="bias is on meta but x is on cpu"):
        shiftadd.adder_linear(torch.randn(2, 3), torch.randn(4, 3), bias=torch.randn(4, device="meta"))


@pytest.mark.parametrize("x,w,match", [
    (torch.randn(2, 3), torch.randn(4, 5), "x has 3 features in its last dimension, weight expects 5"),
    (torch.randn(2, 3), torch.randn(4, 3, 1), "weight must be 2-D"),
    (torch.tensor(1.0), torch.randn(4, 3), "x must have at least 1 dimension"),
])
def test_adder_linear_bad_shapes(x, w, match):
    with pytest.raises(ValueError, match=match):
        shiftadd.adder_linear(x, w)


@pytest.mark.parametrize("backend", F_BACKENDS)
def test_ops_validate_their_own_arguments(backend):
    """Called directly (bypassing the functional API), the ops still refuse bad input."""
    if _dispatch.why_not(backend, "adder_conv2d", torch.device("cpu"), torch.float32):
        pytest.skip("backend unavailable")
    op = _ops.op(backend, "adder_conv2d")
    with pytest.raises((RuntimeError, ValueError)):
        op(torch.randn(2, 4, 6, 6), torch.randn(6, 3, 3, 3), [1, 1], [1, 1], [1, 1], 1, "addernet")
    with pytest.raises((RuntimeError, ValueError), match="grad_mode"):
        op(torch.randn(2, 4, 6, 6), torch.randn(6, 4, 3, 3), [1, 1], [1, 1], [1, 1], 1, "nope")
    gi = _ops.op(backend, "adder_conv2d_grad_input")
    with pytest.raises((RuntimeError, ValueError)):
        gi(torch.randn(2, 6, 5, 5), torch.randn(2, 4, 6, 6), torch.randn(6, 4, 3, 3), [1, 1], [1, 1], [1, 1], 1,
           "exact")


def test_compiled_ops_check_shapes_and_dtypes():
    if _dispatch._C is None:
        pytest.skip("shiftadd._C not loaded")
    lin = _ops.op("cpu", "adder_linear")
    with pytest.raises(RuntimeError, match="x has 3 features but weight expects 4"):
        lin(torch.randn(2, 3), torch.randn(5, 4), "addernet")
    with pytest.raises(RuntimeError, match="does not match x dtype"):
        lin(torch.randn(2, 3), torch.randn(5, 3, dtype=torch.float64), "addernet")
    with pytest.raises(RuntimeError, match="must be floating point|floating-point"):
        _ops.op("cpu", "quantize_pot_q")(torch.arange(4), 5, None)
    with pytest.raises(RuntimeError, match="weight_bits must be in"):
        _ops.op("cpu", "quantize_pot_q")(torch.randn(4), 9, None)
    with pytest.raises(RuntimeError, match="noise must have the shape"):
        _ops.op("cpu", "quantize_pot_q")(torch.randn(4), 5, torch.rand(3))


@pytest.mark.parametrize("call,err,match", [
    (lambda: shiftadd.quantize_pot(torch.randn(3), weight_bits=1), ValueError, "weight_bits must be an int in"),
    (lambda: shiftadd.quantize_pot(torch.randn(3), mode="ps"), ValueError, "needs the sign tensor"),
    (lambda: shiftadd.quantize_pot(torch.randn(3), mode="ps", sign=torch.randn(4)), ValueError, "sign shape"),
    (lambda: shiftadd.quantize_pot(torch.randn(3), sign=torch.randn(3)), ValueError, "only used with mode='ps'"),
    (lambda: shiftadd.quantize_pot(torch.randn(3), mode="log"), ValueError, "mode must be 'q' or 'ps'"),
    (lambda: shiftadd.quantize_pot(torch.randn(3), rounding="up"), ValueError, "rounding must be one of"),
    (lambda: shiftadd.round_to_fixed(torch.randn(3), 0, 4), ValueError, "int_bits must be an int in"),
    (lambda: shiftadd.shift_linear(torch.randn(2, 3), torch.randn(4, 3), act_bits=8), ValueError, "act_bits must be"),
    (lambda: shiftadd.shift_linear(torch.randn(2, 3), torch.randn(4, 3), mode="x"), ValueError, "mode must be one of"),
    (lambda: shiftadd.nn.ShiftConv2d(3, 4, 3, weight_bits=12), ValueError, "weight_bits must be an int in"),
    (lambda: shiftadd.nn.AdderConv2d(3, 4, 3, groups=2), ValueError, "must be divisible by groups"),
    (lambda: shiftadd.nn.AdderConv2d(3, 4, 3, eta=-1), ValueError, "eta must be a positive finite number or None"),
    (lambda: shiftadd.nn.AdderConv2d(3, 4, 3, padding_mode="mirror"), ValueError, "padding_mode must be one of"),
    (lambda: shiftadd.nn.AdderLinear(3, 4, grad_mode="fast"), ValueError, "grad_mode must be one of"),
])
def test_shift_and_module_bad_arguments(call, err, match):
    with pytest.raises(err, match=match):
        call()


def test_empty_batch_gives_empty_output_and_gradients():
    x = torch.randn(0, 4, 6, 6, requires_grad=True)
    m = shiftadd.nn.AdderConv2d(4, 5, 3, padding=1, bias=True)
    y = m(x)
    assert y.shape == (0, 5, 6, 6)
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.isfinite(m.weight.grad).all()


def test_nan_input_gives_nan_output_not_an_error():
    x = torch.randn(2, 4)
    x[0, 1] = float("nan")
    y = shiftadd.adder_linear(x, torch.randn(3, 4))
    assert y[0].isnan().all() and not y[1].isnan().any()


def test_zero_features_give_zero_distance():
    y = shiftadd.adder_linear(torch.randn(2, 3, 0), torch.randn(4, 0))
    assert y.shape == (2, 3, 4) and bool((y == 0).all())


def test_raw_ops_reject_what_the_functions_reject():
    """Found by fuzzing: arguments that overflowed the C++ geometry (a crash), zero-size
    kernels (an output larger than x), and second tensors on the meta device or of the
    wrong shape (uninitialized memory back, through the fake kernels)."""
    x, w = torch.randn(1, 1, 2, 64), torch.randn(1, 1, 1, 5)
    conv_ops = [_ops.op("reference", "adder_conv2d")]
    if _dispatch.why_not("cpu", "adder_conv2d", torch.device("cpu"), torch.float32) is None:
        conv_ops.append(_ops.op("cpu", "adder_conv2d"))
        with pytest.raises(RuntimeError, match="below 2\\^31"):
            conv_ops[-1](x, w, [1, 1], [0, 0], [1, 2 ** 62], 1, "addernet")
    for f in conv_ops:
        with pytest.raises((RuntimeError, ValueError), match="kernel size must be positive"):
            f(torch.randn(1, 1, 5, 5), torch.randn(1, 1, 0, 0), [1, 1], [0, 0], [1, 1], 1, "addernet")
    for backend in ("cpu", "reference"):
        if _dispatch.why_not(backend, "adder_linear", torch.device("cpu"), torch.float32) is not None:
            continue
        with pytest.raises(RuntimeError, match="noise is on meta"):
            _ops.op(backend, "quantize_pot_q")(torch.ones(3), 5, torch.rand(3, device="meta"), None)
        with pytest.raises(RuntimeError, match="sign is on meta"):
            _ops.op(backend, "quantize_pot_ps")(torch.ones(3), torch.ones(3, device="meta"), 5, None, None)
        with pytest.raises(RuntimeError, match="grad_out is on meta"):
            _ops.op(backend, "adder_linear_grad_weight")(torch.ones(2, 3, device="meta"), torch.ones(2, 4),
                                                         torch.ones(3, 4), "exact")
        with pytest.raises(RuntimeError, match="grad_out is on meta"):
            _ops.op(backend, "adder_conv2d_grad_input")(torch.ones(1, 1, 3, 3, device="meta"), torch.ones(1, 1, 5, 5),
                                                        torch.ones(1, 1, 3, 3), [1, 1], [0, 0], [1, 1], 1, "exact")
        for mode in ("exact", "addernet"):
            with pytest.raises((RuntimeError, ValueError), match="grad_out must have shape"):
                _ops.op(backend, "adder_linear_grad_weight")(torch.ones(2, 5), torch.ones(2, 4), torch.ones(3, 4), mode)


def test_conv_modules_check_their_geometry():
    from shiftadd import nn as snn

    for kw, match in ((dict(dilation=0), "dilation must be positive"), (dict(stride=0), "stride must be positive"),
                      (dict(stride=-1), "stride must be positive"), (dict(padding=-2), "padding must be non-negative")):
        with pytest.raises(ValueError, match=match):
            snn.AdderConv2d(2, 4, 3, **kw)
        with pytest.raises(ValueError, match=match):
            snn.ShiftConv2d(2, 4, 3, **kw)
    with pytest.raises(ValueError, match="stride must be positive"):
        snn.AdderConv2dInt8(torch.zeros(4, 2, 3, 3, dtype=torch.int8), 0.1, None, stride=0)


def test_int8_adders_propagate_non_finite_inputs_like_the_float_layers():
    """NaN in what an output reads gives NaN, an infinity -inf (the quantizer used to clamp
    them into finite numbers)."""
    from shiftadd import nn as snn

    torch.manual_seed(0)
    lin = snn.AdderLinear(6, 4)
    x = torch.randn(3, 6)
    x[0, 2], x[1, 1] = float("nan"), float("inf")
    for layer, q, inp in ((lin, snn.AdderLinearInt8.from_float(lin, 3.0), x),
                          *[(c, snn.AdderConv2dInt8.from_float(c, 3.0), None) for c in (
                              snn.AdderConv2d(4, 6, 3, padding=1, groups=2),
                              snn.AdderConv2d(4, 6, 3, padding=2, dilation=2, stride=2, padding_mode="reflect"))]):
        if inp is None:
            inp = torch.randn(2, 4, 7, 7)
            inp[0, 0, 2, 2], inp[1, 3, 0, 0] = float("nan"), float("-inf")
        with torch.no_grad():
            want, got = layer(inp), q(inp)
        assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.equal(torch.isinf(got), torch.isinf(want))
        assert torch.isnan(want).any() and torch.isinf(want).any()


def test_int8_state_is_checked_when_loaded():
    from shiftadd import nn as snn

    q = snn.AdderLinearInt8.from_float(snn.AdderLinear(6, 4), 2.0)
    for state, match in (({"scale": -1.0, "bits": 8}, "scale must be a positive finite"),
                         ({"scale": float("nan"), "bits": 8}, "scale must be a positive finite"),
                         ({"scale": 0.1, "bits": 5}, "bits must be 8, or 2..4"),
                         ({"scale": 0.1, "bits": 2}, "outside the 2-bit range")):
        sd = q.state_dict()
        sd["_extra_state"] = state
        with pytest.raises(ValueError, match=match):
            q.load_state_dict(sd)


def test_thermometer_codes_must_fit_the_call():
    from shiftadd import thermometer as T

    w = torch.randint(-8, 8, (5, 7), dtype=torch.int8)
    x = torch.randint(-8, 8, (3, 7), dtype=torch.int8)
    codes = T.weight_codes(w, 4)
    for args, match in (((x, codes, 2, 5), "codes built for other in_features or bits"),
                        ((torch.randint(-8, 8, (3, 9), dtype=torch.int8), codes, 4, 5), "other in_features"),
                        ((x, codes, 4, 9), "does not match w_codes' 8 rows"),
                        ((x.float(), codes, 4, 5), "x must be a 2-D int8 tensor")):
        with pytest.raises(ValueError, match=match):
            T.adder_linear_codes(*args)


def test_shift_layers_check_loaded_weights_and_refresh_their_packed_copy():
    from shiftadd import nn as snn

    for mode in ("q", "ps"):
        with pytest.raises(ValueError, match=r"shape \(3, 4\)"):
            snn.ShiftLinear(4, 3, mode=mode).load_float_weight(torch.randn(4))
        with pytest.raises(ValueError, match="floating-point"):
            snn.ShiftLinear(4, 3, mode=mode).load_float_weight(torch.ones(3, 4, dtype=torch.int64))
    m = snn.ShiftLinear(8, 2, mode="q").eval()
    x = torch.randn(1, 8)
    with torch.no_grad():
        y0 = m(x)
        m.weight.data.mul_(-1)  # invisible to the version counter, as to autograd
        m.eval()                # no mode change: the packed copy stays
        assert torch.equal(m(x), y0)
        m.clear_packed_cache()
        assert not torch.equal(m(x), y0)
    with pytest.raises(ValueError, match="scales must lie in"):
        shiftadd.PackedPoT(torch.ones(1, 16, dtype=torch.uint8), torch.tensor([-2 ** 31], dtype=torch.int32),
                           torch.tensor([-1], dtype=torch.int32), (1, 16), 8)


def test_minor_module_arguments():
    from torch import nn

    from shiftadd import nn as snn

    with pytest.raises(ValueError, match="eta must be a positive finite number"):
        snn.AdderLinear(3, 4, eta=float("inf"))
    with pytest.raises(ValueError, match="act_bits must be None or"):
        snn.ShiftLinear(3, 4, act_bits=(1.7, 4.9))
    # a failed recalibration leaves the statistics, momentum and train/eval flags as they were
    m = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).train()
    m(torch.randn(8, 3))
    mean = m[1].running_mean.clone()

    def boom(x):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        snn.recalibrate_bn(m, boom, [torch.randn(4, 3)])
    assert torch.equal(m[1].running_mean, mean) and m[1].momentum == 0.1 and m.training
    # convert: a layer used in two places is replaced in both, by one shared layer
    shared = nn.Linear(4, 4)
    model = nn.Sequential(nn.Linear(4, 4), shared, nn.ReLU(), shared, nn.Linear(4, 2))
    model, n = shiftadd.convert(model, to="adder", accumulate="fp16x2")
    assert n == 1 and model[1] is model[3] and isinstance(model[3], snn.AdderLinear)
    assert model[1].accumulate == "fp16x2"


def test_fixes_keep_valid_uses_working():
    """From a review of the bad-input fixes: array / tensor / range kernel sizes still work,
    the int8 layers still trace on meta and fake tensors, and convert walks a shared block once."""
    import numpy as np
    from torch import nn
    from torch._subclasses.fake_tensor import FakeTensorMode

    from shiftadd import nn as snn

    assert snn.AdderConv2d(1, 4, np.array([3, 3]))(torch.randn(1, 1, 5, 5)).shape == (1, 4, 3, 3)
    assert snn.ShiftConv2d(1, 4, torch.tensor([3, 2]))(torch.randn(1, 1, 5, 5)).shape == (1, 4, 3, 4)
    assert snn.AdderConv2d(1, 4, range(2, 4)).kernel_size == (2, 3)
    q = snn.AdderConv2dInt8(torch.zeros(16, 16, 3, 3, dtype=torch.int8), 0.1, padding=1)
    assert q.to("meta")(torch.randn(2, 16, 8, 8, device="meta")).shape == (2, 16, 8, 8)
    with FakeTensorMode():
        q2 = snn.AdderLinearInt8(torch.zeros(4, 6, dtype=torch.int8), 0.1)
        assert q2(torch.randn(3, 6)).shape == (3, 4)
    block = nn.Linear(3, 3)
    for _ in range(22):
        block = nn.Sequential(block, block)
    _, n = shiftadd.convert(block, to="adder", skip_first=False, skip_last=False)
    assert n == 1
