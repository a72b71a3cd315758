"""Peak memory of a call, measured the same way on CPU and GPU.

CUDA: the caching allocator's own peak counter. CPU: torch has no allocator statistics, so the
profiler's memory events are replayed in time order (each op's *self* allocations and frees,
plus frees outside ops) and the running total's maximum is the peak of live tensor bytes.
Temporaries an op allocates and frees inside itself are invisible to that replay; for the
ops measured here (matmul, softmax, fused SDPA) those are per-thread tiles, not N×N buffers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile


def peak_bytes(fn: Callable[[], Any], device: str = "cpu") -> tuple[int, Any]:
    """``(peak extra bytes while fn runs, fn's result)``; bytes live before the call are not counted."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, result
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    deltas = sorted(
        (e.time_range.start, e.self_cpu_memory_usage if e.name != "[memory]" else e.cpu_memory_usage)
        for e in prof.events()
        if (e.self_cpu_memory_usage if e.name != "[memory]" else e.cpu_memory_usage)
    )
    live = peak = 0
    for _, d in deltas:
        live += d
        peak = max(peak, live)
    return peak, result


def median_seconds(fn: Callable[[], Any], repeat: int = 3, device: str = "cpu") -> float:
    """Median wall time of ``repeat`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeat):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]
