"""Host side of the SVOO cluster kernels: kernel choice, launch configs, the custom op and the assignment wrapper.

Two kernels run the packed cluster attention: the portable Triton kernel (`cluster_attn.cluster_attn_fwd`, any
GPU and the CPU interpreter) and the warp-specialised Gluon kernel for sm_90 (`cluster_hopper`, bf16/fp16, head
dim 64 or 128). `cluster_kernel` runs the Hopper one wherever it can run, else the portable one;
``LVSA_KERNELS_CLUSTER_KERNEL`` forces either (``hopper`` where it cannot run is an error, never a silent fallback).
``torch.ops.lvsa_kernels.triton_cluster_attn_fwd`` has a fake implementation, so ``torch.compile``
traces through it. Launch configs are fixed per kernel and device class (measured on the H100, see
``bench/RESULTS.md``) and can be overridden with ``LVSA_KERNELS_CLUSTER_CONFIG``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import triton
from torch import Tensor

from .block_sparse_fwd import LOG2E
from .cluster_attn import assign_argmax, cluster_attn_fwd
from .cluster_schedule import ClusterSchedule
from .gluon_compat import triton_release
from .interpreter import interpreting, launch_lock
from .launch import hopper_device_refusal
from .tuning import KernelConfig

__all__ = ["CONFIG_ENV", "KERNEL_ENV", "ClusterConfig", "assign_labels", "cluster_attention", "cluster_config",
           "cluster_hopper_meta", "cluster_hopper_refusal", "cluster_kernel"]

CONFIG_ENV = "LVSA_KERNELS_CLUSTER_CONFIG"
KERNEL_ENV = "LVSA_KERNELS_CLUSTER_KERNEL"
KERNELS = ("auto", "hopper", "portable")
SM90_SHARED_BYTES = 232448  # shared memory one block may use on an H100/H200 (227 KiB)
# Triton releases the Hopper cluster kernel is offered on: those where `compile_check` finds no local-memory
# instruction in its loops (3.8.0 spills in the consumer loops at head dim 128: 114 in-loop spill instructions).
CLUSTER_TRITON = ("3.6", "3.7", "3.9")
# The Hopper cluster kernel's registers: the launch caps each of its 384 threads at CLUSTER_MAXNREG (64K in all);
# inside (setmaxnreg) the second consumer warpgroup takes CLUSTER_CONSUMER_REGS and the producer warpgroup
# CLUSTER_PRODUCER_REGS.
CLUSTER_MAXNREG = 168
CLUSTER_CONSUMER_REGS = 224
CLUSTER_PRODUCER_REGS = 56


@dataclass(frozen=True)
class ClusterConfig:
    """Launch configs of the cluster kernels: big query tiles first, then optionally small remainder tiles; each
    part runs the kernel its `KernelConfig.kernel` names (``"portable"`` or ``"hopper"``)."""

    parts: Tuple[KernelConfig, ...]

    @property
    def tiles(self) -> List[Tuple[int, int]]:
        """``(block_m, block_n)`` per launch, as `build_cluster_schedule` takes them."""
        return [(c.block_m, c.block_n) for c in self.parts]

    def __str__(self) -> str:
        return " + ".join(f"{'hopper ' if c.kernel == 'hopper' else ''}{c.block_m}x{c.block_n}/{c.num_warps}w/"
                          f"{c.num_stages}s" for c in self.parts)

    @property
    def kernel(self) -> str:
        """``"hopper"``, ``"portable"`` or ``"mixed"``: which kernel runs the parts."""
        kernels = {c.kernel for c in self.parts}
        return kernels.pop() if len(kernels) == 1 else "mixed"


def cluster_hopper_refusal(q: Tensor) -> Optional[str]:
    """Why the Hopper cluster kernel cannot run on ``q [B, S, H, D]`` (None: it can): an sm_90 GPU and a tested
    Triton release (`launch.hopper_device_refusal`), bf16/fp16, head dim 64 or 128, and q rows the 16-byte
    ``cp.async`` copies can read (16-byte aligned base and strides). KP/VP/out are allocated contiguous."""
    return _hopper_shape_refusal(q) or _hopper_alignment_refusal(q)


def _hopper_shape_refusal(q: Tensor) -> Optional[str]:
    """`cluster_hopper_refusal` without the alignment (which needs a real tensor, not one being traced)."""
    if interpreting():
        return "cannot run in Triton's CPU interpreter (Gluon)"
    reason = hopper_device_refusal(q.device)
    if reason is not None:
        return reason
    if triton_release() not in CLUSTER_TRITON:
        return (f"is not offered on Triton {triton.__version__} (its loops spill registers there; offered on "
                f"{', '.join(CLUSTER_TRITON)})")
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"takes bf16 or fp16, got {str(q.dtype).replace('torch.', '')}"
    if q.shape[-1] not in (64, 128):
        return f"takes head dim 64 or 128, got {q.shape[-1]}"
    return None


def _hopper_alignment_refusal(q: Tensor) -> Optional[str]:
    # Triton treats an integer argument as aligned only when it divides by 16 (elements): a stride of 16 bytes
    # but not 16 elements would compile the Q gather without 16-byte cp.async copies, which fails
    if q.data_ptr() % 16 or any(s % 16 for s in q.stride()[:3]):
        return (f"needs q with a 16-byte aligned base pointer and strides divisible by 16 elements (16-byte "
                f"cp.async copies), got strides {tuple(q.stride())}")
    return None


def cluster_kernel(q: Tensor) -> str:
    """The cluster kernel for ``q``. ``LVSA_KERNELS_CLUSTER_KERNEL``: ``auto`` (default) runs the Hopper kernel
    where `cluster_hopper_refusal` finds nothing against it (0.78-0.82x the portable kernel's time at Wan 2.1
    1.3B shapes on an H100) and the portable one elsewhere; ``hopper`` forces the Hopper kernel (an error where
    it cannot run), ``portable`` the portable one. Under ``torch.compile`` only the device, dtype and head dim
    decide (a traced tensor has no address); the alignment is then checked at launch."""
    choice = os.environ.get(KERNEL_ENV, "auto").strip().lower() or "auto"
    if choice not in KERNELS:
        raise ValueError(f"{KERNEL_ENV}: expected one of {', '.join(KERNELS)}, got {choice!r}")
    if choice == "portable":
        return "portable"
    reason = _hopper_shape_refusal(q) if torch.compiler.is_compiling() else cluster_hopper_refusal(q)
    if choice == "hopper" and reason is not None:
        raise ValueError(f"{KERNEL_ENV}=hopper: the Hopper cluster kernel {reason}")
    return "hopper" if reason is None else "portable"


def cluster_hopper_meta(head_dim: int, dtype: torch.dtype, block_n: int, stages: int, window: int) -> dict:
    """`cluster_hopper.cluster_attn_fwd_hopper`'s compile-time arguments beyond the head count: tile shapes,
    NVMMA shared layouts of the Q halves and K/V tiles, the register split and the launch options. Shared by
    the launch and `compile_check`."""
    from triton.experimental.gluon import language as gl

    from .hopper_ring import HALF_M

    el = gl.bfloat16 if dtype == torch.bfloat16 else gl.float16
    return dict(
        HEAD_DIM=head_dim, BLOCK_N=block_n, WINDOW=window, STAGES=stages,
        Q_LAYOUT=gl.NVMMASharedLayout.get_default_for([int(HALF_M), head_dim], el),
        KV_LAYOUT=gl.NVMMASharedLayout.get_default_for([block_n, head_dim], el),
        CONSUMER_REGS=CLUSTER_CONSUMER_REGS, PRODUCER_REGS=CLUSTER_PRODUCER_REGS, num_warps=4,
        maxnreg=CLUSTER_MAXNREG,
    )


def cluster_config(device: torch.device, dtype: torch.dtype, head_dim: int,
                   kernel: str = "portable") -> ClusterConfig:
    """Launch configs of ``kernel`` (`cluster_kernel`) for ``device`` / ``dtype`` / ``head_dim`` (portable:
    measured on the H100, ``bench/RESULTS.md``). ``LVSA_KERNELS_CLUSTER_CONFIG="128,128,8,3;64,64,4,3"``
    overrides them (``BLOCK_M,BLOCK_N,warps,stages`` per launch, all run by ``kernel``).

    Hopper: one launch of 128-row query tiles (a shorter remainder leaves the second consumer idle) and
    128-column key tiles, a ring of 2 stages at head dim 128 (4 at 64: shared memory holds Q and the ring;
    non-power-of-two rings spill in the producer). ``"128,64,4,4"`` selects 64-column key tiles in 4 stages."""
    if kernel not in ("hopper", "portable"):
        raise ValueError(f"kernel: expected 'hopper' or 'portable', got {kernel!r}")
    env = os.environ.get(CONFIG_ENV)
    if env:
        try:
            parts = tuple(KernelConfig(*(int(x) for x in part.split(",")), kernel=kernel) for part in env.split(";"))
        except (TypeError, ValueError):
            raise ValueError(f"{CONFIG_ENV}: expected 'BLOCK_M,BLOCK_N,warps,stages[;...]', got {env!r}") from None
        return ClusterConfig(parts)
    if kernel == "hopper":
        return ClusterConfig((KernelConfig(128, 128, 4, 2 if head_dim > 64 else 4, kernel="hopper"),))
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
    launch ``block_m, block_n, warps, stages, hopper`` (see `cluster_attention`).
    """
    B, S, H, D = q.shape
    out = torch.empty(B, S, H, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, S, dtype=torch.float32, device=q.device)
    if B * H == 0 or S == 0:
        return out, lse
    window = meta[0]
    for part in range(len(tiles) // 5):
        row, q0, q1, records, count = tiles[5 * part:5 * part + 5]
        block_m, block_n, warps, stages, hopper = meta[1 + 5 * part:6 + 5 * part]
        if hopper:
            _launch_hopper(q, kp, vp, out, lse, q_perm, (row, q0, q1, records, count), scale, window, block_n, stages)
            continue
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


def _launch_hopper(q: Tensor, kp: Tensor, vp: Tensor, out: Tensor, lse: Tensor, q_perm: Tensor,
                   part: Tuple[Tensor, ...], scale: float, window: int, block_n: int, stages: int) -> None:
    """One launch of `cluster_hopper.cluster_attn_fwd_hopper` over the query tiles of ``part`` (a negative
    ``scale`` runs as ``-q`` with ``-scale``: the kernel's softmax needs a non-negative one)."""
    from .cluster_hopper import cluster_attn_fwd_hopper

    row, q0, q1, records, count = part
    B, S, H, D = q.shape
    reason = _hopper_alignment_refusal(q)
    if reason is not None:
        raise ValueError(f"q: the Hopper cluster kernel {reason}; run the portable one ({KERNEL_ENV}=portable)")
    if scale < 0:
        q, scale = -q, -scale
    try:
        cluster_attn_fwd_hopper[(q0.shape[1], B * H)](
            q, kp, vp, out, lse, q_perm,
            q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1), out.stride(2),
            row, q0, q1, records, count,
            scale * LOG2E, S, q0.shape[1], records.shape[1],
            NUM_HEADS=H, **cluster_hopper_meta(D, q.dtype, block_n, stages, window),
        )
    except Exception as exc:  # a compile or launch failure: say how to run without this kernel
        raise RuntimeError(f"the Hopper cluster kernel failed ({type(exc).__name__}, above); {KERNEL_ENV}=portable "
                           "runs the portable one") from exc


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
    for c in cfg.parts:
        if c.kernel == "hopper":
            _check_hopper_part(q, c)
    if q.shape[1] * q.shape[3] >= 2**31:
        raise ValueError(f"q: S * D must stay below 2**31 (int32 offsets per group), got shape {tuple(q.shape)}")
    tiles = [t for qt, kt in sched.parts for t in (qt.row, qt.q0, qt.q1, kt.records, kt.count)]
    meta = [sched.window] + [x for c in cfg.parts
                             for x in (c.block_m, c.block_n, c.num_warps, c.num_stages, int(c.kernel == "hopper"))]
    return torch.ops.lvsa_kernels.triton_cluster_attn_fwd(q, kp, vp, q_perm, tiles, meta, scale)


