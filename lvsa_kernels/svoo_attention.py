"""`SVOOPattern`: the SVOO planner (`lvsa_kernels.reference.svoo.SVOOPlanner`) plus the attention call.

One call: plan (`SVOOPlanner.plan`, with Triton's fused clustering kernels when the attention runs on Triton)
-> `block_sparse_attn(q, k, v, plan)`, which chooses the backend like for any layout and owns the permutation.
"""
from __future__ import annotations

import logging
from typing import Hashable, Optional, Set, Tuple

import torch
from torch import Tensor

from .api import block_sparse_attn
from .backends import get_backend
from .reference.eager import eager
from .reference.svoo import ClusterOps, Clusters, SVOOPlanner
from .svoo_graph import ReuseGraphs, graph_refusal

__all__ = ["SVOOPattern", "triton_cluster_ops"]

log = logging.getLogger("lvsa_kernels")


class SVOOPattern(SVOOPlanner):
    __doc__ = SVOOPlanner.__doc__

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.graphs = ReuseGraphs()
        self._graph_warned: Set[str] = set()

    def reset(self) -> None:
        super().reset()
        self.graphs.clear()

    @eager  # stateful cluster cache: torch.compile graph-breaks here and runs it eagerly
    def attention(self, q: Tensor, k: Tensor, v: Tensor, step: int, layer: int, backend: str = "auto",
                  branch: Hashable = None, scale: Optional[float] = None,
                  heads: Optional[Tuple[int, int]] = None, text_tokens: int = 0, precision: str = "exact",
                  cuda_graph: bool = False) -> Tensor:
        """SVOO self-attention: q, k, v ``[B, S, H, D]`` -> out ``[B, S, H, D]`` in the original token order.

        ``precision``: `block_sparse_attn`'s; the 8-bit ones run the per-batch host layouts on permuted tokens
        (the packed cluster kernel has no 8-bit mode).

        ``heads``, ``text_tokens``: see `plan`. Dense steps and layers run a dense layout. Sparse calls run the
        plan through `block_sparse_attn` with ``backend``: on Triton the packed cluster kernel reads through the
        permutation (planned on the device, no host round trip); other backends run the per-batch host layouts
        on permuted tokens. With ``backend`` "triton", or "auto" on CUDA, the clustering itself runs on Triton's
        fused kernels. Under ``torch.compile`` this call is excluded from the graph
        (``torch.compiler.disable``) and runs eagerly; the rest of the model compiles.

        ``cuda_graph``: replay reuse-step calls from CUDA graphs (`lvsa_kernels.svoo_graph`; one capture per
        layer, branch and clustering, about a dozen launches replaced by one). Dense and re-clustering calls
        run eagerly; inputs a graph cannot run (not CUDA, a backend other than Triton, 8-bit precision,
        ``|scale| > 1``) run eagerly after one WARNING naming the reason.
        """
        if cuda_graph and not self.is_dense(step, layer):
            reason = graph_refusal(q, backend, precision, scale)
            if reason is None:
                return self._graphed(q, k, v, step, layer, branch, scale, heads, text_tokens)
            if reason not in self._graph_warned:
                self._graph_warned.add(reason)
                log.warning("svoo: cuda_graph=True runs eagerly: %s", reason)
        return self._eager(q, k, v, step, layer, backend, branch, scale, heads, text_tokens, precision)

    def _eager(self, q, k, v, step, layer, backend, branch, scale, heads, text_tokens, precision) -> Tensor:
        ops = None
        if backend == "triton" or (backend == "auto" and q.device.type == "cuda"):
            ops = triton_cluster_ops(q, k)
        plan = self.plan(q, k, step, layer, cache_key=branch, scale=scale, heads=heads, text_tokens=text_tokens,
                         ops=ops)
        return block_sparse_attn(q, k, v, plan, backend=backend, scale=scale, precision=precision)

    def _graphed(self, q, k, v, step, layer, branch, scale, heads, text_tokens) -> Tensor:
        """A reuse call replayed from a CUDA graph; a re-clustering call runs eagerly and drops the old graphs."""
        B, S, H, D = self._check(q, k, step, text_tokens)
        entry = self._cache.get((layer, branch))
        video = q[:, :S - text_tokens]
        if self._needs_clustering(entry, (tuple(video.shape), q.device), step):
            self.graphs.drop_layer(layer, branch)
            return self._eager(q, k, v, step, layer, "triton", branch, scale, heads, text_tokens, "exact")
        key = (layer, branch, tuple(q.shape), q.dtype, str(q.device), scale, heads, text_tokens)

        def call(qb: Tensor, kb: Tensor, vb: Tensor) -> Tensor:
            return self._eager(qb, kb, vb, step, layer, "triton", branch, scale, heads, text_tokens, "exact")

        out = self.graphs.run(key, entry.clustering.q.perm, q, k, v, call,
                              lambda: self._device_floors(step, layer, B, H, heads, q.device),
                              lambda: self._cache[(layer, branch)].clustering)
        self._cache[(layer, branch)].step = step
        return out


def triton_cluster_ops(q: Tensor, k: Tensor) -> Optional[ClusterOps]:
    """Triton's fused clustering and selection kernels for q, k ``[B, S, H, D]`` when the Triton backend can run
    a permuted plan on them, else None (the planner then uses pure PyTorch)."""
    if get_backend("triton").unsupported_permuted_reason(q, k, False) is not None:
        return None
    from .triton_src import cluster_path

    def refresh(x: Tensor, c: Clusters) -> Clusters:
        return Clusters(c.labels, cluster_path.cluster_means(x, c.sizes, c.centroids, c.perm), c.sizes, c.perm)

    return ClusterOps(cluster_path.assign_fn(q), cluster_path.means_fn, refresh, cluster_path.select_blocks)
