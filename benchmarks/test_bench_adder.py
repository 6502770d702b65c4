"""The cases of shiftadd/bench/adder.py under pytest-benchmark."""

import pytest
import torch
from conftest import DEVICE, cuda_synced

from shiftadd import _ops
from shiftadd.bench.adder import CASES, backends_for, cdist_adder, mult_layer, unfold_adder, unfold_bytes, available_bytes

CASE_LIST = CASES[DEVICE.type]
IMPLS = ["unfold", "cdist", "mult"] + backends_for("adder_conv2d", DEVICE, include_reference=False)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASE_LIST, ids=[c.name for c in CASE_LIST])
def test_forward(benchmark, case, impl):
    torch.manual_seed(0)
    x, w = torch.randn(case.x, device=DEVICE), torch.randn(case.w, device=DEVICE)
    if impl == "unfold":
        if unfold_bytes(case) > 0.5 * available_bytes(DEVICE):
            pytest.skip("unfold needs more memory than is available")
        fn = lambda: unfold_adder(case, x, w)  # noqa: E731
    elif impl == "cdist":
        fn = lambda: cdist_adder(case, x, w)  # noqa: E731
    elif impl == "mult":
        fn = lambda: mult_layer(case, x, w)  # noqa: E731
    else:
        op = _ops.op(impl, case.family)
        fn = lambda: op(x, w, *case.args(), "addernet")  # noqa: E731
    benchmark.extra_info["G adder-MAC"] = case.macs / 1e9
    benchmark(cuda_synced(fn))


@pytest.mark.parametrize("impl", backends_for("adder_conv2d", DEVICE, include_reference=False))
@pytest.mark.parametrize("case", CASE_LIST, ids=[c.name for c in CASE_LIST])
def test_train_step(benchmark, case, impl):
    torch.manual_seed(0)
    x = torch.randn(case.x, device=DEVICE, requires_grad=True)
    w = torch.randn(case.w, device=DEVICE, requires_grad=True)
    op = _ops.op(impl, case.family)
    g = torch.randn_like(op(x.detach(), w.detach(), *case.args(), "addernet"))
    benchmark(cuda_synced(lambda: torch.autograd.grad(op(x, w, *case.args(), "addernet"), (x, w), g)))
