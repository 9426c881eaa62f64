"""`lvsa_kernels.timing`, the one timer of the library and the benchmarks (CPU paths; CUDA uses events/do_bench)."""
import torch

from lvsa_kernels.timing import bench_ms, call_seconds, median_seconds, wall_seconds

CPU = torch.device("cpu")


def test_call_seconds_counts_warmup_and_builds_fresh_inputs_untimed():
    seen = []
    times = call_seconds(seen.append, CPU, repeats=3, warmup=2, args=lambda i: (10 - i,))
    assert seen == [10, 9, 8, 7, 6] and len(times) == 3 and all(t >= 0 for t in times)
    calls = []
    assert median_seconds(lambda: calls.append(1), CPU, 4, warmup=0) >= 0 and len(calls) == 4


def test_wall_seconds_times_between_syncs():
    log = []
    times = wall_seconds(lambda: log.append("call"), lambda: log.append("sync"), repeats=2, warmup=1)
    assert log == ["call", "sync", "call", "sync", "sync", "call", "sync"] and len(times) == 2


def test_bench_ms_runs_at_least_min_iters_after_a_warmup():
    calls = []
    got = bench_ms(lambda: calls.append(1), CPU, warmup_ms=0, rep_ms=0, min_iters=5)
    assert got["iters"] == 5 and len(calls) == 6 and got["ms"] >= 0