def _check_hopper_part(q: Tensor, cfg: KernelConfig) -> None:
    """A Hopper part must fit the kernel: a device and inputs it takes (`cluster_hopper_refusal`; the alignment is
    checked at launch), query tiles of at most 128 rows (two 64-row consumers), 64- or 128-column key tiles, a
    ring of at least 2 stages, and an sm_90 block's shared memory."""
    reason = _hopper_shape_refusal(q)
    if reason is not None:
        raise ValueError(f"cfg: {cfg} runs the Hopper cluster kernel, which {reason}")
    if not (0 < cfg.block_m <= 128 and cfg.block_n in (64, 128) and cfg.num_stages >= 2 and cfg.num_warps == 4):
        raise ValueError(f"cfg: the Hopper cluster kernel takes BLOCK_M <= 128, BLOCK_N 64 or 128, 4 warps and "
                         f">= 2 stages, got {cfg}")
    reason = hopper_shared_memory_refusal(cfg, q.element_size(), q.shape[-1])
    if reason is not None:
        raise ValueError(f"cfg: {reason}")


def hopper_shared_memory_refusal(cfg: KernelConfig, element_size: int, head_dim: int) -> Optional[str]:
    """Why a Hopper cluster-kernel config does not fit an sm_90 block's shared memory (None: it fits): two 64-row
    Q halves and ``num_stages`` K and V slots of ``block_n`` rows, plus a few hundred bytes of barriers."""
    ring = element_size * head_dim * (2 * 64 + 2 * cfg.num_stages * cfg.block_n)
    if ring > SM90_SHARED_BYTES - 1024:
        return (f"{cfg} needs {ring} bytes of shared memory at head dim {head_dim}; an sm_90 block has "
                f"{SM90_SHARED_BYTES} (fewer stages or 64-column key tiles fit)")
    return None


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

