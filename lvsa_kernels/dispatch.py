"""Backend choice for `block_sparse_attn`: explicit override, environment override, or auto."""
from __future__ import annotations

import logging
import os
from typing import List, Set, Tuple

from torch import Tensor

from .backends import BackendUnavailable, get_backend, registered_backends
from .backends.base import Backend
from .reference import BlockSparseLayout

__all__ = ["select_backend", "candidate_order", "ENV_BACKEND"]

log = logging.getLogger("lvsa_kernels")
ENV_BACKEND = "LVSA_KERNELS_BACKEND"

# Preference when several backends are eligible and nothing has been measured yet.
_PREFERENCE = {
    "cuda": ["sdpa", "triton", "flashinfer", "reference"],
    "npu": ["sdpa", "npu", "reference"],
    "cpu": ["sdpa", "triton", "reference"],
}
_warned: Set[Tuple[str, str]] = set()


def _warn_once(name: str, reason: str) -> None:
    if (name, reason) not in _warned:
        _warned.add((name, reason))
        log.warning("lvsa_kernels auto: skipping backend %r: %s", name, reason)


def candidate_order(device_type: str) -> List[str]:
    """Backends tried by ``auto`` on ``device_type``, in preference order."""
    names = _PREFERENCE.get(device_type, ["reference"])
    return [n for n in names if n in registered_backends()]


def select_backend(requested: str, q: Tensor, k: Tensor, v: Tensor, layout: BlockSparseLayout,
                   scale: float, return_lse: bool) -> Backend:
    """Resolve ``requested`` ("auto" or a backend name) to a backend that can run these inputs."""
    if not isinstance(requested, str):
        raise TypeError(f"backend: expected a str, got {type(requested).__name__}")
    if requested == "auto":
        requested = os.environ.get(ENV_BACKEND, "auto") or "auto"
    if requested != "auto":
        backend = get_backend(requested)
        reason = backend.unsupported_reason(q, k, layout, return_lse)
        if reason:
            raise BackendUnavailable(f"backend {requested!r} cannot run these inputs: {reason}")
        return backend
    for name in candidate_order(q.device.type):
        backend = get_backend(name)
        reason = backend.unsupported_reason(q, k, layout, return_lse)
        if reason is None:
            return backend
        if not (name == "sdpa" and not layout.is_dense):  # sdpa is only meant for dense layouts
            _warn_once(name, reason)
    raise BackendUnavailable(f"no backend can run these inputs on device {q.device.type!r}")
