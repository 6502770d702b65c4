"""``python -m shiftadd.info`` / ``shiftadd info``: versions, which backend serves which
device for each operator, and why the others do not."""

from __future__ import annotations

import os
import platform
import sys

import torch

from . import __version__, _dispatch, _ops


# (what, variable, values, default when unset) of the CUDA adder kernel choices
CUDA_TUNING = (("adder reduction splits", "SHIFTADD_CUDA_SPLIT_K", "auto | off | N", "off"),
               ("adder forward tiles", "SHIFTADD_CUDA_TILES", "fit | classic", "fit"),
               ("AdderNet-mode grad input form", "SHIFTADD_CUDA_GIN", "sat | clamp", "sat"))


def report() -> str:
    lines = [f"shiftadd {__version__}", f"python {platform.python_version()} ({sys.executable})",
             f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}; "
             f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} GPU visible)"]
    try:
        import triton

        lines.append(f"triton {triton.__version__}" + (" (TRITON_INTERPRET=1)" if _dispatch.interpret_mode() else ""))
    except ImportError:
        lines.append("triton not installed")
    if _dispatch._C is not None:
        c = _dispatch._C
        lines.append(f"compiled extension: loaded from {c.__file__}")
        lines.append(f"  CPU kernels: instruction set {c.cpu_isa()} (supported here: {', '.join(c.cpu_isas())})")
        lines.append(f"  CUDA kernels: {'built' if c.with_cuda else 'not built'}")
        if c.with_cuda:  # the kernel choices csrc/cuda/adder.cpp reads (tuning_from_env), with its defaults
            for what, var, values, default in CUDA_TUNING:
                value = os.environ.get(var) or f"{default} (the default)"
                lines.append(f"  CUDA {what} ({var} = {values}): {value}")
    else:
        lines.append(f"compiled extension: NOT loaded: {_dispatch._C_ERROR}")
    lines.append(f"forced backend: {_dispatch.forced_backend()} (SHIFTADD_BACKEND / shiftadd.use_backend)")
    validated = ", ".join(sorted(_dispatch.GPU_VALIDATED)) or "none yet (not run on a GPU; force one to use it)"
    lines.append(f"GPU backends auto may choose: {validated}")
    for (name, family), why in sorted(_dispatch.GPU_NOT_YET_RUN.items()):
        lines.append(f"  except {name} for {family}: {why}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        lines.append("")
        lines.append(f"device {dev}, float32:")
        width = max(len(f) for f in _ops.SCHEMAS)
        for family in _ops.SCHEMAS:
            if family in _ops.FP16X2_SCHEMAS:  # reached through accumulate="fp16x2", float16 only
                base = family.removesuffix("_fp16x2")
                name = _dispatch.fp16x2_backend(base, torch.device(dev), torch.float16)
                if name is None:
                    try:
                        name = f"{_dispatch.select_on(base, torch.device(dev), torch.float16)} {base} (float32 sums)"
                    except _dispatch.BackendUnavailable as e:
                        name = f"none ({e})"
                lines.append(f"  {family:<{width}}  accumulate='fp16x2' on float16 -> {name}")
                continue
            e = _dispatch.explain(dev, family)
            lines.append(f"  {family:<{width}}  auto -> {e['auto']}")
        lines.append("  why not the others:")
        seen = set()
        for family in _ops.SCHEMAS:
            for name in _dispatch.BACKENDS:
                reason = _dispatch.why_not(name, family, torch.device(dev), torch.float32)
                if reason is not None and (name, reason) not in seen:
                    seen.add((name, reason))
                    lines.append(f"    {name}: {reason}")
    return "\n".join(lines)


def main(argv=None) -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
