"""Which Triton releases get the Hopper kernel, the names bound by feature, and what `backends` says (CPU)."""
import logging

import torch
import triton

from lvsa_kernels.backends import triton_backend
from lvsa_kernels.triton_src import gluon_compat
from lvsa_kernels.triton_src.launch import hopper_device_refusal


def test_release_of_a_version_string():
    assert gluon_compat.triton_release("3.9.0") == "3.9"
    assert gluon_compat.triton_release("3.10.0+git1a2b3c") == "3.10"


def test_untested_releases_are_refused_with_the_reason():
    for version in ("3.5.1", "3.10.0", "4.0.0"):
        reason = gluon_compat.hopper_triton_refusal(version)
        assert version in reason and "3.6, 3.7, 3.8, 3.9" in reason and "portable" in reason
    assert gluon_compat.hopper_triton_refusal(triton.__version__) is None  # CI's Triton is a tested release


def test_moved_names_are_bound_to_what_this_triton_has():
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import tma

    assert gluon_compat.tma_load is getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    assert gluon_compat.cta_barrier is getattr(gl, "barrier", None) or gl.thread_barrier
    assert gluon_compat.async_load is getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
    assert (gluon_compat.async_commit_group, gluon_compat.async_wait_group) == (async_copy.commit_group,
                                                                                async_copy.wait_group)


def test_backends_and_tune_say_which_kernel_runs_here():
    assert "sm_90" in hopper_device_refusal(torch.device("cpu"))
    note = triton_backend.kernel_note()
    assert f"Triton {triton.__version__}" in note and "3.6, 3.7, 3.8, 3.9" in note
    if not torch.cuda.is_available():
        assert "needs an sm_90 GPU (none here)" in note


def test_a_refused_release_is_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(triton_backend, "_hopper_refusal_logged", False)
    with caplog.at_level(logging.INFO, logger="lvsa_kernels"):
        triton_backend._log_hopper_refusal_once("Triton 3.10.0 is not among the releases ...")
        triton_backend._log_hopper_refusal_once("Triton 3.10.0 is not among the releases ...")
    assert [r.getMessage() for r in caplog.records].count(
        "lvsa_kernels triton: Hopper kernel not used: Triton 3.10.0 is not among the releases ...") == 1
