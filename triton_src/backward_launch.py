"""Host side of the backward: launches, and the differentiable forward as a torch custom op.

``torch.ops.lvsa_kernels.triton_block_sparse_fwd_train`` runs a forward kernel (the portable `launch.launch`,
or the Hopper `launch.launch_hopper` at exact precision) and has an autograd formula
(`torch.library.register_autograd`) that calls ``torch.ops.lvsa_kernels.triton_block_sparse_bwd``: the delta
pre-pass, then the dK/dV and dQ kernels of `block_sparse_bwd.py`. Both ops have fake implementations, so
``torch.compile`` traces forward and backward without graph breaks. The forward saves q, k, v (the autograd
inputs), ``out`` and ``lse``; the schedules are the layout's cached index arrays.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import triton
from torch import Tensor

from .block_sparse_bwd import block_sparse_attn_bwd_dkdv, block_sparse_attn_bwd_dq, bwd_preprocess
from .interpreter import interpreting, launch_lock
from .launch import check_launch, launch, launch_hopper
from .schedule import KernelSchedule, build_key_schedule, build_key_tiles, build_schedule
from .tuning import KernelConfig
from ..reference.layout import BlockSparseLayout

__all__ = ["BackwardConfig", "backward_config", "launch_backward", "run_trainable"]


@dataclass(frozen=True)
class BackwardConfig:
    """Backward tile sizes: dK/dV programs own key tiles of ``block_n`` keys and step through their query spans
    ``block_m`` rows at a time; dQ programs own the forward's query tiles and step ``block_n`` keys at a time."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


INTERPRETER_BACKWARD = BackwardConfig(16, 16, 1, 1)


def backward_config(dtype: torch.dtype, head_dim: int) -> BackwardConfig:
    """The default backward config (not tuned per problem): small fp32 tiles; half precision 64 query rows x
    128 keys, the fastest of four configs at head dim 128 on an H100 (Wan T=121 W=4: 317 ms against 350-514 ms
    for 32x128, 128x64 and 64x64, `bench/results/h100_s5_backward_bench.json`); head dim 64 takes the same tiles
    with 4 warps (not measured)."""
    if interpreting():
        return INTERPRETER_BACKWARD
    if dtype == torch.float32:
        return BackwardConfig(32, 32, 4, 2)
    return BackwardConfig(64, 128, 4 if head_dim <= 64 else 8, 2)


