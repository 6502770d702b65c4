"""The cases of shiftadd/bench/shift.py under pytest-benchmark."""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, cuda_synced

from shiftadd import _dispatch, _ops
from shiftadd import functional as SF
from shiftadd.bench.shift import CASES

C = CASES[DEVICE.type]
Q_BACKENDS = [b for b in ("cuda", "triton", "cpu", "reference")
              if _dispatch.why_not(b, "quantize_pot_ps", DEVICE, torch.float32) is None
              and not (b == "triton" and DEVICE.type == "cpu")]


@pytest.mark.parametrize("backend", Q_BACKENDS)
@pytest.mark.parametrize("shape", C["weights"], ids=str)
def test_quantize_ps(benchmark, shape, backend):
    p, s = torch.rand(shape, device=DEVICE) * -10, torch.rand(shape, device=DEVICE) * 2 - 1
    op = _ops.op(backend, "quantize_pot_ps")
    benchmark(cuda_synced(lambda: op(p, s, 5, None)))


@pytest.mark.parametrize("impl", ["mult", "shift-q", "shift-ps"])
@pytest.mark.parametrize("layer", C["layers"], ids=lambda c: f"{c[0]}{c[1]}")
def test_layer_train_step(benchmark, layer, impl):
    kind, xs, ws = layer
    x = torch.randn(xs, device=DEVICE, requires_grad=True)
    w = torch.randn(ws, device=DEVICE, requires_grad=True)
    s = (torch.rand(ws, device=DEVICE) * 2 - 1).requires_grad_()
    pad = {"padding": 1} if kind == "conv" else {}
    if impl == "mult":
        f, params = (lambda: (F.conv2d if kind == "conv" else F.linear)(x, w, **pad)), (x, w)
    else:
        shift = SF.shift_conv2d if kind == "conv" else SF.shift_linear
        mode = impl.split("-")[1]
        kw = {"mode": mode, **({"sign": s} if mode == "ps" else {})}
        f, params = (lambda: shift(x, w, **pad, **kw)), ((x, w, s) if mode == "ps" else (x, w))
    g = torch.randn_like(f())
    benchmark(cuda_synced(lambda: torch.autograd.grad(f(), params, g)))


P_BACKENDS = [b for b in ("cuda", "triton", "cpu")
              if _dispatch.why_not(b, "shift_linear_packed", DEVICE, torch.float32) is None]


@pytest.mark.parametrize("impl", ["dense"] + P_BACKENDS)
@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("shape", [c[0] for c in C["packed"]], ids=str)
def test_packed_linear(benchmark, shape, batch, impl):
    from shiftadd import pack_pot

    p, s = torch.rand(shape, device=DEVICE) * -7, torch.rand(shape, device=DEVICE) * 2 - 1
    w = _ops.op("reference", "quantize_pot_ps")(p, s, 4, None)
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    x = torch.randn((batch, shape[1]), device=DEVICE, dtype=dtype)
    if impl == "dense":
        wd = w.to(dtype)
        benchmark(cuda_synced(lambda: F.linear(x, wd)))
        return
    pk = pack_pot(w, 4)
    op = _ops.op(impl, "shift_linear_packed")
    benchmark(cuda_synced(lambda: op(x, pk.codes, pk.scales, pk.zero_codes, pk.bits, *shape, None)))
