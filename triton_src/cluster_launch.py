"""Host side of the SVOO cluster kernels: launch configs, the custom op and the assignment wrapper.

``torch.ops.lvsa_kernels.triton_cluster_attn_fwd`` has a fake implementation, so ``torch.compile``
traces through it. Launch configs are fixed per device class (measured on the H100, see
``bench/RESULTS.md``) and can be overridden with ``LVSA_KERNELS_CLUSTER_CONFIG``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Tuple

import torch
import triton
from torch import Tensor

from .block_sparse_fwd import LOG2E
from .cluster_attn import assign_argmax, cluster_attn_fwd
from .cluster_schedule import ClusterSchedule
from .interpreter import interpreting, launch_lock
from .tuning import KernelConfig

__all__ = ["CONFIG_ENV", "ClusterConfig", "assign_labels", "cluster_attention", "cluster_config"]

CONFIG_ENV = "LVSA_KERNELS_CLUSTER_CONFIG"
# The Hopper cluster kernel's registers: the launch caps each of its 384 threads at CLUSTER_MAXNREG (64K in all);
# inside (setmaxnreg) the second consumer warpgroup takes CLUSTER_CONSUMER_REGS and the producer warpgroup
# CLUSTER_PRODUCER_REGS.
CLUSTER_MAXNREG = 168
CLUSTER_CONSUMER_REGS = 224
CLUSTER_PRODUCER_REGS = 56


@dataclass(frozen=True)
class ClusterConfig:
    """Launch configs of the cluster kernel: big query tiles first, then optionally small remainder tiles."""

    parts: Tuple[KernelConfig, ...]

    @property
    def tiles(self) -> List[Tuple[int, int]]:
        """``(block_m, block_n)`` per launch, as `build_cluster_schedule` takes them."""
        return [(c.block_m, c.block_n) for c in self.parts]

    def __str__(self) -> str:
        return " + ".join(f"{c.block_m}x{c.block_n}/{c.num_warps}w/{c.num_stages}s" for c in self.parts)


def cluster_hopper_meta(head_dim: int, dtype: torch.dtype, block_n: int, stages: int, window: int) -> dict:
    """`cluster_hopper.cluster_attn_fwd_hopper`'s compile-time arguments beyond the head count: tile shapes,
    NVMMA shared layouts of the Q halves and K/V tiles, the register split and the launch options. Shared by
    the launch and `compile_check`."""
    from triton.experimental.gluon import language as gl

    from .block_sparse_hopper import HALF_M

    el = gl.bfloat16 if dtype == torch.bfloat16 else gl.float16
    return dict(
        HEAD_DIM=head_dim, BLOCK_N=block_n, WINDOW=window, STAGES=stages,
        Q_LAYOUT=gl.NVMMASharedLayout.get_default_for([int(HALF_M), head_dim], el),
        KV_LAYOUT=gl.NVMMASharedLayout.get_default_for([block_n, head_dim], el),
        CONSUMER_REGS=CLUSTER_CONSUMER_REGS, PRODUCER_REGS=CLUSTER_PRODUCER_REGS, num_warps=4,
        maxnreg=CLUSTER_MAXNREG,
    )


def cluster_config(device: torch.device, dtype: torch.dtype, head_dim: int) -> ClusterConfig:
    """Launch configs of `cluster_attn_fwd` for ``device`` / ``dtype`` / ``head_dim`` (measured on the H100:
    ``bench/RESULTS.md``). ``LVSA_KERNELS_CLUSTER_CONFIG="128,128,8,3;64,64,4,3"`` overrides them
    (``BLOCK_M,BLOCK_N,warps,stages`` per launch)."""
    env = os.environ.get(CONFIG_ENV)
    if env:
        try:
            parts = tuple(KernelConfig(*(int(x) for x in part.split(","))) for part in env.split(";"))
        except (TypeError, ValueError):
            raise ValueError(f"{CONFIG_ENV}: expected 'BLOCK_M,BLOCK_N,warps,stages[;...]', got {env!r}") from None
        return ClusterConfig(parts)
    if interpreting() or device.type != "cuda":
        return ClusterConfig((KernelConfig(32, 16, 1, 1), KernelConfig(16, 16, 1, 1)))
    if dtype == torch.float32:
        return ClusterConfig((KernelConfig(64, 32, 4, 2),))
    warps = 8 if head_dim > 64 else 4
    return ClusterConfig((KernelConfig(128, 128, warps, 3), KernelConfig(64, 64, 4, 3)))


@torch.library.custom_op("lvsa_kernels::triton_cluster_attn_fwd", mutates_args=())
def triton_cluster_attn_fwd(q: Tensor, kp: Tensor, vp: Tensor, q_perm: Tensor, tiles: List[Tensor], meta: List[int],
                            scale: float) -> Tuple[Tensor, Tensor]:
    """Cluster-packed attention: returns ``(out [B, S, H, D], lse [B, H, S] float32)`` in token order.

    ``tiles``: per launch ``query rows, q0, q1, key records, key counts``; ``meta``: ``window`` then per
    launch ``block_m, block_n, warps, stages`` (see `cluster_attention`).
    """
    B, S, H, D = q.shape
    out = torch.empty(B, S, H, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, S, dtype=torch.float32, device=q.device)
    if B * H == 0 or S == 0:
        return out, lse
    window = meta[0]
    for part in range(len(tiles) // 5):
        row, q0, q1, records, count = tiles[5 * part:5 * part + 5]
        block_m, block_n, warps, stages = meta[1 + 4 * part:5 + 4 * part]
        with launch_lock():
            cluster_attn_fwd[(q0.shape[1], B * H)](
                q, kp, vp, out, lse, q_perm,
                q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1), out.stride(2),
                row, q0, q1, records, count,
                scale * LOG2E, S, q0.shape[1], records.shape[1],
                NUM_HEADS=H, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, WINDOW=window,
                DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                num_warps=warps, num_stages=stages,
            )
    return out, lse


@triton_cluster_attn_fwd.register_fake
def _fake(q, *args, **kwargs):
    B, S, H, D = q.shape
    return q.new_empty(B, S, H, D), q.new_empty(B, H, S, dtype=torch.float32)


def cluster_attention(q: Tensor, kp: Tensor, vp: Tensor, q_perm: Tensor, sched: ClusterSchedule, scale: float,
                      cfg: ClusterConfig) -> Tuple[Tensor, Tensor]:
    """Attention of every query cluster to its selected key clusters.

    Args:
        q: ``[B, S, H, D]`` in token order (last dim contiguous).
        kp, vp: ``[B * H, S, D]`` contiguous, keys/values in key-cluster order.
        q_perm: int32 ``[B * H, S]``: position ``s`` in query-cluster order holds token ``q_perm[g, s]``.
        sched: from `build_cluster_schedule` with ``cfg.tiles``.
    Returns ``(out [B, S, H, D], lse [B, H, S] float32)`` in token order.
    """
    built = [(qt.block_m, kt.block_n) for qt, kt in sched.parts]
    if built != cfg.tiles:
        raise ValueError(f"sched: built for tiles {built}, config {cfg} has {cfg.tiles}")
    if q.shape[1] * q.shape[3] >= 2**31:
        raise ValueError(f"q: S * D must stay below 2**31 (int32 offsets per group), got shape {tuple(q.shape)}")
    tiles = [t for qt, kt in sched.parts for t in (qt.row, qt.q0, qt.q1, kt.records, kt.count)]
    meta = [sched.window] + [x for c in cfg.parts for x in (c.block_m, c.block_n, c.num_warps, c.num_stages)]
    return torch.ops.lvsa_kernels.triton_cluster_attn_fwd(q, kp, vp, q_perm, tiles, meta, scale)


def assign_labels(x: Tensor, weights: Tensor, gemm_dtype: torch.dtype) -> Tensor:
    """int64 ``[G, N]`` labels ``argmax_j x·W_j`` (first index on ties), scores never stored.

    x ``[G, N, d]`` (any strides, e.g. a view of ``[1, S, H, D]``), weights ``[G, J, d]``; both are cast to ``gemm_dtype`` (float32: exact IEEE dot
    products; bf16/fp16: tensor-core GEMM with float32 accumulation, where near-ties may flip).
    """
    G, N, d = x.shape
    J = weights.shape[1]
    x = x.to(gemm_dtype)
    if x.stride(-1) != 1:
        x = x.contiguous()
    w = weights.to(gemm_dtype).contiguous()
    labels = torch.empty(G, N, dtype=torch.int64, device=x.device)
    if interpreting() or x.device.type != "cuda":
        bm, bj, warps, stages = 16, 16, 1, 1
    else:
        # bf16: 256 x 64 tiles measured fastest on the H100 (579 / 188 us for the key / query side at 720p)
        bm, bj, warps, stages = (64, 64, 4, 2) if gemm_dtype == torch.float32 else (256, 64, 8, 3)
    if G and N:
        with launch_lock():
            assign_argmax[(triton.cdiv(N, bm), G)](x, w, labels, x.stride(0), x.stride(1), N, J, HEAD_DIM=d,
                                                    BLOCK_M=bm, BLOCK_J=bj,
                                                    DOT_PRECISION="ieee", num_warps=warps, num_stages=stages)
    return labels

