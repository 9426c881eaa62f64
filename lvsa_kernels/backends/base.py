"""The backend interface and registry used by `lvsa_kernels.block_sparse_attn`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, FrozenSet, Optional, Tuple

import torch
from torch import Tensor

from ..reference.layout import BlockSparseLayout
from ..reference.plan import AttentionPlan, inverse_permutation, permute_tokens, unpermute_tokens

__all__ = ["Backend", "BackendUnavailable", "Capabilities", "register", "get_backend", "registered_backends",
           "needs_grad"]


def needs_grad(*tensors: Tensor) -> bool:
    """Whether autograd will want gradients of any of ``tensors`` from this call."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


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
    precisions: FrozenSet[str] = frozenset({"exact"})  # `block_sparse_attn` precision modes
    backward: bool = False                  # gradients for inputs that require grad (precision "exact")


class Backend:
    """A way to run block-sparse attention. Subclasses set ``name``/``caps`` and implement ``run``."""

    name: str = ""
    caps: Capabilities

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        """Why this backend cannot run at all on ``device`` (missing package, hardware), or None."""
        return None

    def precision_reason(self, precision: str, q: Tensor) -> Optional[str]:
        """Why this backend cannot run ``precision`` on q's device, or None (``"exact"`` always runs)."""
        if precision not in self.caps.precisions:
            return f"supports precision {sorted(self.caps.precisions)}, not {precision!r}"
        return None

    def unsupported_reason(self, q: Tensor, k: Tensor, layout: BlockSparseLayout, return_lse: bool) -> Optional[str]:
        """Why this backend cannot run these particular inputs, or None when it can."""
        reason = self._caps_reason(q, k, layout.num_heads, return_lse)
        if reason:
            return reason
        if self.caps.dense_only and not layout.is_dense:
            return f"runs dense layouts only (this layout's density is {layout.density:.4f})"
        return None

    def unsupported_permuted_reason(self, q: Tensor, k: Tensor, return_lse: bool) -> Optional[str]:
        """Why this backend cannot run a permuted `AttentionPlan` (per-head blocks over permuted tokens) on these
        inputs, or None. Decided from the tensors alone: the plan's blocks stay on the device unread."""
        reason = self._caps_reason(q, k, q.shape[2], return_lse)
        if reason:
            return reason
        return "runs dense layouts only" if self.caps.dense_only else None

    def _caps_reason(self, q: Tensor, k: Tensor, layout_heads: int, return_lse: bool) -> Optional[str]:
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
        if not c.per_head_layouts and layout_heads > 1:
            return "does not support per-head layouts"
        if return_lse and not c.lse:
            return "cannot return lse"
        return None

    def build_needed(self, q: Tensor, layout: BlockSparseLayout) -> Optional[str]:
        """What this backend would compile before its first run on these inputs (e.g. a JIT module), or None
        when it is ready; ``auto`` does not time a candidate that would build."""
        return None

    def run(self, q: Tensor, k: Tensor, v: Tensor, layout: BlockSparseLayout, scale: float,
            return_lse: bool) -> Tuple[Tensor, Optional[Tensor]]:
        """Return ``(out [B, Sq, H, D] in q.dtype, lse [B, H, Sq] float32 natural log or None)``."""
        raise NotImplementedError

    def run_permuted(self, q: Tensor, k: Tensor, v: Tensor, plan: AttentionPlan, scale: float,
                     return_lse: bool, **precision) -> Tuple[Tensor, Optional[Tensor]]:
        """`run` for a permuted plan, outputs in token order. This default permutes q, k, v, runs every batch
        element's host layout with `run` (``precision=`` passed on when given) and un-permutes; a backend that
        reads through the permutation overrides it."""
        qp, kp, vp = permute_tokens(q, plan.q_perm), permute_tokens(k, plan.k_perm), permute_tokens(v, plan.k_perm)
        outs, lses = [], []
        for b, layout in enumerate(plan.layouts):
            qb, kb, vb = qp[b:b + 1], kp[b:b + 1], vp[b:b + 1]
            reason = self.unsupported_reason(qb, kb, layout, return_lse)
            if reason:
                raise BackendUnavailable(f"backend {self.name!r} cannot run the layout of batch element {b}: {reason}")
            out, lse = self.run(qb, kb, vb, layout, scale, return_lse, **precision)
            outs.append(out)
            lses.append(lse)
        out = unpermute_tokens(torch.cat(outs) if len(outs) > 1 else outs[0], plan.q_perm)
        if not return_lse:
            return out, None
        return out, torch.gather(torch.cat(lses), 2, inverse_permutation(plan.q_perm).to(q.device))


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
