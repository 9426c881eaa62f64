"""Triton's CPU interpreter (``TRITON_INTERPRET=1``): detection and the lock that serialises its launches.

The interpreter patches ``triton.language`` process-wide while a kernel runs, so two threads launching at
once break each other; every launch in this package goes through `launch_lock` (a no-op on GPUs).
"""
import contextlib
import os
import threading

__all__ = ["interpreting", "launch_lock"]

_LOCK = threading.RLock()


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def launch_lock():
    """Context manager around one kernel launch: a process-wide lock under the interpreter, else nothing."""
    return _LOCK if interpreting() else contextlib.nullcontext()
