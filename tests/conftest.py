"""Shared test setup.

Without CUDA, Triton kernels run in Triton's CPU interpreter; TRITON_INTERPRET must be set before any
kernel module is imported, which is why it is set here.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
