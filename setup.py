"""Build script for shiftadd.

The compiled extension ``shiftadd._C`` is optional:

* CPU sources (``csrc/cpu``) are always built, with OpenMP.
* CUDA sources (``csrc/cuda``) are added when torch was built with CUDA *and* a CUDA
  toolkit is found (``CUDA_HOME``), or when ``FORCE_CUDA=1``.  A visible GPU is never
  required.  ``TORCH_CUDA_ARCH_LIST`` is respected; the default covers sm_80 and sm_90.
* ``SHIFTADD_BUILD_EXT=0`` skips the compiled part; the package then runs on Triton or
  the pure-PyTorch references.

Build with ``pip install --no-build-isolation -e .`` so the extension compiles against
the torch that is already installed.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name, default="0"):
    return os.environ.get(name, default).strip().lower() in ("1", "true", "yes", "on")


def _ext_modules():
    if not _flag("SHIFTADD_BUILD_EXT", "1"):
        print("shiftadd: SHIFTADD_BUILD_EXT=0, building without the compiled extension")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("shiftadd: torch is not importable at build time; building without the compiled extension. "
              "Install torch first and use `pip install --no-build-isolation .`", file=sys.stderr)
        return [], {}

    cpu_sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp"))) + [os.path.join("csrc", "registration.cpp")]
    cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-Wall", "-Wno-unknown-pragmas"]
    link_flags = ["-fopenmp"]
    include_dirs = [os.path.join(ROOT, "csrc")]

    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    with_cuda = bool(cuda_sources) and (_flag("FORCE_CUDA") or (torch.version.cuda is not None and CUDA_HOME is not None))
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext = CUDAExtension(
            "shiftadd._C",
            cpu_sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=[("SHIFTADD_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math", "-lineinfo", "-std=c++17"]},
            extra_link_args=link_flags,
        )
        print(f"shiftadd: building CPU + CUDA extension (TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})")
    else:
        ext = CppExtension(
            "shiftadd._C",
            cpu_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
        why = "torch has no CUDA" if torch.version.cuda is None else "no CUDA toolkit (CUDA_HOME) found"
        print(f"shiftadd: building the CPU extension only ({why}; FORCE_CUDA=1 overrides)")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _ext_modules()

setup(
    packages=find_packages(include=["shiftadd", "shiftadd.*"]) + ["shiftadd._triton"],
    # The Triton kernels live in triton_kernels/ but install as shiftadd._triton: the
    # top-level name `triton_kernels` belongs to the Triton project.
    package_dir={"shiftadd._triton": "triton_kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
