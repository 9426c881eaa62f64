"""Host side of the Triton kernel: the launch, and its registration as a torch custom op.

``torch.ops.lvsa_kernels.triton_block_sparse_fwd`` has a fake (meta) implementation, so
``torch.compile(fullgraph=True)`` traces through `block_sparse_attn(..., backend="triton")` without
graph breaks. The schedule arrays (see `schedule.py`) are ordinary tensor arguments of the op.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
from torch import Tensor

from .block_sparse_fwd import LOG2E, block_sparse_attn_fwd
from .interpreter import launch_lock
from .schedule import KernelSchedule
from .tuning import KernelConfig

__all__ = ["launch", "run_scheduled", "tma_eligible"]

_allocator_set = False


def _ensure_tma_allocator() -> None:
    """On-device tensor descriptors need a global scratch allocator (set once per process)."""
    global _allocator_set
    if not _allocator_set:
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
        _allocator_set = True


def tma_eligible(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether K/V can be read through tensor descriptors (Hopper+, 16-byte aligned rows and bases)."""
    if k.device.type != "cuda" or torch.cuda.get_device_capability(k.device)[0] < 9:
        return False
    e = k.element_size()
    return all(t.data_ptr() % 16 == 0 and all((s * e) % 16 == 0 for s in t.stride()[:3]) for t in (k, v))


def launch(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, sched_tensors: Tuple[Tensor, ...],
           max_tiles: int, per_head_layout: bool, scale: float, cfg: KernelConfig):
    """Run the kernel writing ``out [B, Sq, H, D]`` and ``lse [B, H, Sq]`` (contiguous float32).

    Returns Triton's compiled-kernel handle (register/spill counts for diagnostics), or None if nothing ran.
    """
    B, Sq, H, D = q.shape
    if max_tiles == 0 or B == 0:
        return None
    if cfg.use_tma:
        _ensure_tma_allocator()
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    grid = (max_tiles, B * H)
    with launch_lock():
        return block_sparse_attn_fwd[grid](
            q, k, v, out, lse,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            *sched_tensors,
            scale * LOG2E, Sq, k.shape[1],
            NUM_HEADS=H, KV_GROUP=H // k.shape[2], PER_HEAD_LAYOUT=per_head_layout,
            HEAD_DIM=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            USE_TMA=cfg.use_tma, DOT_PRECISION=precision, WARP_SPEC=cfg.warp_spec,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )


@torch.library.custom_op("lvsa_kernels::triton_block_sparse_fwd", mutates_args=())
def triton_block_sparse_fwd(
    q: Tensor, k: Tensor, v: Tensor,
    tile_ptr: Tensor, tile_start: Tensor, tile_end: Tensor, tile_row: Tensor,
    span_ptr: Tensor, span_start: Tensor, span_end: Tensor,
    max_tiles: int, per_head_layout: bool, scale: float,
    block_m: int, block_n: int, num_warps: int, num_stages: int, use_tma: bool, warp_spec: bool,
) -> Tuple[Tensor, Tensor]:
    """Block-sparse attention forward: returns ``(out [B, Sq, H, D], lse [B, H, Sq] float32)``."""
    B, Sq, H, D = q.shape
    out = torch.empty(B, Sq, H, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, Sq, dtype=torch.float32, device=q.device)
    sched = (tile_ptr, tile_start, tile_end, tile_row, span_ptr, span_start, span_end)
    cfg = KernelConfig(block_m, block_n, num_warps, num_stages, use_tma, warp_spec)
    launch(q, k, v, out, lse, sched, max_tiles, per_head_layout, scale, cfg)
    return out, lse


@triton_block_sparse_fwd.register_fake
def _fake(q, k, v, *args, **kwargs):
    B, Sq, H, D = q.shape
    return q.new_empty(B, Sq, H, D), q.new_empty(B, H, Sq, dtype=torch.float32)


def run_scheduled(q: Tensor, k: Tensor, v: Tensor, sched: KernelSchedule, per_head_layout: bool,
                  scale: float, cfg: KernelConfig, out: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Run with a prepared schedule; through the custom op unless ``out`` (a buffer to write) is given."""
    if out is None:
        return torch.ops.lvsa_kernels.triton_block_sparse_fwd(
            q, k, v, *sched.tensors(), sched.max_tiles, per_head_layout, scale,
            cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages, cfg.use_tma, cfg.warp_spec)
    lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32, device=q.device)
    launch(q, k, v, out, lse, sched.tensors(), sched.max_tiles, per_head_layout, scale, cfg)
    return out, lse
