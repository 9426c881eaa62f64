"""pytest-benchmark suite: every benchmark case x method, checked against the float32 reference, then timed.

Run on a CUDA machine: ``python3 -m pytest bench -q --benchmark-only`` (select with ``LVSA_BENCH_CASES`` /
``LVSA_BENCH_METHODS``, see conftest.py). Without CUDA every test is skipped (pytest exits 0).
The one-process table with ratios between methods comes from ``bench/run_gpu.py``; this suite stores
per-test ``extra_info`` (density, effective TFLOP/s, error) in pytest-benchmark's JSON.
"""
from __future__ import annotations

import os

import pytest
import torch

from lvsa_kernels.bench import harness
from lvsa_kernels.bench.baselines import GPU_DEFAULT_METHODS, METHODS, MethodSkipped
from lvsa_kernels.bench.shapes import select_cases
from lvsa_kernels.timing import call_seconds

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="attention benchmarks need a CUDA device")

_CASES = select_cases(os.environ.get("LVSA_BENCH_CASES", "all"))
_METHODS = [m for m in os.environ.get("LVSA_BENCH_METHODS", ",".join(GPU_DEFAULT_METHODS)).split(",") if m]
_PARAMS = [(c, m) for c in _CASES for m in _METHODS]  # case-major: the case_data cache holds one case


@pytest.mark.parametrize("case,method", _PARAMS, ids=[f"{c.name}-{m}" for c, m in _PARAMS])
def test_attention(benchmark, case_data, case, method):
    m = METHODS[method]
    d = case_data(case)
    q, k, v, layout = d["q"], d["k"], d["v"], d["layout"]
    reason = m.skip_reason(q, k, layout, case)
    if reason:
        pytest.skip(reason)
    try:
        prepared = m.prepare(q, k, v, layout, case)
    except MethodSkipped as exc:
        pytest.skip(str(exc))
    out, poison = harness.checked_run(prepared, q)
    nonfinite = int((~torch.isfinite(out)).sum())
    assert nonfinite == 0, f"{method}: {nonfinite} non-finite output elements ({poison})"
    info = {"density": layout.density, "poison": poison, "reference": d["ref_info"]["mode"], **prepared.info}
    if layout.is_dense or not m.dense:
        err = harness.output_errors(out, d["ref"], d["idx"])
        info.update(err)
        assert err["rel_err"] <= (m.tolerance or harness.TOLERANCE[q.dtype]), f"{method}: {err} vs float32 reference"
    del out

    def call() -> None:
        prepared()
        torch.cuda.synchronize()

    single_ms = call_seconds(prepared, q.device, 1, warmup=0)[0] * 1e3
    rounds = min(50, max(3, int(1000.0 / max(single_ms, 1e-3))))
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)
    flops = (4.0 * case.batch * case.heads * case.head_dim * layout.q_len * layout.kv_len if m.dense
             else harness.layout_flops(layout, case.batch, case.heads, case.head_dim))
    if benchmark.stats is not None:
        info["tflops"] = flops / benchmark.stats.stats.median / 1e12
    benchmark.extra_info.update(info)
