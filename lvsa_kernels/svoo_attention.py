"""`SVOOPattern`: the SVOO planner (`lvsa_kernels.reference.svoo.SVOOPlanner`) plus the attention call.

One call: plan (`SVOOPlanner.plan`, with Triton's fused clustering kernels when the attention runs on Triton)
-> `block_sparse_attn(q, k, v, plan)`, which chooses the backend like for any layout and owns the permutation.
"""
from __future__ import annotations

from typing import Hashable, Optional, Tuple

import torch
from torch import Tensor

from .api import block_sparse_attn
from .backends import get_backend
from .reference.eager import eager
from .reference.svoo import ClusterOps, Clusters, SVOOPlanner

__all__ = ["SVOOPattern", "triton_cluster_ops"]

class SVOOPattern(SVOOPlanner):
    __doc__ = SVOOPlanner.__doc__

    @eager  # stateful cluster cache: torch.compile graph-breaks here and runs it eagerly
    def attention(self, q: Tensor, k: Tensor, v: Tensor, step: int, layer: int, backend: str = "auto",
                  branch: Hashable = None, scale: Optional[float] = None,
                  heads: Optional[Tuple[int, int]] = None, text_tokens: int = 0, precision: str = "exact") -> Tensor:
        """SVOO self-attention: q, k, v ``[B, S, H, D]`` -> out ``[B, S, H, D]`` in the original token order.

        ``precision``: `block_sparse_attn`'s; the 8-bit ones run the per-batch host layouts on permuted tokens
        (the packed cluster kernel has no 8-bit mode).

        ``heads``, ``text_tokens``: see `plan`. Dense steps and layers run a dense layout. Sparse calls run the
        plan through `block_sparse_attn` with ``backend``: on Triton the packed cluster kernel reads through the
        permutation (planned on the device, no host round trip); other backends run the per-batch host layouts
        on permuted tokens. With ``backend`` "triton", or "auto" on CUDA, the clustering itself runs on Triton's
        fused kernels. Under ``torch.compile`` this call is excluded from the graph
        (``torch.compiler.disable``) and runs eagerly; the rest of the model compiles.
        """
        ops = None
        if backend == "triton" or (backend == "auto" and q.device.type == "cuda"):
            ops = triton_cluster_ops(q, k)
        plan = self.plan(q, k, step, layer, cache_key=branch, scale=scale, heads=heads, text_tokens=text_tokens,
                         ops=ops)
        return block_sparse_attn(q, k, v, plan, backend=backend, scale=scale, precision=precision)


def triton_cluster_ops(q: Tensor, k: Tensor) -> Optional[ClusterOps]:
    """Triton's fused clustering and selection kernels for q, k ``[B, S, H, D]`` when the Triton backend can run
    a permuted plan on them, else None (the planner then uses pure PyTorch)."""
    if get_backend("triton").unsupported_permuted_reason(q, k, False) is not None:
        return None
    from .triton_src import cluster_path

    def refresh(x: Tensor, c: Clusters) -> Clusters:
        return Clusters(c.labels, cluster_path.cluster_means(x, c.sizes, c.centroids, c.perm), c.sizes, c.perm)

    return ClusterOps(cluster_path.assign_fn(q), cluster_path.means_fn, refresh, cluster_path.select_blocks)
