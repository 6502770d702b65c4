"""Shared test setup: which backends run here, tolerances per dtype, helpers.

Without a GPU, Triton kernels run under the Triton interpreter (TRITON_INTERPRET=1 is set
here, before shiftadd is imported) on tiny shapes, as the CI does.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# one launch config per Triton kernel: autotuning each random test shape would take minutes
os.environ.setdefault("SHIFTADD_TRITON_AUTOTUNE", "0")

import shiftadd  # noqa: E402
from shiftadd import _dispatch, _ops  # noqa: E402

try:
    from hypothesis import HealthCheck, settings

    settings.register_profile("default", max_examples=20, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    settings.register_profile("thorough", max_examples=300, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
except ImportError:  # pragma: no cover
    pass

# CUDA cases carry the gpu marker (`-m gpu` selects them; they are absent without a GPU)
DEVICES = ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.gpu)] if torch.cuda.is_available() else [])

# norm-wise relative error allowed against the float64 reference
RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    den = ref.norm().item()
    num = (out - ref).norm().item()
    return num / den if den > 0 else num


def assert_close_rel(out, ref, dtype, what=""):
    err = rel_err(out, ref)
    assert err <= RTOL[dtype], f"{what}: relative error {err:.3g} > {RTOL[dtype]:.0e} ({dtype})"


def fast_backends(family: str, device: str, dtype: torch.dtype):
    """Every non-reference backend that can run `family` here (the ones under test)."""
    dev = torch.device(device)
    return [b for b in ("cuda", "triton", "cpu") if _dispatch.why_not(b, family, dev, dtype) is None]


def is_interpreted(backend: str, device: str) -> bool:
    return backend == "triton" and device == "cpu"


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def op(backend, family):
    return _ops.op(backend, family)


def cpu_isas():
    return list(_dispatch._C.cpu_isas()) if _dispatch._C is not None else []
