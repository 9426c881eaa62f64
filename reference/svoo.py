"""SVOO planner: online query/key co-clustering and cluster-block selection (spec: svoo-pattern.md §3).

Every (batch element, head) pair is an independent *group*; tensors with a leading ``G`` dim hold
``G = B * H`` groups in ``(b, h)`` order. Clustering math runs in float32 (float64 for float64 inputs).

Pipeline of one sparse call: cluster (or reuse cached labels with refreshed centroids) -> select (query cluster,
key cluster) blocks -> an `AttentionPlan` of per-head blocks over the cluster-ordered tokens plus the query and key
orders -> `block_sparse_attn`, which permutes, runs and un-permutes. This module plans; the attention call is
`lvsa_kernels.SVOOPattern.attention` (a subclass of `SVOOPlanner`).
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Callable, Collection, Dict, Hashable, Optional, Tuple, Union

import torch
from torch import Tensor

from .args import ArgumentError, as_int, as_real
from .eager import eager
from .layout import BlockSparseLayout
from .plan import AttentionPlan, BlockMap, permute_tokens, unpermute_tokens  # noqa: F401  (re-exported)
from .svoo_profile import SVOOProfile

__all__ = [
    "Clusters", "CoClustering", "SVOOPlan", "SVOOPlanner", "ClusterOps", "assign", "assignment_weights",
    "co_cluster", "l2norm_rows", "means_of_sorted", "with_text", "permute_tokens", "refresh_clusters", "segment_means", "select_blocks", "strided_seeds",
    "unpermute_tokens",
]

log = logging.getLogger("lvsa_kernels")

_CHUNK_ELEMENTS = 1 << 26  # elements of one [G, rows, clusters] score chunk (256 MiB in fp32)


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _chunk_rows(groups: int, clusters: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, groups * clusters))


# ---------------------------------------------------------------------------------------------- clustering
@dataclass(frozen=True)
class Clusters:
    """Clustering of one side (queries or keys) for ``G`` groups of ``N`` tokens into ``n`` clusters.

    Attributes:
        labels: int64 ``[G, N]`` cluster of every token.
        centroids: float ``[G, n, d]`` cluster means (an empty cluster keeps its previous centroid).
        sizes: int64 ``[G, n]`` tokens per cluster (0 for empty clusters).
        perm: int64 ``[G, N]`` stable argsort of ``labels``: position ``s`` of the permuted sequence
            holds token ``perm[g, s]``; cluster ``i`` occupies a contiguous range.
    """

    labels: Tensor
    centroids: Tensor
    sizes: Tensor
    perm: Tensor


@dataclass(frozen=True)
class CoClustering:
    """Query and key clusterings of the same groups."""

    q: Clusters
    k: Clusters


def l2norm_rows(x: Tensor, eps: float = 1e-8) -> Tensor:
    """Rows of ``x`` divided by ``sqrt(|row|^2 + eps)``."""
    return x / torch.sqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def assignment_weights(c_self: Tensor, c_other: Tensor) -> Tensor:
    """Matmul form of the co-clustering rule: ``W = l2norm(c_self @ c_otherᵀ) @ c_other``.

    ``c_self`` ``[G, n_self, d]``, ``c_other`` ``[G, n_other, d]`` -> ``[G, n_self, d]``. For a token x,
    ``argmax_j x·W_j == argmax_j cos(x @ c_otherᵀ, l2norm(c_self @ c_otherᵀ)_j)`` because the cosine's
    ``|x @ c_otherᵀ|`` is a positive constant per token and the dot product is linear in x.
    """
    return l2norm_rows(c_self @ c_other.transpose(1, 2)) @ c_other


def assign(x: Tensor, weights: Tensor) -> Tensor:
    """int64 ``[G, N]`` labels ``argmax_j x·W_j`` for x ``[G, N, d]``, W ``[G, J, d]``.

    Ties and all-zero rows go to the lowest index. Scores are formed in row chunks (never ``[G, N, J]``).
    """
    G, N, _ = x.shape
    rows = _chunk_rows(G, weights.shape[1])
    wt = weights.transpose(1, 2)
    labels = torch.empty(G, N, dtype=torch.int64, device=x.device)
    for r0 in range(0, N, rows):
        labels[:, r0:r0 + rows] = torch.argmax(x[:, r0:r0 + rows] @ wt, dim=-1)
    return labels


def segment_means(x: Tensor, labels: Tensor, n: int, previous: Tensor,
                  perm: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Per-cluster means of x ``[G, N, d]`` grouped by labels ``[G, N]`` into ``n`` clusters.

    Deterministic (tokens sorted by label, then a segmented sum; no atomics), O(N d). ``perm`` is the
    stable argsort of ``labels`` when the caller already has it. Returns ``(centroids [G, n, d], sizes
    int64 [G, n])``; empty clusters keep ``previous`` with size 0.
    """
    G, N, d = x.shape
    if perm is None:
        perm = cluster_order(labels, n)
    sizes = torch.zeros(G, n, dtype=torch.int64, device=x.device).scatter_add_(1, labels, torch.ones_like(labels))
    return means_of_sorted(torch.gather(x, 1, perm.unsqueeze(-1).expand(G, N, d)), sizes, previous), sizes


