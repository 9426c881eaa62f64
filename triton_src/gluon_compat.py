"""The one place where the Gluon Hopper kernels meet Triton's changing Gluon API (Triton 3.6 to 3.9).

Each name the kernels need is bound here by what the installed Triton has (``hasattr``), never by its version
string, and the kernels import it from here:

* ``tma_load(desc, coord, barrier, dest, pred=True)``: TMA copy of a tensor-descriptor box into shared memory.
  Triton 3.6 and 3.7 call it ``tma.async_copy_global_to_shared``; 3.8 renamed it ``tma.async_load`` (the old name
  kept as an alias); 3.9 left the old name only as a stub that raises.
* ``cta_barrier()``: a barrier of the calling threads (inside a warp-specialised partition, of that partition).
  Triton 3.6 calls it ``gl.thread_barrier``; 3.7 renamed it ``gl.barrier`` (with a ``cluster`` flag, off by
  default) and removed the old name.
* ``mbarrier.expect(bar, nbytes, pred)`` is called with positional arguments: 3.7 renamed its second parameter
  (``bytes`` -> ``bytes_per_cta``) and 3.9 added a keyword-only ``from_cta``.
* ``async_load(smem, pointers, mask=None)``: ``cp.async`` of a pointer tensor into shared memory (masked-off
  elements zero-filled), with ``async_commit_group()`` / ``async_wait_group(n)``. Triton 3.6 and 3.7 call the copy
  ``ampere.async_copy.async_copy_global_to_shared``; 3.8 renamed it ``async_load`` (the old name kept as an alias);
  3.9 left the old name only as a stub that raises. ``commit_group`` / ``wait_group`` kept their names.
* ``gl.warp_specialize([(fn, args), ...], worker_num_warps, worker_num_regs)`` has had this form on every
  release from 3.6 to 3.9 (3.7 made the register counts optional).

Which releases the Hopper kernel is offered on is the other half of compatibility: `TESTED_TRITON` lists those
it is compiled against in CI (every variant the tuner can offer, to a cubin, no spill in a loop beyond a measured
allowance: ``tests/test_hopper_compile.py``); `GPU_VERIFIED_TRITON` those whose GPU tests and benchmarks ran on
an sm_90 GPU (``bench/RESULTS.md``). On any other release `hopper_triton_refusal` says why the portable kernel
runs instead.
"""
from __future__ import annotations

from typing import Optional, Tuple

import triton

# Releases the kernel compiles cleanly on (CI's compile matrix) and on which it is offered.
TESTED_TRITON: Tuple[str, ...] = ("3.6", "3.7", "3.8", "3.9")
# Releases whose Hopper GPU tests and anchor benchmark ran (H100, 2026-12-07; logs in bench/results/).
GPU_VERIFIED_TRITON: Tuple[str, ...] = ("3.6", "3.9")


def triton_release(version: str = triton.__version__) -> str:
    """``"3.9"`` for ``"3.9.0"`` or ``"3.9.0+git1234"``."""
    return ".".join(version.split("+")[0].split(".")[:2])


def hopper_triton_refusal(version: str = triton.__version__) -> Optional[str]:
    """Why this Triton cannot run the Gluon Hopper kernel (None: it can). Releases outside `TESTED_TRITON` are
    refused rather than tried: Gluon is experimental and a release we never compiled against could compile the
    kernel into something subtly different."""
    release = triton_release(version)
    if release not in TESTED_TRITON:
        return (f"Triton {version} is not among the releases the Hopper kernel is tested with "
                f"({', '.join(TESTED_TRITON)}); the portable Triton kernel runs instead")
    if _hopper_module() is None:
        return f"Triton {version} has no Gluon Hopper module (triton.experimental.gluon.language.nvidia.hopper)"
    return None


def _hopper_module():
    try:
        from triton.experimental.gluon.language.nvidia import hopper
    except ImportError:
        return None
    return hopper


_hopper = _hopper_module()
if _hopper is not None:
    from triton.experimental.gluon import language as _gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as _async_copy

    tma_load = getattr(_hopper.tma, "async_load", None) or _hopper.tma.async_copy_global_to_shared
    cta_barrier = getattr(_gl, "barrier", None) or _gl.thread_barrier
    async_load = getattr(_async_copy, "async_load", None) or _async_copy.async_copy_global_to_shared
    async_commit_group = _async_copy.commit_group
    async_wait_group = _async_copy.wait_group
