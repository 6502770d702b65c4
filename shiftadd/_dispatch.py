"""The one place a backend is chosen, and the reasons every other one was not.

Backends, in the order ``auto`` tries them for each device type:

==============  =====================================================================
``cuda``        compiled CUDA kernels in ``shiftadd._C`` (CUDA tensors)
``triton``      Triton kernels in ``shiftadd._triton`` (CUDA tensors; CPU tensors
                only under ``TRITON_INTERPRET=1``, and only when forced)
``cpu``         compiled C++/OpenMP kernels in ``shiftadd._C`` (CPU tensors)
``reference``   pure PyTorch (``shiftadd.reference``): any device, always available
==============  =====================================================================

``auto`` on CUDA tensors: cuda, then triton, then reference, but only GPU backends
listed in ``GPU_VALIDATED`` (those whose kernels have passed the test suite on a GPU;
today ``cuda``) are chosen automatically; the others run when forced.  On CPU tensors: cpu, then
reference.  On any other device: reference.  ``SHIFTADD_BACKEND=<name>`` (read at
import) or ``with shiftadd.use_backend(name):`` force one backend; forcing one that
cannot run the call raises :class:`BackendUnavailable` with the reason.

The choice is made in Python before the op is called, from module-level state only, so
``torch.compile`` traces it without a graph break (and guards on it).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings

import torch

from . import _ops

BACKENDS = ("cuda", "triton", "cpu", "reference")

AUTO_ORDER = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cpu", "reference"),
}

# dtypes each backend computes in (others raise or fall back with the reason)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
DTYPES = {
    "cuda": (torch.float16, torch.bfloat16, torch.float32),
    "triton": (torch.float16, torch.bfloat16, torch.float32),
    "cpu": _FLOATS,
    "reference": _FLOATS,
}


# GPU backends whose kernels have passed tests/ on a real GPU; `auto` uses only these.
# "cuda": H100 (torch 2.11, CUDA 13.0), 2026-11-22: tests/test_cuda.py and the cuda cases of
# the other test files passed, and compute-sanitizer memcheck found no error in the
# subset it ran (scripts/gpu_validate.sh).  Raw torch.ops calls of its quantizers with bad
# arguments crashed there (test_quantizers_reject_bad_arguments); the public functions
# validate those arguments in Python before dispatch.
# 2026-11-23, H100 again: the kernels written since (fp16x2 and int8 adder forwards, the
# quantizers with out_dtype, the packed GEMV, the tiled-kernel choices of kernels.h Tuning)
# passed their GPU tests, and compute-sanitizer memcheck found no error in the part of its
# subset that ran in its time limit.  The raw quantizer bad-argument crash is still open.
# "triton" is not listed: its adder property tests did not finish inside the time limit on
# the 2026-11-22 run, and on 2026-11-23 its packed linear took 2.1-9.5x the cuda kernel's
# time and 4.6-8.6x cuBLAS bf16's with the decoded weight (benchmarks/RESULTS.md).
# Order on CUDA (AUTO_ORDER): cuda before triton, because cuda's forward was faster on every
# benchmark shape of both runs (1.0-2.1x).
GPU_VALIDATED: frozenset = frozenset({"cuda"})
# (backend, family) pairs of a validated backend whose kernels have not yet run on a GPU:
# `auto` skips them until a GPU run passes their tests (tests/test_cuda.py) and measures them.
# None since the 2026-11-23 run; new kernels go here until a GPU run has passed their tests.
GPU_NOT_YET_RUN: dict = {}
# A validation run on a new GPU or toolkit can let `auto` use backends not yet listed:
# SHIFTADD_GPU_VALIDATED=cuda,triton (read at import).
_extra = {b.strip().lower() for b in os.environ.get("SHIFTADD_GPU_VALIDATED", "").split(",") if b.strip()}
if _extra - {"cuda", "triton"}:
    raise ValueError(f"SHIFTADD_GPU_VALIDATED={os.environ['SHIFTADD_GPU_VALIDATED']!r}: only cuda and triton are GPU backends")
GPU_VALIDATED = GPU_VALIDATED | frozenset(_extra)


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run this call; the message says why."""


# --------------------------------------------------------------------------------------
# What is available in this process (computed once, at import)
# --------------------------------------------------------------------------------------

_C = None
_C_ERROR: str | None = None
_TRITON_ERROR: str | None = None
_TRITON_FAMILIES: tuple = ()