def cluster_order(labels: Tensor, n: int) -> Tensor:
    """Stable argsort ``[G, N]`` of ``labels`` in ``[0, n)``; sorts the narrowest integer type that holds them
    (a 16-bit radix sort is a quarter of a 64-bit one on the GPU)."""
    narrow = torch.int16 if n <= 2**15 else torch.int32 if n <= 2**31 else torch.int64
    return torch.sort(labels.to(narrow), dim=1, stable=True).indices


def means_of_sorted(x_sorted: Tensor, sizes: Tensor, previous: Tensor) -> Tensor:
    """Means ``[G, n, d]`` of consecutive runs of ``sizes [G, n]`` rows of ``x_sorted [G, N, d]`` (float32 or
    float64 sums); empty runs keep ``previous``."""
    acc = _acc_dtype(x_sorted)
    sums = torch.segment_reduce(x_sorted.to(acc), "sum", lengths=sizes, axis=1, unsafe=True)
    means = sums / sizes.clamp(min=1).unsqueeze(-1).to(acc)
    return torch.where((sizes > 0).unsqueeze(-1), means, previous.to(acc))


def _mix64(x: int) -> int:
    """splitmix64 finaliser: a well-spread 64-bit hash of a non-negative int (pure Python, platform independent)."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def strided_seeds(x: Tensor, n: int, seed: int, groups: Optional[Tensor] = None, side: int = 0) -> Tensor:
    """Initial centroids ``[G, n, d]``: ``n`` evenly strided tokens of x ``[G, N, d]`` with a pseudo-random phase
    per group.

    Tokens are in raster (frame, row, column) order, so strided seeds spread over space and time; they are
    distinct whenever ``n <= N``. The phase of group g is a hash of ``(seed, side, groups[g])`` (``groups``
    default ``0 .. G-1``), so a group keeps its seeds wherever it is computed (e.g. a head on another Ulysses
    rank); ``side`` tells queries (0) and keys (1) apart.
    """
    G, N, d = x.shape
    ids = range(G) if groups is None else [int(i) for i in groups]
    base = _mix64(seed * 2 + side)
    phase = torch.tensor([_mix64(base ^ i) % N for i in ids], dtype=torch.int64).view(G, 1)
    idx = (phase + torch.arange(n) * N // n) % N
    return torch.gather(x, 1, idx.to(x.device, non_blocking=True).unsqueeze(-1).expand(G, n, d))


def _update(x: Tensor, labels: Tensor, previous: Tensor, means_fn: Callable[..., Tuple[Tensor, Tensor]]) -> Clusters:
    """Clusters of x for ``labels``: sizes, means (empty clusters keep ``previous``) and the permutation."""
    perm = cluster_order(labels, previous.shape[1])
    centroids, sizes = means_fn(x, labels, previous.shape[1], previous, perm)
    return Clusters(labels, centroids, sizes, perm)


def co_cluster(q: Tensor, k: Tensor, q_clusters: int, k_clusters: int, iterations: int = 2, seed: int = 0,
               init: Optional[Tuple[Tensor, Tensor]] = None,
               assign_fn: Callable[[Tensor, Tensor], Tensor] = assign,
               means_fn: Optional[Callable[..., Tuple[Tensor, Tensor]]] = None,
               groups: Optional[Tensor] = None) -> CoClustering:
    """Bidirectional query/key co-clustering (spec §3.1), keys first in every iteration.

    Args:
        q: ``[G, Nq, d]``; k: ``[G, Nk, d]`` (any float dtype; computed in float32, float64 for float64).
        q_clusters, k_clusters: ``n_q``, ``n_k`` (>= 1).
        iterations: assignment/update rounds (>= 1).
        seed: seed of the strided seeding (ignored with ``init``); see `strided_seeds` and ``groups``.
        init: warm start ``(q_centroids [G, n_q, d], k_centroids [G, n_k, d])``, e.g. cached centroids.
        assign_fn: ``(x [G, N, d], W [G, J, d]) -> int64 labels [G, N]``, the argmax rule of `assign`
            (e.g. the fused Triton GEMM + argmax of the GPU path).
        means_fn: ``(x, labels, n, previous, perm) -> (centroids, sizes)`` like `segment_means`. When given,
            tokens stay in their input dtype (the functions accumulate in float32) instead of being converted.
        groups: global ids ``[G]`` of the groups for seeding (default ``0 .. G-1``).
    """
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q, k: expected [G, Nq, d] and [G, Nk, d], got {tuple(q.shape)} and {tuple(k.shape)}")
    for name, v in (("q_clusters", q_clusters), ("k_clusters", k_clusters), ("iterations", iterations)):
        as_int(name, v, 1)
    acc = _acc_dtype(q)
    xq, xk = (q, k) if means_fn is not None else (q.to(acc), k.to(acc))
    means_fn = means_fn or segment_means
    if init is None:
        cq = strided_seeds(xq, q_clusters, seed, groups, side=0).to(acc)
        ck = strided_seeds(xk, k_clusters, seed, groups, side=1).to(acc)
    else:
        cq, ck = (c.to(device=q.device, dtype=acc) for c in init)
        G, d = q.shape[0], q.shape[2]
        if cq.shape != (G, q_clusters, d) or ck.shape != (G, k_clusters, d):
            raise ValueError(f"init: expected centroids {(G, q_clusters, d)} and {(G, k_clusters, d)}, "
                             f"got {tuple(cq.shape)} and {tuple(ck.shape)}")
    for _ in range(iterations):
        kc = _update(xk, assign_fn(xk, assignment_weights(ck, cq)), ck, means_fn)
        ck = kc.centroids
        qc = _update(xq, assign_fn(xq, assignment_weights(cq, ck)), cq, means_fn)
        cq = qc.centroids
    return CoClustering(qc, kc)


def refresh_clusters(x: Tensor, clusters: Clusters) -> Clusters:
    """Same labels and permutation, centroids recomputed from the current tokens x ``[G, N, d]``."""
    x = torch.gather(x, 1, clusters.perm.unsqueeze(-1).expand_as(x))
    centroids = means_of_sorted(x, clusters.sizes, clusters.centroids)
    return Clusters(clusters.labels, centroids, clusters.sizes, clusters.perm)


# ---------------------------------------------------------------------------------------------- selection
def select_blocks(q_centroids: Tensor, k_centroids: Tensor, k_sizes: Tensor, top_p: float,
                  min_blocks: Tensor, scale: float) -> Tensor:
    """bool ``[G, n_q, n_k]`` (query cluster, key cluster) blocks to compute (spec §3.4).

    Per query cluster i: size-weighted centroid softmax ``M_ij ∝ |K_j| exp(scale Q̄_i·K̄_j)``; keep the
    smallest descending prefix whose mass reaches ``top_p`` (the crossing cluster included), and at least
    ``min_blocks[g]`` clusters (the profile floor). Empty key clusters are never kept; ``top_p >= 1``
    keeps every non-empty cluster.

    Args:
        q_centroids ``[G, n_q, d]``, k_centroids ``[G, n_k, d]``, k_sizes int ``[G, n_k]``,
        min_blocks int ``[G]``, scale: softmax scale.
    """
    nonempty = (k_sizes > 0).unsqueeze(1).expand(-1, q_centroids.shape[1], -1)
    if top_p >= 1:
        return nonempty.clone()
    acc = _acc_dtype(q_centroids)
    logits = (q_centroids.to(acc) @ k_centroids.to(acc).transpose(1, 2)) * scale
    mass = torch.softmax(logits + torch.log(k_sizes.to(acc)).unsqueeze(1), dim=-1)  # log 0 = -inf: no mass
    ranked, order = torch.sort(mass, dim=-1, descending=True, stable=True)
    before = torch.cumsum(ranked, dim=-1).roll(1, dims=-1)  # exclusive prefix mass c_{r-1}
    before[..., 0] = 0
    rank = torch.arange(mass.shape[-1], device=mass.device)
    floor = min_blocks.to(mass.device, non_blocking=True)  # no stream sync for the small host copy
    keep_ranked = (before <= top_p) | (rank < floor.view(-1, 1, 1))
    keep = torch.zeros_like(keep_ranked).scatter_(-1, order, keep_ranked)
    return keep & nonempty


def _groups(x: Tensor) -> Tensor:
    """``[B, S, H, D]`` -> ``[B*H, S, D]``."""
    B, S, H, D = x.shape
    return x.transpose(1, 2).reshape(B * H, S, D)


def _text_last(perm: Tensor, text_tokens: int) -> Tensor:
    """Video order ``perm [G, N]`` extended by the ``text_tokens`` positions after the video, unpermuted."""
    if not text_tokens:
        return perm
    N = perm.shape[1]
    return torch.cat([perm, torch.arange(N, N + text_tokens, device=perm.device).expand(perm.shape[0], -1)], dim=1)


def with_text(clustering: CoClustering, mask: Tensor, text_tokens: int
              ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(q_sizes, k_sizes, q_perm, k_perm, mask)`` of the video clustering extended by one text block.

    With ``text_tokens > 0`` the text (after the video, unpermuted) becomes query block ``n_q`` and key block
    ``n_k``: every video cluster attends it, and it attends every block. Sizes ``[G, n + 1]``, perms
    ``[G, N + text_tokens]``, mask ``[G, n_q + 1, n_k + 1]``; without text the inputs come back unchanged.
    """
    q, k = clustering.q, clustering.k
    if not text_tokens:
        return q.sizes, k.sizes, q.perm, k.perm, mask
    G, n_q, n_k = mask.shape
    ext = torch.ones(G, n_q + 1, n_k + 1, dtype=torch.bool, device=mask.device)
    ext[:, :n_q, :n_k] = mask
    pad = torch.nn.functional.pad
    return (pad(q.sizes, (0, 1), value=text_tokens), pad(k.sizes, (0, 1), value=text_tokens),
            _text_last(q.perm, text_tokens), _text_last(k.perm, text_tokens), ext)


