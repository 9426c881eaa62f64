"""SVOO's GPU path: permute K/V once, plan on the device, run the packed cluster kernel.

The Triton backend runs permuted plans with it (`TritonBackend.run_permuted`: CUDA, or CPU tensors in Triton's
interpreter); `lvsa_kernels.SVOOPattern` clusters with its fused kernels when the attention runs on Triton.
Nothing here synchronises with the host: the block map, the schedule and the kernel stay on the device, so one
attention call is a fixed sequence of launches.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import triton
from torch import Tensor

from .cluster_attn import permute_rows, segment_means
from .cluster_launch import assign_labels, cluster_attention, cluster_config, cluster_kernel
from .cluster_plan import select_key_clusters
from .cluster_schedule import build_cluster_schedule
from .interpreter import interpreting, launch_lock

__all__ = ["assign_fn", "attend", "cluster_means", "gather_rows", "means_fn", "permute_keys", "select_blocks"]


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
    means = torch.empty(G, n, D, dtype=torch.float32, device=x.device)
    if G and n:
        with launch_lock():
            segment_means[(n, G)](x, perm if perm is not None else sizes, sizes.to(torch.int64).contiguous(),
                                  previous.to(torch.float32).contiguous(), means, x.stride(0), x.stride(1),
                                  x.stride(2), S, n, NUM_HEADS=H, HEAD_DIM=D, BLOCK_R=16 if interpreting() else 32,
                                  BLOCK_C=16 if interpreting() else 256, HAS_PERM=perm is not None)
    return means


def means_fn(x: Tensor, labels: Tensor, n: int, previous: Tensor, perm: Tensor) -> Tuple[Tensor, Tensor]:
    """`segment_means` of the co-clustering on the device: sizes by an integer scatter-add, means by
    the Triton `segment_means` through the permutation (x ``[G, N, d]`` in any float dtype)."""
    sizes = torch.zeros(labels.shape[0], n, dtype=torch.int64, device=labels.device)
    sizes.scatter_add_(1, labels, torch.ones_like(labels))
    return cluster_means(x, sizes, previous, perm), sizes


def select_blocks(q_centroids: Tensor, k_centroids: Tensor, k_sizes: Tensor, top_p: float, min_blocks: Tensor,
                  scale: float) -> Tensor:
    """`lvsa_kernels.reference.svoo.select_blocks` in two launches (the centroid GEMM, then one Triton program
    per query cluster: mass, sort, prefix, floor); bool ``[G, n_q, n_k]``, min_blocks int ``[G]`` on the device."""
    G, n_q, _ = q_centroids.shape
    n_k = k_centroids.shape[1]
    if top_p >= 1:
        return (k_sizes > 0).unsqueeze(1).expand(G, n_q, n_k).clone()
    logits = torch.bmm(q_centroids.float(), k_centroids.float().transpose(1, 2))
    mask = torch.empty(G, n_q, n_k, dtype=torch.bool, device=logits.device)
    if mask.numel():
        with launch_lock():
            select_key_clusters[(G * n_q,)](logits, k_sizes.to(torch.int64).contiguous(),
                                            min_blocks.to(device=logits.device, dtype=torch.int64), mask, n_q, n_k,
                                            float(top_p), float(scale), BLOCK_K=triton.next_power_of_2(n_k),
                                            num_warps=4)
    return mask


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
           scale: float) -> Tuple[Tensor, Tensor]:
    """Plan on the device and run the packed cluster kernel `cluster_launch.cluster_kernel` picks; returns ``(out [B, S, H, D], lse [B, H, S] float32)``
    in token order.

    q ``[B, S, H, D]`` in token order; kp, vp from `permute_keys`; q_sizes ``[B * H, n_q]``, k_sizes
    ``[B * H, n_k]`` (tokens per block), q_perm ``[B * H, S]``, mask bool ``[B * H, n_q, n_k]``.
    """
    S = q.shape[1]
    cfg = cluster_config(q.device, q.dtype, q.shape[-1], cluster_kernel(q))
    sched = build_cluster_schedule(mask, q_sizes, k_sizes, S, cfg.tiles)
    return cluster_attention(q, kp, vp, q_perm.to(torch.int32), sched, scale, cfg)
