"""`SVOOPattern`: the SVOO planner (`lvsa_kernels.reference.svoo.SVOOPlanner`) plus the attention call.

Sparse calls run either the Triton cluster path (planned on the device, `lvsa_kernels.triton_src.cluster_path`)
or, for every other backend, the host-built per-head layouts of `SVOOPlanner.plan` through `block_sparse_attn`
on permuted tokens.
"""
from __future__ import annotations

import math
from typing import Hashable, Optional, Tuple

import torch
from torch import Tensor

from .api import block_sparse_attn
from .backends import BackendUnavailable
from .reference.layout import BlockSparseLayout
from .reference.svoo import (
    Clusters, CoClustering, SVOOPlanner, _text_last, permute_tokens, unpermute_tokens, with_text,
)

__all__ = ["SVOOPattern", "refresh_on_device"]


class SVOOPattern(SVOOPlanner):
    __doc__ = SVOOPlanner.__doc__

    @torch.compiler.disable  # stateful cluster cache: torch.compile graph-breaks here and runs it eagerly
    def attention(self, q: Tensor, k: Tensor, v: Tensor, step: int, layer: int, backend: str = "auto",
                  branch: Hashable = None, scale: Optional[float] = None,
                  heads: Optional[Tuple[int, int]] = None, text_tokens: int = 0) -> Tensor:
        """SVOO self-attention: q, k, v ``[B, S, H, D]`` -> out ``[B, S, H, D]`` in the original token order.

        ``heads``, ``text_tokens``: see `plan`. Dense steps and layers run ``block_sparse_attn`` with a dense
        layout. Sparse calls with ``backend`` "triton", or "auto" on CUDA, run the cluster path
        (`lvsa_kernels.triton_src.cluster_path`): planned on the device, keys and values permuted once, queries
        read and outputs written through the permutation by the packed cluster kernel. Other backends permute
        q, k, v, run ``block_sparse_attn`` per batch element on the host-built per-head layouts of `plan`, and
        un-permute. Under ``torch.compile`` this call is excluded from the graph (``torch.compiler.disable``)
        and runs eagerly; the rest of the model compiles.
        """
        B, S, H, D = self._check(q, k, step, text_tokens)
        if self.is_dense(step, layer):
            return block_sparse_attn(q, k, v, BlockSparseLayout.dense(S), backend=backend, scale=scale)
        path = _cluster_path(q, backend)
        if path is not None:
            scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
            n_video = S - text_tokens
            qv, kv = q[:, :n_video], k[:, :n_video]
            cached = self._cached(qv, step, layer, branch)
            if cached is None:  # re-clustering step (or no fitting cache): cluster, then permute
                clustering, _ = self._clusters(qv, kv, step, layer, branch, path.assign_fn(q), path.means_fn, heads)
                kp, vp = path.permute_keys(k, v, _text_last(clustering.k.perm, text_tokens))
            else:  # reuse step: permute with the cached order, refresh the centroids (keys from the permuted keys)
                kp, vp = path.permute_keys(k, v, _text_last(cached.k.perm, text_tokens))
                clustering = refresh_on_device(qv, kp[:, :n_video], cached)
                self._store(qv, step, layer, branch, clustering, heads)
            mask = self._block_map(clustering, step, layer, B, H, scale, heads)
            q_sizes, k_sizes, q_perm, _, mask = with_text(clustering, mask, text_tokens)
            return path.attend(q, kp, vp, q_sizes, k_sizes, q_perm, mask, scale)
        plan = self.plan(q, k, step, layer, cache_key=branch, scale=scale, heads=heads, text_tokens=text_tokens)
        qp, kp, vp = permute_tokens(q, plan.q_perm), permute_tokens(k, plan.k_perm), permute_tokens(v, plan.k_perm)
        outs = [block_sparse_attn(qp[b:b + 1], kp[b:b + 1], vp[b:b + 1], layout, backend=backend, scale=scale)
                for b, layout in enumerate(plan.layouts)]
        return unpermute_tokens(torch.cat(outs) if len(outs) > 1 else outs[0], plan.q_perm)


def refresh_on_device(q: Tensor, kp: Tensor, cached: CoClustering) -> CoClustering:
    """Cached labels and permutations with centroids recomputed on the device from the current q ``[B, S, H, D]``
    (read through the query permutation) and kp ``[G, S, D]`` (keys already in key-cluster order); strided views
    (e.g. the video part of a longer sequence) are fine."""
    from .triton_src import cluster_path as path

    cq, ck = cached.q, cached.k
    return CoClustering(Clusters(cq.labels, path.cluster_means(q, cq.sizes, cq.centroids, cq.perm), cq.sizes, cq.perm),
                        Clusters(ck.labels, path.cluster_means(kp, ck.sizes, ck.centroids), ck.sizes, ck.perm))


def _cluster_path(q: Tensor, backend: str):
    """The Triton cluster-path module when ``backend`` asks for it on ``q``'s device, else None."""
    if backend not in ("triton", "auto"):
        return None
    if backend == "auto" and q.device.type != "cuda":
        return None
    try:
        from .triton_src import cluster_path
    except ImportError:
        if backend == "triton":
            raise
        return None
    reason = cluster_path.unsupported_reason(q)
    if reason is None:
        return cluster_path
    if backend == "triton":
        raise BackendUnavailable(f"SVOO cluster path (triton): {reason}")
    return None