# ---------------------------------------------------------------------------------------------- pattern
@dataclass(frozen=True)
class ClusterOps:
    """The clustering's kernels; the defaults are pure PyTorch (a GPU caller passes fused kernels).

    Attributes:
        assign: ``(x [G, N, d], W [G, J, d]) -> int64 labels [G, N]``, the rule of `assign`.
        means: ``(x, labels, n, previous, perm) -> (centroids, sizes)`` like `segment_means`, or None for
            `segment_means` on float32 copies (see `co_cluster`).
        refresh: ``(x [B, S, H, D], clusters) -> Clusters``: same labels, centroids recomputed from x (any strides).
        select: the block selection, with the arguments and result of `select_blocks`.
    """

    assign: Callable[[Tensor, Tensor], Tensor] = assign
    means: Optional[Callable[..., Tuple[Tensor, Tensor]]] = None
    refresh: Callable[[Tensor, Clusters], Clusters] = lambda x, clusters: refresh_clusters(_groups(x), clusters)
    select: Callable[..., Tensor] = select_blocks


@dataclass(frozen=True, eq=False)
class SVOOPlan(AttentionPlan):
    """What `SVOOPlanner.plan` returns: an `AttentionPlan` plus the clustering behind it.

    Attributes (besides `AttentionPlan`'s ``blocks``, ``q_perm``, ``k_perm``; ``layouts`` gives the host layouts):
        clustering: the co-clustering used (None for dense calls).
        reclustered: True when this call ran the clustering, False when it reused cached labels.
    """

    clustering: Optional[CoClustering] = None
    reclustered: bool = False

    @property
    def dense(self) -> bool:
        return not self.permuted