def _load_extension() -> None:
    global _C, _C_ERROR
    if os.environ.get("SHIFTADD_DISABLE_EXT", "0") == "1":
        _C_ERROR = "disabled by SHIFTADD_DISABLE_EXT=1"
        return
    if importlib.util.find_spec(__package__ + "._C") is None:
        _C_ERROR = ("shiftadd._C is not built (installed with SHIFTADD_BUILD_EXT=0, or without torch or a compiler "
                    "at build time); build it with `pip install --no-build-isolation .`")
        return
    try:
        from . import _C as ext  # registers the CPU (and CUDA) kernels of the compiled ops
    except ImportError as e:
        _C_ERROR = f"shiftadd._C failed to load ({e}); rebuild with `pip install --no-build-isolation .`"
        return
    _C = ext


def _load_triton() -> None:
    global _TRITON_ERROR, _TRITON_FAMILIES
    if importlib.util.find_spec("triton") is None:
        _TRITON_ERROR = "triton is not installed (pip install shiftadd[triton])"
        return
    if not hasattr(torch.library, "triton_op"):
        _TRITON_ERROR = f"torch {torch.__version__} has no torch.library.triton_op (needs torch >= 2.6)"
        return
    if not (torch.cuda.is_available() or interpret_mode()):
        _TRITON_ERROR = "no CUDA device is visible (TRITON_INTERPRET=1 runs the Triton kernels on the CPU, for tests)"
        return
    try:
        from . import _triton

        _ops.register_triton(_triton.FAMILIES)
    except Exception as e:  # a broken triton install must not break `import shiftadd`
        _TRITON_ERROR = f"shiftadd._triton failed to load: {type(e).__name__}: {e}"
        return
    _TRITON_FAMILIES = tuple(_triton.FAMILIES)


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _compiled_cuda() -> bool:
    return _C is not None and bool(getattr(_C, "with_cuda", False))


_KERNELS: dict = {}


def _has_kernel(family: str, key: str) -> bool:
    """Whether the compiled op of `family` has a kernel registered for dispatch key `key`."""
    if (family, key) not in _KERNELS:
        _KERNELS[(family, key)] = torch._C._dispatch_has_kernel_for_dispatch_key("shiftadd::" + family, key)
    return _KERNELS[(family, key)]


def backend_error(name: str) -> str | None:
    """Why `name` cannot run at all in this process, or None."""
    if name == "reference":
        return None
    if name == "cpu":
        return _C_ERROR
    if name == "cuda":
        if _C is None:
            return _C_ERROR
        if not _compiled_cuda():
            return ("shiftadd._C was built without CUDA (torch had no CUDA or no CUDA toolkit was found at build time; "
                    "rebuild with CUDA_HOME set or FORCE_CUDA=1)")
        if not torch.cuda.is_available():
            return "no CUDA device is visible"
        return None
    if name == "triton":
        return _TRITON_ERROR
    raise ValueError(f"unknown backend {name!r}; choose from {BACKENDS}")


