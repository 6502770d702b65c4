"""Wall-clock timing of a callable on the CPU or a CUDA device (shared by the benchmarks
and the NAS latency table)."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, min_time: float = 0.3, max_reps: int = 50,
            warmup: int = 1, reps: Optional[int] = None) -> float:
    """Median seconds of fn() after `warmup` calls: CUDA events on a GPU, perf_counter on
    the CPU.  With `reps`, exactly that many timed calls; else repeat until `min_time` has
    passed (at least 3 calls when fn is fast, 1 when it is slow; at most `max_reps`)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    start = time.perf_counter()
    while len(times) < (reps or max_reps):
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
        if reps is None and (spent >= min_time and len(times) >= 3 or spent >= 4 * min_time):
            break
    return statistics.median(times)
