"""Timing and table helpers shared by the benchmarks."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, min_time: float = 0.3, max_reps: int = 50,
            warmup: int = 1) -> float:
    """Median wall time of fn() in seconds, after `warmup` calls; repeats until `min_time`
    has passed (at least 3 repetitions when a call is fast, 1 when it is slow)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    start = time.perf_counter()
    while len(times) < max_reps:
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        spent = time.perf_counter() - start
        if spent >= min_time and len(times) >= 3 or spent >= 4 * min_time:
            break
    return statistics.median(times)


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