@dataclass
class _CacheEntry:
    signature: Tuple[object, ...]
    step: int
    clustering: CoClustering
    heads: Optional[Tuple[int, int]] = None


class SVOOPlanner:
    """SVOO sparse attention planner: offline per-head profile floor + online query/key co-clustering.

    Args:
        profile: None (no floor), a CSV path, or an `SVOOProfile` of per (step, layer, head) keep ratios.
        top_p: mass target of the cluster selection (> 0; >= 1 keeps every block).
        q_clusters, k_clusters: clusters per (batch element, head).
        iterations: co-clustering rounds on every (re-)clustering.
        warmup_steps: the first ``warmup_steps`` denoising steps (0-based ``step < warmup_steps``) are dense.
        dense_layers: layers that always run dense: an int n (layers ``0 .. n-1``) or a collection of indices.
        recluster_every: on sparse steps, re-cluster when ``(step - warmup_steps) % recluster_every == 0``
            (once per step) or when the (layer, branch) cache is missing or does not fit the input shape.
        clip: ``(lo, hi)`` band for profile keep ratios; floor ``F_h = max(1, int(clip(r_h) * k_clusters))`` key
            clusters when the clipped ratio is > 0.
        seed: seed of the strided cluster seeding (same seed -> same clusters).

    Steps are 0-based (``step`` 0 is the first denoising step; profile CSV row ``Step = step + 1``).

    Caches: one per ``(layer, branch)`` so the two classifier-free-guidance branches never share
    clusters. On reuse steps the cached labels (and permutations) are kept but the centroids are
    recomputed from the current q, k (O(N d)) and the block map is rebuilt with the current floor: the
    published method freezes centroids for 20-40 steps, which selects blocks from stale scores (spec §8.2).
    A re-clustering warm-starts from the cached centroids. With batch B > 1 every (b, h) has its own
    clusters and each batch element gets its own per-head layout and its own kernel call.
    Keys are clustered per query head: GQA inputs (H_kv != H) are rejected.
    """

    def __init__(self, profile: Union[None, str, os.PathLike, SVOOProfile] = None, top_p: float = 0.9,
                 q_clusters: int = 256, k_clusters: int = 1024, iterations: int = 2, warmup_steps: int = 10,
                 dense_layers: Union[int, Collection[int]] = 0, recluster_every: int = 20,
                 clip: Tuple[float, float] = (0.15, 0.20), seed: int = 0) -> None:
        if not as_real("top_p", top_p) > 0:
            raise ArgumentError(f"top_p: expected > 0, got {top_p!r}")
        q_clusters, k_clusters, iterations, recluster_every = (
            as_int(name, v, 1) for name, v in (("q_clusters", q_clusters), ("k_clusters", k_clusters),
                                               ("iterations", iterations), ("recluster_every", recluster_every)))
        warmup_steps, seed = as_int("warmup_steps", warmup_steps, 0), as_int("seed", seed)
        if isinstance(clip, (str, bytes)) or len(clip) != 2:
            raise ArgumentError(f"clip: expected (lo, hi), got {clip!r}")
        lo_clip, hi_clip = as_real("clip[0]", clip[0]), as_real("clip[1]", clip[1])
        if not 0 <= lo_clip <= hi_clip <= 1:
            raise ValueError(f"clip: expected 0 <= lo <= hi <= 1, got {clip!r}")
        self.profile = profile if profile is None or isinstance(profile, SVOOProfile) else SVOOProfile.load(profile)
        self.top_p = float(top_p)
        self.q_clusters, self.k_clusters, self.iterations = q_clusters, k_clusters, iterations
        self.warmup_steps, self.recluster_every = warmup_steps, recluster_every
        self.dense_layers = (frozenset(range(as_int("dense_layers", dense_layers, 0)))
                             if not isinstance(dense_layers, Collection) else
                             frozenset(as_int("dense_layers[i]", x, 0) for x in dense_layers))
        self.clip = (float(lo_clip), float(hi_clip))
        self.seed = seed
        self._cache: Dict[Tuple[int, Hashable], _CacheEntry] = {}
        self._floors: Dict[Tuple[object, ...], Tensor] = {}

    def is_dense(self, step: int, layer: int) -> bool:
        """Whether (step, layer) runs dense attention (warm-up step or dense layer)."""
        return step < self.warmup_steps or layer in self.dense_layers

    def min_blocks(self, step: int, layer: int, heads: int, first: int = 0, total: Optional[int] = None) -> Tensor:
        """int64 ``[heads]`` profile floor ``max(1, int(r * k_clusters))`` for ``r = clip(r_h, lo, hi) > 0``
        (0 for r = 0; the published rule) of global heads
        ``first .. first + heads`` of a model with ``total`` heads (default ``heads``); zeros without a profile."""
        total = heads if total is None else total
        if self.profile is None:
            return torch.zeros(heads, dtype=torch.int64)
        ratios = self.profile.keep_ratios(step + 1, layer)
        if ratios.numel() != total:
            raise ValueError(f"profile: has {ratios.numel()} heads but the model has H={total}")
        ratios = ratios[first:first + heads]
        clipped = ratios.double().clamp(*self.clip)
        floor = torch.floor(clipped * self.k_clusters).to(torch.int64)
        return torch.where(clipped > 0, floor.clamp(min=1), floor)  # published: max(1, int(r * n_k)) for r > 0

    def reset(self) -> None:
        """Drop every cached clustering (call between videos) and the device copies of the profile floors."""
        self._cache.clear()
        self._floors.clear()

    def cached_densities(self) -> Dict[Tuple[int, Hashable], float]:
        """Token density (computed query-key pairs / S², averaged over batch and heads) of the block map that
        each cached ``(layer, branch)`` clustering selects at the step it was last used."""
        out = {}
        for (layer, branch), entry in sorted(self._cache.items(), key=lambda kv: (kv[0][0], repr(kv[0][1]))):
            B, S, H, D = entry.signature[0]
            cl = entry.clustering
            mask = self._block_map(cl, entry.step, layer, B, H, 1.0 / math.sqrt(D), entry.heads)
            pairs = (mask.double() * cl.q.sizes.double().unsqueeze(2) * cl.k.sizes.double().unsqueeze(1)).sum()
            out[(layer, branch)] = float(pairs) / (B * H * S * S)
        return out

    @eager  # stateful cluster cache: runs eagerly inside compiled models
    def plan(self, q: Tensor, k: Tensor, step: int, layer: int, cache_key: Hashable = None,
             scale: Optional[float] = None, heads: Optional[Tuple[int, int]] = None, text_tokens: int = 0,
             ops: Optional[ClusterOps] = None) -> SVOOPlan:
        """Plan one self-attention call from q ``[B, S, H, D]`` and k ``[B, S, H, D]``.

        ``cache_key`` names the CFG branch (any hashable); ``scale`` is the softmax scale (default 1/sqrt(D));
        ``heads = (first, total)``: q, k hold global heads ``first .. first + H`` of ``total`` (a Ulysses
        shard: profile floors and cluster seeds follow the global head). ``text_tokens``: the last
        ``text_tokens`` positions are (valid) text: only the video part is clustered; text is one extra query
        and key block, unpermuted at the end: video clusters attend their selected video clusters and all text,
        text attends everything. ``ops``: the clustering kernels (default pure PyTorch).
        Everything stays on q's device; the host layouts (``plan.layouts``) are built on first use, and a
        backend that reads through the permutation (Triton's cluster kernel) never needs them.
        """
        B, S, H, D = self._check(q, k, step, text_tokens)
        if self.is_dense(step, layer):
            return SVOOPlan(BlockSparseLayout.dense(S))
        scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
        n_video = S - text_tokens
        clustering, reclustered = self._clusters(q[:, :n_video], k[:, :n_video], step, layer, cache_key,
                                                 ops or ClusterOps(), heads)
        mask = self._block_map(clustering, step, layer, B, H, scale, heads, (ops or ClusterOps()).select)
        q_sizes, k_sizes, q_perm, k_perm, mask = with_text(clustering, mask, text_tokens)
        meta = {"pattern": "svoo", "step": step, "layer": layer, "top_p": self.top_p, "q_clusters": self.q_clusters,
                "k_clusters": self.k_clusters, "text_tokens": text_tokens}
        return SVOOPlan(BlockMap(mask, q_sizes, k_sizes, B, meta), q_perm.view(B, H, S), k_perm.view(B, H, S),
                        clustering, reclustered)

    # ------------------------------------------------------------------------------------------ internals
    def _check(self, q: Tensor, k: Tensor, step: int, text_tokens: int = 0) -> Tuple[int, int, int, int]:
        if q.dim() != 4 or k.dim() != 4:
            raise ValueError(f"q, k: expected [B, S, H, D], got {tuple(q.shape)} and {tuple(k.shape)}")
        if k.shape != q.shape:
            raise ValueError(f"k: SVOO needs k shaped like q {tuple(q.shape)} (self-attention, H_kv == H), "
                             f"got {tuple(k.shape)}")
        as_int("step", step, 0)
        if not 0 <= as_int("text_tokens", text_tokens) < q.shape[1]:
            raise ValueError(f"text_tokens: expected an int in [0, S={q.shape[1]}), got {text_tokens!r}")
        return tuple(q.shape)

    def _needs_clustering(self, entry: Optional[_CacheEntry], signature: Tuple[object, ...], step: int) -> bool:
        return (entry is None or entry.signature != signature
                or (step != entry.step and (step - self.warmup_steps) % self.recluster_every == 0))

    def _store(self, q: Tensor, step: int, layer: int, branch: Hashable, clustering: CoClustering,
               heads: Optional[Tuple[int, int]] = None) -> None:
        self._cache[(layer, branch)] = _CacheEntry((tuple(q.shape), q.device), step, clustering, heads)

    def _clusters(self, q: Tensor, k: Tensor, step: int, layer: int, branch: Hashable, ops: ClusterOps,
                  heads: Optional[Tuple[int, int]] = None) -> Tuple[CoClustering, bool]:
        """Re-cluster (warm-started from a fitting cache entry) or refresh the cached clusters of q, k
        ``[B, S, H, D]``; updates the cache. Returns (clustering, reclustered)."""
        entry = self._cache.get((layer, branch))
        signature = (tuple(q.shape), q.device)
        reclustered = self._needs_clustering(entry, signature, step)
        if reclustered:
            init = None
            if entry is not None and entry.signature == signature:
                init = (entry.clustering.q.centroids, entry.clustering.k.centroids)
            B, _, H, _ = q.shape
            first, total = heads or (0, H)
            groups = (torch.arange(B).view(B, 1) * total + first + torch.arange(H)).reshape(-1)
            clustering = co_cluster(_groups(q), _groups(k), self.q_clusters, self.k_clusters, self.iterations,
                                    self.seed, init, ops.assign, ops.means, groups)
            log.info("svoo: clustered layer %d branch %r at step %d", layer, branch, step)
        else:
            clustering = CoClustering(ops.refresh(q, entry.clustering.q), ops.refresh(k, entry.clustering.k))
        self._store(q, step, layer, branch, clustering, heads)
        return clustering, reclustered

    def _block_map(self, clustering: CoClustering, step: int, layer: int, B: int, H: int, scale: float,
                   heads: Optional[Tuple[int, int]] = None, select: Callable[..., Tensor] = select_blocks) -> Tensor:
        floor = self._device_floors(step, layer, B, H, heads, clustering.k.sizes.device)
        return select(clustering.q.centroids, clustering.k.centroids, clustering.k.sizes, self.top_p, floor, scale)

    def _device_floors(self, step: int, layer: int, B: int, H: int, heads: Optional[Tuple[int, int]],
                       device: torch.device) -> Tensor:
        """`min_blocks` of every (b, h) group, int64 ``[B * H]`` on ``device``: a row of a device table of every
        profiled step (built and copied once per (layer, shape, device)), so a call does no host work."""
        first, total = heads or (0, H)
        steps = 1 if self.profile is None else self.profile.steps
        if step >= steps and self.profile is not None:
            self.min_blocks(step, layer, H, first, total)  # raises the profile's error
        key = (layer, B, first, H, total, str(device))
        if key not in self._floors:
            table = torch.stack([self.min_blocks(s, layer, H, first, total).repeat(B) for s in range(steps)])
            self._floors[key] = table.to(device)
        return self._floors[key][min(step, steps - 1)]
