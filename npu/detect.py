"""Detection of torch_npu and an Ascend device, without ever breaking ``import lvsa_kernels``.

torch_npu is never a dependency (installing it without Ascend CANN breaks ``import torch``), so it is
looked up, imported under guard, and asked for a device, in that order.
"""
from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Optional, Tuple

import torch

__all__ = ["CPU_STANDIN_ATTR", "cpu_standin_active", "load_torch_npu"]

# Test hook: a stand-in torch_npu module (tests/npu_standin.py) sets this attribute to True so that the
# NPU backend accepts CPU tensors. The real torch_npu never has it.
CPU_STANDIN_ATTR = "LVSA_KERNELS_CPU_STANDIN"


def load_torch_npu() -> Tuple[Optional[ModuleType], Optional[str]]:
    """``(torch_npu, None)`` when torch_npu imports and ``torch.npu.is_available()``; else ``(None, reason)``."""
    if importlib.util.find_spec("torch_npu") is None:
        return None, "the 'torch_npu' package is not installed (Ascend machines only)"
    try:
        torch_npu = importlib.import_module("torch_npu")
    except (ImportError, OSError, RuntimeError) as exc:
        return None, f"'import torch_npu' failed: {exc!r}"
    npu = getattr(torch, "npu", None)
    if npu is None or not npu.is_available():
        return None, "torch_npu is installed but torch.npu.is_available() is False (no Ascend device or driver)"
    return torch_npu, None


def cpu_standin_active() -> bool:
    """True only when the loaded torch_npu is a test stand-in that enables CPU tensors."""
    torch_npu, _ = load_torch_npu()
    return bool(getattr(torch_npu, CPU_STANDIN_ATTR, False))