def why_not(name: str, family: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why backend `name` cannot run op `family` on tensors of this device and dtype."""
    err = backend_error(name)
    if err is not None:
        return err
    fams = _TRITON_FAMILIES if name == "triton" else _ops.FAMILIES[name]
    if family not in fams or (name == "cuda" and not _has_kernel(family, "CUDA")):
        return f"the {name} backend has no kernel for {family}"
    dev = device.type
    if name == "cpu" and dev != "cpu":
        return f"the cpu backend serves CPU tensors; these are on {device}"
    if name == "cuda" and dev != "cuda":
        return f"the cuda backend serves CUDA tensors; these are on {device}"
    if name == "triton" and dev != "cuda" and not (dev == "cpu" and interpret_mode()):
        return f"the triton backend serves CUDA tensors; these are on {device}"
    if name == "triton" and dev == "cpu" and dtype == torch.bfloat16:
        return "the Triton interpreter cannot compute in bfloat16"
    if dtype not in DTYPES[name]:
        return f"the {name} backend does not compute in {dtype}"
    return None


# --------------------------------------------------------------------------------------
# Forcing a backend
# --------------------------------------------------------------------------------------

_forced: str = os.environ.get("SHIFTADD_BACKEND", "auto").strip().lower() or "auto"


@contextlib.contextmanager
def use_backend(name: str):
    """Force `name` ("cuda", "triton", "cpu", "reference" or "auto") inside the block.

    The setting is process-wide (not per thread).  Compiled graphs guard on it: code
    compiled under one backend recompiles when another is forced.
    """
    global _forced
    name = name.strip().lower()
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"unknown backend {name!r}; choose from {BACKENDS + ('auto',)}")
    old, _forced = _forced, name
    try:
        yield
    finally:
        _forced = old


def forced_backend() -> str:
    return _forced


# --------------------------------------------------------------------------------------
# The choice
# --------------------------------------------------------------------------------------


def select(family: str, x: torch.Tensor) -> str:
    """The backend that runs `family` on tensors like `x` (device and dtype)."""
    return select_on(family, x.device, x.dtype)


def select_on(family: str, device: torch.device, dtype: torch.dtype) -> str:
    """:func:`select` from a device and a dtype (the integer families, whose operands'
    dtypes the DTYPES table does not list, pass the float32 of their float twins)."""
    forced = _forced
    if forced != "auto":
        if forced not in BACKENDS:
            raise BackendUnavailable(f"SHIFTADD_BACKEND={forced!r} is not a backend; choose from {BACKENDS + ('auto',)}")
        reason = why_not(forced, family, device, dtype)
        if reason is not None:
            raise BackendUnavailable(f"backend {forced!r} was forced but cannot run shiftadd.{family} on "
                                     f"{device} {dtype}: {reason}")
        return forced
    for name in AUTO_ORDER.get(device.type, ("reference",)):
        if why_not(name, family, device, dtype) is None and auto_eligible(name, family):
            return name
    return "reference"


def auto_eligible(name: str, family: str | None = None) -> bool:
    """CPU backends always; GPU backends once validated on a GPU (GPU_VALIDATED), except
    the families listed in GPU_NOT_YET_RUN."""
    if name in ("cpu", "reference"):
        return True
    return name in GPU_VALIDATED and (name, family) not in GPU_NOT_YET_RUN


def get_op(family: str, x: torch.Tensor):
    """The registered op of the backend :func:`select` picks."""
    return _ops.op(select(family, x), family)


ACCUMULATE = ("fp32", "fp16x2")


def adder_forward_op(family: str, x: torch.Tensor, accumulate: str = "fp32"):
    """The op for the adder forward `family` ("adder_linear" / "adder_conv2d") on tensors like x.

    accumulate "fp16x2" with float16 x takes the family's fp16x2 variant (float16 partial
    sums) where the backend that would run has it: "cuda" (under auto only once it is
    validated, see GPU_NOT_YET_RUN), or "cuda" / "reference" when forced.  Otherwise the
    float32-accumulating op of :func:`get_op`, which is never less accurate: the cpu and
    triton backends have no fp16x2 kernel, and other dtypes have no fp16x2 arithmetic."""
    if accumulate == "fp16x2":
        name = fp16x2_backend(family, x.device, x.dtype)
        if name is not None:
            return _ops.op(name, family + "_fp16x2")
    return get_op(family, x)


def fp16x2_backend(family: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """The backend that runs `family` with accumulate="fp16x2" in fp16x2 arithmetic, or None
    where the float32-accumulating op runs instead (:func:`adder_forward_op`)."""
    if dtype != torch.float16 or _forced not in BACKENDS + ("auto",):  # get_op names a bad forced name
        return None
    fam = family + "_fp16x2"
    name = "cuda" if _forced == "auto" else _forced
    if why_not(name, fam, device, dtype) is None and (_forced != "auto" or auto_eligible(name, fam)):
        return name
    return None


def explain(device: str | torch.device = "cpu", family: str = "adder_conv2d",
            dtype: torch.dtype = torch.float32) -> dict:
    """{backend: None if usable, else the reason} for one op on one device, plus the
    backend ``auto`` would pick (key "auto")."""
    device = torch.device(device)
    out = {name: why_not(name, family, device, dtype) for name in BACKENDS}
    order = AUTO_ORDER.get(device.type, ("reference",))
    out["auto"] = next((n for n in order if out[n] is None and auto_eligible(n, family)), "reference")
    return out


_warned = False


def warn_once_if_degraded() -> None:
    """One warning per process when the compiled extension is missing, naming what runs instead."""
    global _warned
    if _warned or _C is not None:
        return
    _warned = True
    # what `auto` gives CUDA tensors without the extension: triton only once it is validated
    cuda_sub = "triton" if _TRITON_ERROR is None and "triton" in GPU_VALIDATED else "reference"
    forced = "" if cuda_sub == "triton" or _TRITON_ERROR is not None else " (triton when forced)"
    warnings.warn(
        f"shiftadd: compiled kernels unavailable: {_C_ERROR}. CPU tensors use the 'reference' backend"
        f" (pure PyTorch, much slower); CUDA tensors use '{cuda_sub}'{forced}. `python -m shiftadd.info` shows "
        "details.", RuntimeWarning, stacklevel=3)


_load_extension()
_load_triton()
