"""Fixtures for the pytest-benchmark attention suite (``python3 -m pytest bench -q --benchmark-only``).

Environment: ``LVSA_BENCH_CASES`` (case/group names, default ``all``), ``LVSA_BENCH_METHODS`` (default: the
GPU method list of `lvsa_kernels.bench.baselines`), ``LVSA_BENCH_REF_STRIDE`` (check every n-th query block).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict

import pytest
import torch

from lvsa_kernels.bench import harness
from lvsa_kernels.bench.shapes import BenchCase


@pytest.fixture(scope="session")
def case_data() -> Callable[[BenchCase], Dict[str, Any]]:
    """``case_data(case)`` -> dict(q, k, v, layout, ref, idx, ref_info) for the case, built once.

    Only the most recent case is kept, so GPU memory holds one case's inputs and reference at a time
    (parametrisation is ordered case by case).
    """
    cache: Dict[str, Any] = {}
    stride = int(os.environ.get("LVSA_BENCH_REF_STRIDE", "1"))

    def get(case: BenchCase) -> Dict[str, Any]:
        if cache.get("name") != case.name:
            cache.clear()
            torch.cuda.empty_cache()
            layout = case.layout()
            q, k, v = harness.make_inputs(case, torch.device("cuda"), harness.case_seed_offset(case.name))
            ref, idx, info = harness.reference_output(q, k, v, layout, stride)
            cache.update(name=case.name, data=dict(q=q, k=k, v=v, layout=layout, ref=ref, idx=idx, ref_info=info))
        return cache["data"]

    return get
