"""The benchmark's timing: calls timed one by one (CUDA synchronised), compared paths called in
turn on the same batches, and the summary figures of `tta bench` (runtime/lab/bench*.py)."""
from __future__ import annotations

import statistics
import time

import numpy as np
import torch


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, x, device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn(x)
    _sync(device)
    return time.perf_counter() - start


def paired_times(fns, batches, device, warmup: int = 2) -> list[list[float]]:
    """Seconds per call of each of fns, called in turn on the same batches, so that all see the
    same machine load (their ratios are what is reported)."""
    for x in batches[:warmup]:
        for fn in fns:
            fn(x)
    times = [[] for _ in fns]
    for x in batches[warmup:]:
        for fn, t in zip(fns, times):
            t.append(time_call(fn, x, device))
    return times


def median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile, nearest-rank (p99 of 20 requests is the slowest one)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(np.ceil(q / 100 * len(ordered))) - 1))]
