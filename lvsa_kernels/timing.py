"""Median wall time of a callable on a device: the one timer shared by dispatch, the demo and the benches."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

__all__ = ["median_seconds", "synchronize"]


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type != "cpu":
        sync = getattr(getattr(torch, device.type, None), "synchronize", None)
        if callable(sync):
            sync()


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """``warmup`` untimed calls, then the median seconds of ``repeats`` calls.

    CUDA: events around each call; other devices: ``perf_counter`` between device synchronisations.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)