def launch_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dlse: Optional[Tensor],
                    dq: Tensor, dk: Tensor, dv: Tensor, q_sched: KernelSchedule, k_sched: KernelSchedule,
                    per_head_layout: bool, scale: float, cfg: BackwardConfig) -> None:
    """Write ``dq [B, Sq, H, D]``, ``dk``, ``dv [B, Skv, H_kv, D]`` (every element).

    ``q_sched``: the forward's query tiles (any ``block_m``); ``k_sched``: `build_key_schedule`'s key tiles of
    ``cfg.block_n`` keys. ``lse [B, H, Sq]`` float32 from the forward; ``dlse`` its gradient or None.
    """
    max_q_tiles, max_k_tiles = q_sched.max_tiles, k_sched.max_tiles
    B, Sq, H, D = q.shape
    Skv, Hkv = k.shape[1], k.shape[2]
    group = H // Hkv
    if B == 0 or Sq == 0 or max_q_tiles == 0:
        for t in (dq, dk, dv):
            t.zero_()
        return
    dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"
    delta = torch.empty(B, H, Sq, dtype=torch.float32, device=q.device)
    # per-head layouts with GQA: one dK/dV per query head, summed over each group below (no atomics)
    per_query_head = per_head_layout and group > 1
    dk_buf = torch.empty(B, Skv, H, D, dtype=torch.float32, device=q.device) if per_query_head else dk
    dv_buf = torch.empty(B, Skv, H, D, dtype=torch.float32, device=q.device) if per_query_head else dv
    common = dict(NUM_HEADS=H, KV_GROUP=group, PER_HEAD_LAYOUT=per_head_layout, HEAD_DIM=D,
                  DOT_PRECISION=dot_precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    with launch_lock():
        bwd_preprocess[(triton.cdiv(Sq, 64), B * H)](
            out, do, dlse if dlse is not None else delta, delta,
            out.stride(0), out.stride(1), out.stride(2), do.stride(0), do.stride(1), do.stride(2), Sq,
            NUM_HEADS=H, HEAD_DIM=D, BLOCK_M=64, HAS_DLSE=dlse is not None)
        if max_k_tiles:
            block_sparse_attn_bwd_dkdv[(max_k_tiles, B * (H if per_head_layout else Hkv))](
                q, k, v, do, dk_buf, dv_buf, lse, delta,
                *_strides(q, k, v, do, dk_buf, dv_buf), *k_sched.tensors(), scale, Sq,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **common)
        block_sparse_attn_bwd_dq[(max_q_tiles, B * H)](
            q, k, v, do, dq, lse, delta,
            *_strides(q, k, v, do, dq), *q_sched.tensors(), scale, Sq,
            BLOCK_M=q_sched.block_m, BLOCK_N=cfg.block_n, **common)
    if not max_k_tiles:
        dk.zero_()
        dv.zero_()
    elif per_query_head:
        dk.copy_(dk_buf.view(B, Skv, Hkv, group, D).sum(3))
        dv.copy_(dv_buf.view(B, Skv, Hkv, group, D).sum(3))


def _strides(*ts: Tensor):
    return [s for t in ts for s in (t.stride(0), t.stride(1), t.stride(2))]


@torch.library.custom_op("lvsa_kernels::triton_block_sparse_fwd_train", mutates_args=())
def triton_block_sparse_fwd_train(
    q: Tensor, k: Tensor, v: Tensor, q_sched: List[Tensor], k_sched: List[Tensor], key_tiles: List[Tensor],
    max_q_tiles: int, max_k_tiles: int, per_head_layout: bool, scale: float,
    kernel: str, block_m: int, block_n: int, num_warps: int, num_stages: int, use_tma: bool, warp_spec: bool,
    exp2_poly: int, short_n: int, bwd_block_m: int, bwd_block_n: int, bwd_warps: int, bwd_stages: int,
) -> Tuple[Tensor, Tensor]:
    """The forward (``out [B, Sq, H, D]``, ``lse [B, H, Sq]`` float32) with a backward: ``q_sched`` is its
    `KernelSchedule` (tiles of ``block_m``), ``k_sched`` the backward's key schedule (tiles of ``bwd_block_n``),
    both as ``tensors()``. ``kernel`` ``"portable"`` or ``"hopper"`` (then ``key_tiles`` are its `KeyTiles`
    ``tensors()`` with ``short_n``; empty for the portable kernel); the forward ints are its `KernelConfig`, the
    ``bwd_*`` ints the `BackwardConfig`."""
    B, Sq, H, D = q.shape
    out = torch.empty(B, Sq, H, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, Sq, dtype=torch.float32, device=q.device)
    cfg = KernelConfig(block_m, block_n, num_warps, num_stages, use_tma, warp_spec, kernel, exp2_poly)
    if kernel == "hopper":
        launch_hopper(q, k, v, out, lse, tuple(q_sched), tuple(key_tiles), short_n, max_q_tiles, per_head_layout,
                      scale, cfg)
    else:
        launch(q, k, v, out, lse, tuple(q_sched), max_q_tiles, per_head_layout, scale, cfg)
    return out, lse


@triton_block_sparse_fwd_train.register_fake
def _fake_fwd(q, k, v, *args):
    B, Sq, H, D = q.shape
    return q.new_empty(B, Sq, H, D), q.new_empty(B, H, Sq, dtype=torch.float32)


@torch.library.custom_op("lvsa_kernels::triton_block_sparse_bwd", mutates_args=())
def triton_block_sparse_bwd(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dlse: Optional[Tensor],
    q_sched: List[Tensor], k_sched: List[Tensor], max_q_tiles: int, max_k_tiles: int, per_head_layout: bool,
    scale: float, block_m: int, bwd_block_m: int, bwd_block_n: int, bwd_warps: int, bwd_stages: int,
) -> Tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` of `triton_block_sparse_fwd_train` for output gradient ``do`` (and lse gradient ``dlse``)."""
    if do.stride(-1) != 1:
        do = do.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    launch_backward(do, q, k, v, out, lse, None if dlse is None else dlse.contiguous(), dq, dk, dv,
                    KernelSchedule(block_m, *q_sched, max_q_tiles), KernelSchedule(bwd_block_n, *k_sched, max_k_tiles),
                    per_head_layout, scale, BackwardConfig(bwd_block_m, bwd_block_n, bwd_warps, bwd_stages))
    return dq, dk, dv


@triton_block_sparse_bwd.register_fake
def _fake_bwd(do, q, k, v, *args):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    (q, k, v, q_sched, k_sched, key_tiles, max_q_tiles, max_k_tiles, per_head_layout, scale, _kernel, block_m,
     _block_n, _num_warps, _num_stages, _use_tma, _warp_spec, _exp2_poly, _short_n, *bwd_config) = inputs
    ctx.save_for_backward(q, k, v, *output, *q_sched, *k_sched)
    ctx.n_sched = len(q_sched)
    ctx.n_key_tiles = len(key_tiles)
    ctx.args = (max_q_tiles, max_k_tiles, per_head_layout, scale, block_m, *bwd_config)
    ctx.n_inputs = len(inputs)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, *sched = ctx.saved_tensors
    n = ctx.n_sched
    dq, dk, dv = torch.ops.lvsa_kernels.triton_block_sparse_bwd(dout, q, k, v, out, lse, dlse, sched[:n], sched[n:],
                                                                *ctx.args)
    # the schedule and key-tile lists take one None per element
    lists = ([None] * n, [None] * (len(sched) - n), [None] * ctx.n_key_tiles)
    return (dq, dk, dv) + lists + (None,) * (ctx.n_inputs - 6)


triton_block_sparse_fwd_train.register_autograd(_backward, setup_context=_setup_context)


def run_trainable(q: Tensor, k: Tensor, v: Tensor, layout: BlockSparseLayout, scale: float, cfg: KernelConfig,
                  bwd: BackwardConfig) -> Tuple[Tensor, Tensor]:
    """``(out, lse)`` of the forward kernel at ``cfg`` (portable, or Hopper at exact precision), differentiable
    in q, k and v through the backward kernels at ``bwd``. Schedules are built once per layout and cached."""
    q_sched = build_schedule(layout, cfg.block_m, q.device)
    k_sched = build_key_schedule(layout, bwd.block_n, q.device)
    tiles = build_key_tiles(layout, cfg.block_n, q.device) if cfg.kernel == "hopper" else None
    check_launch(q_sched, tiles, cfg, "exact")
    key_tiles, short_n = (list(tiles.tensors()), tiles.short_n) if tiles is not None else ([], 0)
    return torch.ops.lvsa_kernels.triton_block_sparse_fwd_train(
        q, k, v, list(q_sched.tensors()), list(k_sched.tensors()), key_tiles, q_sched.max_tiles, k_sched.max_tiles,
        layout.num_heads > 1, scale, cfg.kernel, cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages,
        cfg.use_tma, cfg.warp_spec, cfg.exp2_poly, short_n, bwd.block_m, bwd.block_n, bwd.num_warps,
        bwd.num_stages)
