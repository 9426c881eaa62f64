"""Host side of the SVOO cluster kernels: launch configs, the custom op and the assignment wrapper.

``torch.ops.lvsa_kernels.triton_cluster_attn_fwd`` has a fake implementation, so ``torch.compile``
traces through it. Launch configs are fixed per device class (measured on the H100, see
``bench/RESULTS.md``); ``LVSA_KERNELS_CLUSTER_CONFIG="BLOCK_M,BLOCK_N,warps,stages"`` overrides them.
"""
from __future__ import annotations

import os
from typing import Tuple

import torch
import triton
from torch import Tensor

from .block_sparse_fwd import LOG2E
from .cluster_attn import assign_argmax, cluster_attn_fwd
from .cluster_schedule import ClusterSchedule
from .tuning import KernelConfig, interpreting

__all__ = ["CONFIG_ENV", "assign_labels", "cluster_attention", "cluster_config"]

CONFIG_ENV = "LVSA_KERNELS_CLUSTER_CONFIG"


def cluster_config(device: torch.device, dtype: torch.dtype, head_dim: int) -> KernelConfig:
    """Launch config of `cluster_attn_fwd` for ``device`` / ``dtype`` / ``head_dim``."""
    env = os.environ.get(CONFIG_ENV)
    if env:
        try:
            bm, bn, warps, stages = (int(x) for x in env.split(","))
        except ValueError:
            raise ValueError(f"{CONFIG_ENV}: expected 'BLOCK_M,BLOCK_N,warps,stages', got {env!r}") from None
        return KernelConfig(bm, bn, warps, stages)
    if interpreting() or device.type != "cuda":
        return KernelConfig(16, 16, 1, 1)
    if dtype == torch.float32:
        return KernelConfig(64, 32, 4, 2)
    return KernelConfig(128, 128, 8, 3) if head_dim > 64 else KernelConfig(128, 128, 4, 3)


@torch.library.custom_op("lvsa_kernels::triton_cluster_attn_fwd", mutates_args=())
def triton_cluster_attn_fwd(
    q: Tensor, kp: Tensor, vp: Tensor, q_perm: Tensor,
    tile_row: Tensor, tile_q0: Tensor, tile_q1: Tensor, key_tiles: Tensor, key_count: Tensor,
    scale: float, block_m: int, block_n: int, window: int, num_warps: int, num_stages: int,
) -> Tuple[Tensor, Tensor]:
    """Cluster-packed attention: returns ``(out [B, S, H, D], lse [B, H, S] float32)`` in token order."""
    B, S, H, D = q.shape
    out = torch.empty(B, S, H, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, S, dtype=torch.float32, device=q.device)
    if B * H == 0 or S == 0:
        return out, lse
    grid = (tile_q0.shape[1], B * H)
    cluster_attn_fwd[grid](
        q, kp, vp, out, lse, q_perm,
        q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1), out.stride(2),
        tile_row, tile_q0, tile_q1, key_tiles, key_count,
        scale * LOG2E, S, tile_q0.shape[1], key_tiles.shape[1],
        NUM_HEADS=H, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, WINDOW=window,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse


@triton_cluster_attn_fwd.register_fake
def _fake(q, *args, **kwargs):
    B, S, H, D = q.shape
    return q.new_empty(B, S, H, D), q.new_empty(B, H, S, dtype=torch.float32)


def cluster_attention(q: Tensor, kp: Tensor, vp: Tensor, q_perm: Tensor, sched: ClusterSchedule, scale: float,
                      cfg: KernelConfig) -> Tuple[Tensor, Tensor]:
    """Attention of every query cluster to its selected key clusters.

    Args:
        q: ``[B, S, H, D]`` in token order (last dim contiguous).
        kp, vp: ``[B * H, S, D]`` contiguous, keys/values in key-cluster order.
        q_perm: int32 ``[B * H, S]``: position ``s`` in query-cluster order holds token ``q_perm[g, s]``.
        sched: from `build_cluster_schedule` with ``cfg.block_m`` / ``cfg.block_n``.
    Returns ``(out [B, S, H, D], lse [B, H, S] float32)`` in token order.
    """
    if (sched.block_m, sched.block_n) != (cfg.block_m, cfg.block_n):
        raise ValueError(f"sched: built for tiles {sched.block_m}x{sched.block_n}, config has {cfg}")
    if q.shape[1] * q.shape[3] >= 2**31:
        raise ValueError(f"q: S * D must stay below 2**31 (int32 offsets per group), got shape {tuple(q.shape)}")
    return torch.ops.lvsa_kernels.triton_cluster_attn_fwd(
        q, kp, vp, q_perm, *sched.tensors(), scale, cfg.block_m, cfg.block_n, sched.window, cfg.num_warps,
        cfg.num_stages)


def assign_labels(x: Tensor, weights: Tensor, gemm_dtype: torch.dtype) -> Tensor:
    """int64 ``[G, N]`` labels ``argmax_j x·W_j`` (first index on ties), scores never stored.

    x ``[G, N, d]``, weights ``[G, J, d]``; both are cast to ``gemm_dtype`` (float32: exact IEEE dot
    products; bf16/fp16: tensor-core GEMM with float32 accumulation, where near-ties may flip).
    """
    G, N, d = x.shape
    J = weights.shape[1]
    x = x.to(gemm_dtype).contiguous()
    w = weights.to(gemm_dtype).contiguous()
    labels = torch.empty(G, N, dtype=torch.int64, device=x.device)
    if interpreting() or x.device.type != "cuda":
        bm, bj, warps, stages = 16, 16, 1, 1
    else:
        bm, bj, warps, stages = (64, 64, 4, 2) if gemm_dtype == torch.float32 else (128, 128, 8, 2)
    if G and N:
        assign_argmax[(triton.cdiv(N, bm), G)](x, w, labels, N, J, HEAD_DIM=d, BLOCK_M=bm, BLOCK_J=bj,
                                                DOT_PRECISION="ieee", num_warps=warps, num_stages=stages)
    return labels

