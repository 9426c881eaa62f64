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


class _HostEvent:
    """A CPU stand-in for ``torch.cuda.Event``: records ``perf_counter``."""

    def __init__(self, enable_timing=True):
        self.t = None

    def record(self):
        import time
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


def test_interleaved_ms_alternates_the_order_and_reports_each_burst(monkeypatch):
    from lvsa_kernels import timing

    monkeypatch.setattr(torch.cuda, "Event", _HostEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "clock_rate", lambda device=None: 1500)
    monkeypatch.setattr(torch.cuda, "power_draw", lambda device=None: 600_000)
    order = []
    fns = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    got = timing.interleaved_ms(fns, torch.device("cuda"), rounds=3, burst=2)
    # one untimed burst of each, then rounds A B, B A, A B: every burst `burst` calls back to back
    assert "".join(order) == "aabb" + "aabb" + "bbaa" + "aabb"
    assert set(got) == {"a", "b"} and all(len(r["round_ms"]) == 3 and r["ms"] >= 0 for r in got.values())
