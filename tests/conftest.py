"""Shared test setup.

Without CUDA, Triton kernels run in Triton's CPU interpreter; TRITON_INTERPRET must be set before any
kernel module is imported, which is why it is set here. With CUDA, the kernel runs its default launch
config instead of autotuning every new problem class (tests check results, not speed).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    os.environ.setdefault("LVSA_KERNELS_TRITON_AUTOTUNE", "0")
