"""The backend interface and registry used by `lvsa_kernels.block_sparse_attn`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, FrozenSet, Optional, Tuple

import torch
from torch import Tensor

from ..reference import BlockSparseLayout

__all__ = ["Backend", "BackendUnavailable", "Capabilities", "register", "get_backend", "registered_backends"]


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run these inputs; the message says what is missing."""


@dataclass(frozen=True)
class Capabilities:
    """What a backend supports; checked before it runs."""

    devices: FrozenSet[str]                 # torch device types, e.g. {"cuda"}
    dtypes: FrozenSet[torch.dtype]
    head_dims: Optional[FrozenSet[int]]     # None = any
    gqa: bool = True
    per_head_layouts: bool = True
    lse: bool = True
    dense_only: bool = False                # only layouts where every query attends every key


class Backend:
    """A way to run block-sparse attention. Subclasses set ``name``/``caps`` and implement ``run``."""

    name: str = ""
    caps: Capabilities

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        """Why this backend cannot run at all on ``device`` (missing package, hardware), or None."""
        return None

    def unsupported_reason(self, q: Tensor, k: Tensor, layout: BlockSparseLayout, return_lse: bool) -> Optional[str]:
        """Why this backend cannot run these particular inputs, or None when it can."""
        reason = self.unavailable_reason(q.device)
        if reason:
            return reason
        c = self.caps
        if q.device.type not in c.devices:
            return f"runs on {sorted(c.devices)} tensors, got device {q.device.type!r}"
        if q.dtype not in c.dtypes:
            return f"supports dtypes {sorted(str(d) for d in c.dtypes)}, got {q.dtype}"
        if c.head_dims is not None and q.shape[-1] not in c.head_dims:
            return f"supports head dims {sorted(c.head_dims)}, got {q.shape[-1]}"
        if not c.gqa and k.shape[2] != q.shape[2]:
            return "does not support GQA (H_kv != H)"
        if not c.per_head_layouts and layout.num_heads > 1:
            return "does not support per-head layouts"
        if return_lse and not c.lse:
            return "cannot return lse"
        if c.dense_only and not layout.is_dense:
            return f"runs dense layouts only (this layout's density is {layout.density:.4f})"
        return None

    def build_needed(self, q: Tensor, layout: BlockSparseLayout) -> Optional[str]:
        """What this backend would compile before its first run on these inputs (e.g. a JIT module), or None
        when it is ready; ``auto`` does not time a candidate that would build."""
        return None

    def run(self, q: Tensor, k: Tensor, v: Tensor, layout: BlockSparseLayout, scale: float,
            return_lse: bool) -> Tuple[Tensor, Optional[Tensor]]:
        """Return ``(out [B, Sq, H, D] in q.dtype, lse [B, H, Sq] float32 natural log or None)``."""
        raise NotImplementedError


_REGISTRY: Dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    """Add ``backend`` to the registry under ``backend.name`` (replacing one of the same name)."""
    _REGISTRY[backend.name] = backend
    return backend


def get_backend(name: str) -> Backend:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"backend: unknown backend {name!r}; known: {sorted(_REGISTRY)} or 'auto'") from None


def registered_backends() -> Dict[str, Backend]:
    return dict(_REGISTRY)
