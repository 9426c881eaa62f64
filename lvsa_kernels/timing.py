"""The one timer shared by dispatch, the demo and the benches: per-call seconds (CUDA events on CUDA), wall seconds
between caller-given synchronisations (multi-process steps), and ``do_bench``-style medians over a time budget."""
from __future__ import annotations

import statistics
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["bench_ms", "call_seconds", "interleaved_ms", "median_seconds", "synchronize", "wall_seconds"]


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type != "cpu":
        sync = getattr(getattr(torch, device.type, None), "synchronize", None)
        if callable(sync):
            sync()


def call_seconds(fn: Callable[..., object], device: torch.device, repeats: int, warmup: int = 1,
                 args: Optional[Callable[[int], Sequence[Any]]] = None) -> List[float]:
    """``warmup`` untimed calls, then the seconds of each of ``repeats`` calls.

    CUDA: events around each call (after a device synchronisation); other devices: ``perf_counter`` between
    device synchronisations. ``args(i)``, when given, builds call ``i``'s positional arguments outside the timed
    region (``i`` counts warm-up calls first), for calls that need fresh inputs (e.g. a new timestep each).
    """
    def inputs(i: int) -> Sequence[Any]:
        return () if args is None else tuple(args(i))

    for i in range(warmup):
        fn(*inputs(i))
    times = []
    for i in range(warmup, warmup + repeats):
        a = inputs(i)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn(*a)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            synchronize(device)
            t0 = time.perf_counter()
            fn(*a)
            synchronize(device)
            times.append(time.perf_counter() - t0)
    return times


def median_seconds(fn: Callable[..., object], device: torch.device, repeats: int, warmup: int = 1,
                   args: Optional[Callable[[int], Sequence[Any]]] = None) -> float:
    """The median of `call_seconds` (same arguments)."""
    return statistics.median(call_seconds(fn, device, repeats, warmup, args))


def wall_seconds(fn: Callable[[], object], sync: Callable[[], None], repeats: int, warmup: int = 0) -> List[float]:
    """``warmup`` untimed calls, then the ``perf_counter`` seconds of each of ``repeats`` calls, each timed from a
    ``sync()`` to a ``sync()`` (e.g. a device synchronisation plus a process-group barrier, so the time is the
    slowest rank's)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def bench_ms(fn: Callable[[], object], device: torch.device, warmup_ms: float, rep_ms: float,
             min_iters: Optional[int] = None) -> Dict[str, float]:
    """Median milliseconds per call over a time budget, as ``{"ms": ..., <how it was run>}``.

    CUDA: ``triton.testing.do_bench(fn, warmup_ms, rep_ms, return_mode="median")``; with ``min_iters`` (not None)
    one call is timed first (``single_call_ms``) and the budgets are raised to ``warmup >= one call`` and
    ``rep >= min_iters`` calls (``rep_ms`` reported). Other devices: one warm-up call, then calls timed with
    ``perf_counter`` until at least ``min_iters`` ran and ``rep_ms`` passed (``iters`` reported).
    """
    if device.type == "cuda":
        import triton.testing

        info: Dict[str, float] = {}
        warmup, rep = warmup_ms, rep_ms
        if min_iters is not None:
            est = call_seconds(fn, device, 1, warmup=0)[0] * 1e3
            warmup, rep = max(warmup_ms, est), max(rep_ms, min_iters * est)
            info = {"rep_ms": round(rep, 1), "single_call_ms": round(est, 3)}
        ms = triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
        return {"ms": float(ms), **info}
    fn()  # warm-up
    times: List[float] = []
    t_end = time.perf_counter() + rep_ms / 1e3
    while len(times) < (min_iters or 0) or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"ms": statistics.median(times), "iters": len(times)}


def interleaved_ms(fns: Dict[str, Callable[[], object]], device: torch.device, rounds: int, burst: int,
                   sample_clocks: bool = True) -> Dict[str, Dict[str, Any]]:
    """Per-call milliseconds of several functions timed alternately on one CUDA device.

    Each of ``rounds`` rounds runs every function ``burst`` times back to back, timed with CUDA events around the
    burst (no cache flush between calls), in an order that reverses every round (A B, then B A), so drift in
    clocks, temperature or memory state falls on each function alike. One untimed burst of each comes first.
    Returns ``{name: {"ms": median per-call ms, "round_ms": [...], "sm_mhz": ..., "power_w": ...}}``; the last two
    are means of samples taken every 5 ms while that function's bursts ran (`torch.cuda.clock_rate` /
    ``power_draw``; omitted without NVML)."""
    names = list(fns)
    samples: Dict[str, List[Tuple[float, float]]] = {n: [] for n in names}
    current: List[Optional[str]] = [None]
    stop = threading.Event()

    def sampler() -> None:
        while not stop.wait(0.005):
            name = current[0]
            if name is not None:
                try:
                    samples[name].append((float(torch.cuda.clock_rate(device)), torch.cuda.power_draw(device) / 1e3))
                except Exception:  # noqa: BLE001 - no NVML here: no clock readings
                    return

    def run_burst(name: str) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        current[0] = name
        start.record()
        for _ in range(burst):
            fns[name]()
        end.record()
        end.synchronize()
        current[0] = None
        return start.elapsed_time(end) / burst

    for name in names:
        run_burst(name)
    thread = threading.Thread(target=sampler, daemon=True) if sample_clocks else None
    if thread is not None:
        thread.start()
    round_ms: Dict[str, List[float]] = {n: [] for n in names}
    try:
        for r in range(rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                round_ms[name].append(run_burst(name))
    finally:
        stop.set()
        if thread is not None:
            thread.join()
    result: Dict[str, Dict[str, Any]] = {}
    for name in names:
        result[name] = {"ms": statistics.median(round_ms[name]), "round_ms": [round(t, 3) for t in round_ms[name]]}
        if samples[name]:
            result[name]["sm_mhz"] = round(statistics.fmean(c for c, _ in samples[name]))
            result[name]["power_w"] = round(statistics.fmean(w for _, w in samples[name]), 1)
    return result
