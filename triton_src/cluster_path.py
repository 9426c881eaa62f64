"""SVOO's GPU path: permute K/V once, plan on the device, run the packed cluster kernel.

Used by `SVOOPattern.attention` for ``backend="triton"`` (CUDA, or CPU tensors in Triton's interpreter)
and for ``backend="auto"`` on CUDA. Nothing here synchronises with the host: the block map, the
schedule and the kernel stay on the device, so one attention call is a fixed sequence of launches.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import triton
from torch import Tensor

from ..reference.svoo import Clusters, CoClustering
from .cluster_attn import permute_rows, segment_sums
from .cluster_launch import assign_labels, cluster_attention, cluster_config
from .cluster_schedule import build_cluster_schedule
from .interpreter import interpreting, launch_lock

__all__ = ["assign_fn", "attend", "cluster_means", "gather_rows", "means_fn", "permute_keys", "refresh", "unsupported_reason"]

_HEAD_DIMS = (16, 32, 64, 128)


def unsupported_reason(q: Tensor) -> Optional[str]:
    """Why the cluster path cannot run on q ``[B, S, H, D]``, or None."""
    if q.device.type == "cpu" and not interpreting():
        return "CPU tensors run only in Triton's interpreter (set TRITON_INTERPRET=1 before importing lvsa_kernels)"
    if q.device.type not in ("cpu", "cuda"):
        return f"runs on CUDA (or CPU in Triton's interpreter), got device {q.device.type!r}"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"supports float16/bfloat16/float32, got {q.dtype}"
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        return "bf16 tl.dot is wrong in the Triton interpreter (triton#11584); use fp16/fp32 on CPU"
    if q.shape[-1] not in _HEAD_DIMS:
        return f"supports head dims {list(_HEAD_DIMS)}, got {q.shape[-1]}"
    if q.stride(-1) != 1:
        return "the head dim (last dim) of q must be contiguous"
    return None


def assign_fn(q: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """The co-clustering's argmax rule as one fused Triton GEMM + argmax: bf16/fp16 tensor-core dot
    products (float32 accumulation) for half-precision inputs, exact float32 otherwise."""
    gemm_dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.float32
    return lambda x, weights: assign_labels(x, weights, gemm_dtype)


def cluster_means(x: Tensor, sizes: Tensor, previous: Tensor, perm: Optional[Tensor] = None) -> Tensor:
    """float32 cluster means ``[G, n, D]`` of x: ``[B, S, H, D]`` read through ``perm [G, S]`` (positions in
    cluster order -> tokens), or ``[G, S, D]`` already in cluster order (``perm=None``). Clusters are the
    consecutive runs of ``sizes [G, n]`` positions; empty ones keep ``previous``. One deterministic pass."""
    if x.dim() == 3:
        x = x.unsqueeze(2)  # [G, S, 1, D]: group g = batch g, head 0
    B, S, H, D = x.shape
    G, n = sizes.shape
    starts = torch.nn.functional.pad(torch.cumsum(sizes, dim=1), (1, 0))
    sums = torch.empty(G, n, D, dtype=torch.float32, device=x.device)
    if G and n:
        with launch_lock():
            segment_sums[(n, G)](x, perm if perm is not None else starts, starts, sums, x.stride(0), x.stride(1),
                                 x.stride(2), S, n, NUM_HEADS=H, HEAD_DIM=D, BLOCK_R=16 if interpreting() else 32,
                                 HAS_PERM=perm is not None)
    means = sums / sizes.clamp(min=1).unsqueeze(-1)
    return torch.where((sizes > 0).unsqueeze(-1), means, previous.float())


def refresh(q: Tensor, kp: Tensor, cached: CoClustering) -> CoClustering:
    """Cached labels and permutations with centroids recomputed from the current q ``[B, S, H, D]`` (read
    through the query permutation) and kp ``[G, S, D]`` (keys already in key-cluster order); strided views
    (e.g. the video part of a longer sequence) are fine."""
    cq, ck = cached.q, cached.k
    return CoClustering(Clusters(cq.labels, cluster_means(q, cq.sizes, cq.centroids, cq.perm), cq.sizes, cq.perm),
                        Clusters(ck.labels, cluster_means(kp, ck.sizes, ck.centroids), ck.sizes, ck.perm))


def means_fn(x: Tensor, labels: Tensor, n: int, previous: Tensor, perm: Tensor) -> Tuple[Tensor, Tensor]:
    """`segment_means` of the co-clustering on the device: sizes by an integer scatter-add, sums by
    `segment_sums` through the permutation (x ``[G, N, d]`` in any float dtype)."""
    sizes = torch.zeros(labels.shape[0], n, dtype=torch.int64, device=labels.device)
    sizes.scatter_add_(1, labels, torch.ones_like(labels))
    return cluster_means(x, sizes, previous, perm), sizes


def gather_rows(x: Tensor, perm: Tensor) -> Tensor:
    """``[B, S, H, D]`` -> ``[B * H, S, D]`` contiguous with ``out[b * H + h, s] = x[b, perm[b * H + h, s], h]``
    (one Triton pass; perm int64 ``[B * H, S]``)."""
    B, S, H, D = x.shape
    if x.stride(-1) != 1:
        raise ValueError("x: the head dim (last dim) must be contiguous")
    out = torch.empty(B * H, S, D, dtype=x.dtype, device=x.device)
    block = 16 if interpreting() else 64
    if out.numel():
        with launch_lock():
            permute_rows[(triton.cdiv(S, block), B * H)](x, perm.contiguous(), out, x.stride(0), x.stride(1),
                                                         x.stride(2), S, NUM_HEADS=H, HEAD_DIM=D, BLOCK_S=block)
    return out


def permute_keys(k: Tensor, v: Tensor, perm: Tensor) -> Tuple[Tensor, Tensor]:
    """k, v ``[B, S, H, D]`` in key-cluster order ``perm [B * H, S]``: two contiguous ``[B * H, S, D]``."""
    return gather_rows(k, perm), gather_rows(v, perm)


def attend(q: Tensor, kp: Tensor, vp: Tensor, q_sizes: Tensor, k_sizes: Tensor, q_perm: Tensor, mask: Tensor,
           scale: float) -> Tensor:
    """Plan on the device and run the packed cluster kernel; returns out ``[B, S, H, D]`` in token order.

    q ``[B, S, H, D]`` in token order; kp, vp from `permute_keys`; q_sizes ``[B * H, n_q]``, k_sizes
    ``[B * H, n_k]`` (tokens per block), q_perm ``[B * H, S]``, mask bool ``[B * H, n_q, n_k]``.
    """
    S = q.shape[1]
    cfg = cluster_config(q.device, q.dtype, q.shape[-1])
    sched = build_cluster_schedule(mask, q_sizes, k_sizes, S, cfg.tiles)
    out, _ = cluster_attention(q, kp, vp, q_perm.to(torch.int32), sched, scale, cfg)
    return out
