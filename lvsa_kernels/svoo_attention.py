"""`SVOOPattern`: the SVOO planner (`lvsa_kernels.reference.svoo.SVOOPlanner`) plus the attention call.

One call: plan (`SVOOPlanner.plan`, with Triton's fused clustering kernels when the attention runs on Triton)
-> `block_sparse_attn(q, k, v, plan)`, which chooses the backend like for any layout and owns the permutation.
"""
from __future__ import annotations

from typing import Hashable, Optional, Tuple

from torch import Tensor

from .api import block_sparse_attn
from .backends import get_backend
from .reference.eager import eager
from .reference.plan import AttentionCall, AttentionPlan
from .reference.svoo import ClusterOps, Clusters, SVOOPlanner

__all__ = ["SVOOPattern", "triton_cluster_ops"]


class SVOOPattern(SVOOPlanner):
    __doc__ = SVOOPlanner.__doc__

    per_layer = True  # `VideoPattern`: planned per call from q and k

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
        plan = self.plan(q, k, step, layer, cache_key=branch, scale=scale, heads=heads, text_tokens=text_tokens,
                         ops=_cluster_ops(q, k, backend))
        return block_sparse_attn(q, k, v, plan, backend=backend, scale=scale, precision=precision)

    @eager  # stateful cluster cache
    def plan_call(self, q: Tensor, k: Tensor, call: AttentionCall) -> AttentionPlan:
        """`VideoPattern`: `plan` for one call of the diffusers runtime (the branch keys the cluster cache).
        SVOO plans text after the video only, and no block-causal or leading-frame masks."""
        if call.causal_block or call.leading_frames or (call.text_tokens and call.text_position != "after"):
            raise NotImplementedError("SVOO: plans video (+ text after it) only; got block-causal masks, leading "
                                      f"frames or text {call.text_position} the video ({call})")
        return self.plan(q, k, call.step, call.layer, cache_key=call.branch, heads=call.heads,
                         text_tokens=call.text_tokens, ops=_cluster_ops(q, k, call.backend))

    def summary(self, plan: AttentionPlan) -> Tuple[str, str]:
        """`VideoPattern`: "SVOO" and its knobs, for a log line."""
        return "SVOO", (f"top_p={self.top_p:g} q_clusters={self.q_clusters} k_clusters={self.k_clusters} "
                        f"iterations={self.iterations} warmup_steps={self.warmup_steps} "
                        f"recluster_every={self.recluster_every} dense_layers={sorted(self.dense_layers)} "
                        f"profile={'yes' if self.profile is not None else 'none'}")


def _cluster_ops(q: Tensor, k: Tensor, backend: str) -> Optional[ClusterOps]:
    """Triton's clustering kernels when the attention runs on Triton ("triton", or "auto" on CUDA), else None."""
    if backend == "triton" or (backend == "auto" and q.device.type == "cuda"):
        return triton_cluster_ops(q, k)
    return None


def triton_cluster_ops(q: Tensor, k: Tensor) -> Optional[ClusterOps]:
    """Triton's fused clustering and selection kernels for q, k ``[B, S, H, D]`` when the Triton backend can run
    a permuted plan on them, else None (the planner then uses pure PyTorch)."""
    if get_backend("triton").unsupported_permuted_reason(q, k, False) is not None:
        return None
    from .triton_src import cluster_path

    def refresh(x: Tensor, c: Clusters) -> Clusters:
        return Clusters(c.labels, cluster_path.cluster_means(x, c.sizes, c.centroids, c.perm), c.sizes, c.perm)

    return ClusterOps(cluster_path.assign_fn(q), cluster_path.means_fn, refresh, cluster_path.select_blocks)
