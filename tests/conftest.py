"""Shared test setup.

Without CUDA, Triton kernels run in Triton's CPU interpreter; TRITON_INTERPRET must be set before any
kernel module is imported, which is why it is set here. With CUDA, the kernel runs its default launch
config instead of autotuning every new problem class (tests check results, not speed).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    os.environ.setdefault("LVSA_KERNELS_TRITON_AUTOTUNE", "0")


@pytest.fixture
def isolated_dispatch_cache(monkeypatch, tmp_path):
    """Backend choices cached in a fresh folder, no LVSA_KERNELS_BACKEND override, no remembered warnings."""
    from lvsa_kernels import choice, dispatch

    monkeypatch.setenv(dispatch.ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.delenv(dispatch.ENV_BACKEND, raising=False)
    monkeypatch.setattr(choice, "_warned", set())
    dispatch.reset_state()
    yield
    dispatch.reset_state()
