"""The dispatch point: auto choice, forcing, reasons, and running without the extension."""

import os
import subprocess
import sys

import pytest
import torch

import shiftadd
from shiftadd import _dispatch

HAS_C = _dispatch._C is not None


def run_py(code: str, **env) -> subprocess.CompletedProcess:
    e = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=300)


def test_auto_picks_the_compiled_cpu_kernels():
    x = torch.randn(2, 3)
    assert _dispatch.select("adder_linear", x) == ("cpu" if HAS_C else "reference")
    assert shiftadd.explain("cpu")["auto"] == ("cpu" if HAS_C else "reference")


def test_auto_never_picks_interpreted_triton_on_cpu():
    for family in ("adder_linear", "adder_conv2d"):
        assert _dispatch.select(family, torch.randn(1)) != "triton"


def test_use_backend_forces_and_restores():
    x, w = torch.randn(4, 5), torch.randn(3, 5)
    with shiftadd.use_backend("reference"):
        assert _dispatch.select("adder_linear", x) == "reference"
        y_ref = shiftadd.adder_linear(x, w)
    assert _dispatch.forced_backend() == "auto"
    torch.testing.assert_close(shiftadd.adder_linear(x, w), y_ref)


def test_forcing_an_unusable_backend_says_why():
    with shiftadd.use_backend("cuda"):
        with pytest.raises(shiftadd.BackendUnavailable, match="backend 'cuda' was forced but cannot run"):
            shiftadd.adder_linear(torch.randn(2, 3), torch.randn(4, 3))
    with pytest.raises(ValueError, match="unknown backend"):
        with shiftadd.use_backend("fpga"):
            pass


def test_every_unusable_backend_has_a_reason():
    e = shiftadd.explain("cpu", "adder_conv2d")
    assert e["reference"] is None
    for name in ("cuda", "triton", "cpu"):
        assert e[name] is None or len(e[name]) > 10
    if not torch.cuda.is_available():
        assert "CUDA" in e["cuda"] or "cuda" in e["cuda"]
    # a family a backend does not implement: the reason names the backend
    why = _dispatch.why_not("triton", "shift_linear_int", torch.device("cpu"), torch.float32)
    assert why is not None and "triton" in why


def test_environment_variable_forces_a_backend():
    r = run_py("import torch, shiftadd; from shiftadd import _dispatch; "
               "print(_dispatch.select('adder_conv2d', torch.randn(1)))", SHIFTADD_BACKEND="reference")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "reference"
    r = run_py("import torch, shiftadd; shiftadd.adder_linear(torch.randn(2, 3), torch.randn(4, 3))",
               SHIFTADD_BACKEND="gpu")
    assert r.returncode != 0 and "SHIFTADD_BACKEND='gpu' is not a backend" in r.stderr


def test_without_the_extension_one_warning_and_the_reference_runs():
    code = ("import warnings, torch\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    import shiftadd\n"
            "    import shiftadd.functional\n"
            "    y = shiftadd.adder_conv2d(torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3), padding=1)\n"
            "msgs = [str(x.message) for x in w if 'shiftadd' in str(x.message)]\n"
            "print(len(msgs)); print(msgs[0]); print(shiftadd.explain('cpu')['auto'], tuple(y.shape))\n")
    r = run_py(code, SHIFTADD_DISABLE_EXT="1")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0] == "1"
    assert "compiled kernels unavailable" in lines[1] and "'reference'" in lines[1]
    assert lines[2] == "reference (1, 3, 5, 5)"


def test_info_reports_backends():
    r = run_py("import shiftadd.info as i; i.main()")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert f"shiftadd {shiftadd.__version__}" in out and "torch " in out
    assert "adder_conv2d" in out and "auto ->" in out
    if HAS_C:
        assert "compiled extension: loaded" in out
    r2 = subprocess.run([sys.executable, "-m", "shiftadd", "info"], capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0 and "auto ->" in r2.stdout


def test_bench_quick_runs_and_prints_the_table():
    r = subprocess.run([sys.executable, "-m", "shiftadd", "bench", "adder", "--quick", "--no-reference"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "| case | pass | impl | ms | G adder-MAC/s" in r.stdout
    assert "unfold (AdderNet)" in r.stdout and "torch.cdist" in r.stdout
    if HAS_C:
        assert "| forward | cpu |" in r.stdout


def test_cuda_backend_needs_registered_kernels(monkeypatch):
    """A CUDA build whose kernels did not register must not be chosen (or claimed usable)."""
    monkeypatch.setattr(_dispatch, "_C", type("FakeC", (), {"with_cuda": True})())
    monkeypatch.setattr(_dispatch.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_dispatch, "_KERNELS", {})
    monkeypatch.setattr(_dispatch.torch._C, "_dispatch_has_kernel_for_dispatch_key", lambda name, key: False)
    reason = _dispatch.why_not("cuda", "adder_conv2d", torch.device("cuda"), torch.float32)
    assert reason == "the cuda backend has no kernel for adder_conv2d"


def test_gpu_backends_are_chosen_only_once_validated(monkeypatch):
    monkeypatch.setattr(_dispatch, "why_not", lambda name, fam, dev, dt: None)
    x = torch.empty(1, device="meta")
    monkeypatch.setattr(_dispatch, "AUTO_ORDER", {"meta": ("cuda", "triton", "reference")})
    monkeypatch.setattr(_dispatch, "GPU_VALIDATED", frozenset())
    assert _dispatch.select("adder_linear", x) == "reference"
    monkeypatch.setattr(_dispatch, "GPU_VALIDATED", frozenset({"triton"}))
    assert _dispatch.select("adder_linear", x) == "triton"
    monkeypatch.setattr(_dispatch, "GPU_VALIDATED", frozenset({"cuda", "triton"}))
    monkeypatch.setattr(_dispatch, "GPU_NOT_YET_RUN", {})
    assert _dispatch.select("shift_linear_packed", x) == "cuda"
    monkeypatch.setattr(_dispatch, "GPU_NOT_YET_RUN", {("cuda", "shift_linear_packed"): "not run"})
    assert _dispatch.select("shift_linear_packed", x) == "triton"  # the next in order
    assert _dispatch.select("adder_linear", x) == "cuda"  # other families of the backend are not affected
