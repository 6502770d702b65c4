"""Timing and table helpers shared by the benchmarks."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .._timing import measure, sync  # noqa: F401  (re-exported for the benchmarks)


def peak_memory(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak bytes allocated by fn() above what was allocated before (CUDA only)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def environment(device: torch.device) -> str:
    from .. import __version__, _dispatch

    parts = [f"shiftadd {__version__}", f"torch {torch.__version__}"]
    if device.type == "cuda":
        parts += [torch.cuda.get_device_name(device), f"CUDA {torch.version.cuda}"]
        try:
            import triton

            parts.append(f"triton {triton.__version__}")
        except ImportError:
            pass
    else:
        isa = _dispatch._C.cpu_isa() if _dispatch._C is not None else "no extension"
        parts += [f"CPU threads {torch.get_num_threads()}", f"ISA {isa}"]
    return ", ".join(parts)
