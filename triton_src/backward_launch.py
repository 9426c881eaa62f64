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
from .launch import check_launch, descriptors_allowed, ensure_tma_allocator, launch, launch_hopper
from .schedule import KernelSchedule, build_key_schedule, build_key_tiles, build_pair_masks, build_schedule
from .tuning import KernelConfig
from ..reference.layout import BlockSparseLayout

__all__ = ["BackwardConfig", "BackwardSchedules", "BackwardTiles", "backward_config", "launch_backward", "launch_delta",
           "launch_dkdv", "launch_dq", "launch_single_pass", "run_trainable", "single_pass_config"]


@dataclass(frozen=True)
class BackwardTiles:
    """One backward kernel's launch: tiles of ``block_m`` query rows and ``block_n`` keys, warps, pipeline stages;
    ``use_tma`` reads the rows it walks through tensor descriptors where the tensors allow (Hopper, 16-byte
    aligned rows and bases; else pointer loads)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    use_tma: bool = False

    def __str__(self) -> str:
        return f"{self.block_m}x{self.block_n}x{self.num_warps}x{self.num_stages}{'+tma' if self.use_tma else ''}"


@dataclass(frozen=True)
class BackwardConfig:
    """The two backward kernels' launches. ``dkdv``: programs own key tiles of ``dkdv.block_n`` keys and step
    through their query spans ``dkdv.block_m`` rows at a time. ``dq``: programs own query tiles of ``dq.block_m``
    rows and step through their key spans ``dq.block_n`` keys at a time; None: the single pass, where the dK/dV
    kernel adds dQ with integer atomics into an exact int64 sum (no dQ kernel, two products fewer per pair,
    deterministic; the benchmarks' variant, 3x slower than the two kernels on an H100, no default uses it)."""

    dkdv: BackwardTiles
    dq: Optional[BackwardTiles]

    def __str__(self) -> str:
        return f"dkdv {self.dkdv}, dq {self.dq if self.dq is not None else 'single-pass'}"


INTERPRETER_BACKWARD = BackwardConfig(BackwardTiles(16, 16, 1, 1), BackwardTiles(16, 16, 1, 1))


# Half-precision launches for GPUs with less shared memory per block than Hopper's 227 KiB (A100 164 KiB, Ada and
# consumer Blackwell 99 KiB): 57 and 74 KiB at head dim 128, no spills compiled for sm_80 and sm_89 (not timed).
_SMALL_SMEM_BACKWARD = BackwardConfig(BackwardTiles(32, 64, 4, 2), BackwardTiles(64, 64, 4, 2))
_HOPPER_SMEM = 200 * 1024  # the default launches take up to 165 KiB (3 stages at head dim 128)


def backward_config(dtype: torch.dtype, head_dim: int, device: Optional[torch.device] = None) -> BackwardConfig:
    """The default backward launches (not tuned per problem): small fp32 tiles; in half precision, 8 warps and
    3 stages reading the walked rows through tensor descriptors, dK/dV over key tiles of 128 stepping 64 query
    rows, dQ over query tiles of 128 stepping 64 keys. Each kernel's fastest in a sweep at head dim 128 on an
    H100 (Wan T=121 W=4, `bench/results/h100_s7_backward_bench_call1.json`): dK/dV 147 ms against 161-216 ms for
    four others, dQ 108 ms against 111-127 ms for six others; with 4 warps both kernels spill registers inside
    their loops on sm_90 (`compile_check --kernel backward`). Head dim 64 takes the same (not timed). A CUDA
    ``device`` with less than 200 KiB of shared memory per block gets smaller launches that fit 99 KiB."""
    if interpreting():
        return INTERPRETER_BACKWARD
    if dtype == torch.float32:
        return BackwardConfig(BackwardTiles(32, 32, 4, 2), BackwardTiles(32, 32, 4, 2))
    if device is not None and torch.device(device).type == "cuda" and _shared_memory(torch.device(device)) < _HOPPER_SMEM:
        return _SMALL_SMEM_BACKWARD
    return BackwardConfig(BackwardTiles(64, 128, 8, 3, use_tma=True), BackwardTiles(128, 64, 8, 3, use_tma=True))


def single_pass_config(dtype: torch.dtype, head_dim: int, device: Optional[torch.device] = None) -> BackwardConfig:
    """The single pass's launch (`BackwardConfig` with ``dq=None``): `backward_config`'s dK/dV tiles, except in
    half precision on Hopper, where its 64-row steps spill registers inside the loop at head dim 128 once the
    dK/dV kernel also computes dQ; 32-row steps (8 warps, 3 stages, descriptor reads) compile spill-free for
    sm_90a at head dims 64 and 128 (`compile_check --kernel backward`). On an H100 at Wan T=121 W=4 this
    launch took 750 ms against 146 + 103 ms for the two kernels (its atomics are the bound)."""
    dkdv = backward_config(dtype, head_dim, device).dkdv
    if dkdv.use_tma and dkdv.block_m > 32:
        dkdv = BackwardTiles(32, dkdv.block_n, dkdv.num_warps, dkdv.num_stages, use_tma=True)
    return BackwardConfig(dkdv, None)


def _device_query(index: int) -> int:
    return int(triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"])


_SHARED_MEMORY: dict = {}  # device index -> bytes


@torch.compiler.assume_constant_result  # a traced training step reads it as a constant (no graph break)
def _shared_memory(device: torch.device) -> int:
    """Bytes of shared memory one block may use on ``device`` (Triton's own query, once per device)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SHARED_MEMORY:
        _SHARED_MEMORY[index] = _device_query(index)
    return _SHARED_MEMORY[index]


@dataclass(frozen=True)
class BackwardSchedules:
    """The index arrays the backward reads: ``dq``, the query tiles of ``dq.block_m`` (`build_schedule`); or,
    for the single pass, ``pair_masks`` (`build_pair_masks`: the rows with keys, the attended keys); ``dkdv``,
    the key tiles of ``dkdv.block_n`` (`build_key_schedule`)."""

    dq: Optional[KernelSchedule]
    dkdv: KernelSchedule
    pair_masks: Optional[Tuple[Tensor, Tensor]] = None

    @staticmethod
    def build(layout: BlockSparseLayout, cfg: BackwardConfig, device: torch.device) -> "BackwardSchedules":
        dkdv = build_key_schedule(layout, cfg.dkdv.block_n, device)
        if cfg.dq is None:
            return BackwardSchedules(None, dkdv, build_pair_masks(layout, device))
        return BackwardSchedules(build_schedule(layout, cfg.dq.block_m, device), dkdv)

    def dq_tensors(self) -> List[Tensor]:
        """What the differentiable op carries for dQ: the dQ schedule's tensors, or the single pass's masks."""
        return list(self.dq.tensors()) if self.dq is not None else list(self.pair_masks)


def launch_delta(do: Tensor, out: Tensor, dlse: Optional[Tensor], delta: Tensor, key_bound: Optional[Tensor] = None,
                 dq_unit: Optional[Tensor] = None, kv_len: int = 0) -> None:
    """``delta [B, H, Sq]`` float32 = rowsum(out * do) - dlse (`bwd_preprocess`); with ``key_bound [B, H, 2]``
    (`key_bounds`) and ``kv_len`` also ``dq_unit [B, H, Sq]`` float32, each row's unit of the single pass's
    int64 dQ sum."""
    B, Sq, H, D = out.shape
    with launch_lock():
        bwd_preprocess[(triton.cdiv(Sq, 64), B * H)](
            out, do, dlse if dlse is not None else delta, delta,
            key_bound if key_bound is not None else delta, dq_unit if dq_unit is not None else delta,
            out.stride(0), out.stride(1), out.stride(2), do.stride(0), do.stride(1), do.stride(2), Sq, kv_len,
            NUM_HEADS=H, HEAD_DIM=D, BLOCK_M=64, HAS_DLSE=dlse is not None, HAS_UNIT=dq_unit is not None)


def key_bounds(k: Tensor, v: Tensor, attended: Tensor, num_heads: int) -> Tensor:
    """``[B, H, 2]`` float32: ``max |K|`` and ``max_j ||V_j||`` over the keys each of the ``num_heads`` query
    heads attends (``attended``: `build_pair_masks`' bool ``[Hl, Skv]``, Hl 1 or one per query head), the key
    side of the single pass's bound on dQ (`block_sparse_bwd.dq_unit`). A NaN or inf among them makes the
    head's bound NaN or inf; keys the head does not attend may hold anything."""
    group = num_heads // k.shape[2]
    per_token = torch.stack([torch.linalg.vector_norm(k, float("inf"), dim=-1, dtype=torch.float32),
                             torch.linalg.vector_norm(v, dim=-1, dtype=torch.float32)], dim=-1)  # [B, Skv, H_kv, 2]
    per_token = per_token.repeat_interleave(group, dim=2)  # to query heads
    return torch.where(attended.t()[None, :, :, None], per_token, 0.0).amax(dim=1).contiguous()


def launch_dkdv(do: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, delta: Tensor, dk: Tensor, dv: Tensor,
                sched: KernelSchedule, per_head_layout: bool, scale: float, tiles: BackwardTiles,
                dq_acc: Optional[Tensor] = None, dq_unit: Optional[Tensor] = None):
    """Write every element of ``dk``, ``dv [B, Skv, H_kv, D]``; ``sched``: `build_key_schedule` at
    ``tiles.block_n``. Per-head layouts with GQA go through per-query-head fp32 buffers summed per group
    (no atomics). ``dq_acc``: a zeroed int64 ``[B, Sq, H, D]`` the kernel also adds every pair's dQ share to, in
    multiples of its row's ``dq_unit [B, H, Sq]`` (`launch_delta`): the single pass, no dQ kernel needed; integer
    atomics, so the sums are exact and deterministic. Returns the launched compiled kernel (its ``n_regs``,
    ``n_spills``), None if none ran."""
    B, Sq, H, D = q.shape
    Skv, Hkv = k.shape[1], k.shape[2]
    group = H // Hkv
    if B == 0 or sched.max_tiles == 0:
        dk.zero_()
        dv.zero_()
        return None
    if dq_acc is not None and (dq_acc.dtype != torch.int64 or dq_acc.shape != q.shape or dq_acc.stride(-1) != 1):
        raise ValueError(f"dq_acc: expected int64 {tuple(q.shape)} with a contiguous head dim, got {dq_acc.dtype} "
                         f"{tuple(dq_acc.shape)} strides {dq_acc.stride()}")
    if dq_acc is not None and (dq_unit is None or dq_unit.shape != lse.shape or not dq_unit.is_contiguous()):
        raise ValueError(f"dq_unit: expected a contiguous float32 {tuple(lse.shape)} with dq_acc, got "
                         f"{None if dq_unit is None else tuple(dq_unit.shape)}")
    per_query_head = per_head_layout and group > 1
    dk_buf = torch.empty(B, Skv, H, D, dtype=torch.float32, device=q.device) if per_query_head else dk
    dv_buf = torch.empty(B, Skv, H, D, dtype=torch.float32, device=q.device) if per_query_head else dv
    with launch_lock():
        acc = dq_acc if dq_acc is not None else delta  # unread without ACCUMULATE_DQ
        acc_strides = _strides(dq_acc) if dq_acc is not None else [0, 0, 0]
        kernel = block_sparse_attn_bwd_dkdv[(sched.max_tiles, B * (H if per_head_layout else Hkv))](
            q, k, v, do, dk_buf, dv_buf, lse, delta, dq_unit if dq_unit is not None else delta, acc,
            *_strides(q, k, v, do, dk_buf, dv_buf), *acc_strides, *sched.tensors(), scale, Sq,
            BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, USE_TMA=_descriptors(tiles, q, do),
            ACCUMULATE_DQ=dq_acc is not None, **_constants(q, k, per_head_layout, tiles))
    if per_query_head:
        dk.copy_(dk_buf.view(B, Skv, Hkv, group, D).sum(3))
        dv.copy_(dv_buf.view(B, Skv, Hkv, group, D).sum(3))
    return kernel


def launch_dq(do: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, delta: Tensor, dq: Tensor,
              sched: KernelSchedule, per_head_layout: bool, scale: float, tiles: BackwardTiles):
    """Write every element of ``dq [B, Sq, H, D]``; ``sched``: `build_schedule` at ``tiles.block_m``. Returns
    the launched compiled kernel, None if none ran."""
    B, Sq, H, D = q.shape
    if B == 0 or sched.max_tiles == 0:
        dq.zero_()
        return None
    with launch_lock():
        return block_sparse_attn_bwd_dq[(sched.max_tiles, B * H)](
            q, k, v, do, dq, lse, delta,
            *_strides(q, k, v, do, dq), *sched.tensors(), scale, Sq, k.shape[1],
            BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, USE_TMA=_descriptors(tiles, k, v),
            **_constants(q, k, per_head_layout, tiles))


def launch_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dlse: Optional[Tensor],
                    dq: Tensor, dk: Tensor, dv: Tensor, sched: BackwardSchedules, per_head_layout: bool,
                    scale: float, cfg: BackwardConfig) -> None:
    """Write ``dq [B, Sq, H, D]``, ``dk``, ``dv [B, Skv, H_kv, D]`` (every element): the delta pre-pass, then
    the dK/dV and dQ kernels (single pass: the dK/dV kernel into a zeroed int64 dQ sum, then its scaling to
    ``dq``). ``lse [B, H, Sq]`` float32 from the forward; ``dlse`` its gradient or None.

    The single pass's dQ on NaN and inf inputs: a row whose dO or lse gradient holds one, or whose output does
    (as a NaN or inf in its q makes it), gets a NaN unit and so a NaN dQ (the dQ kernel: NaN or inf); one in a
    key or value that a query head attends makes that head's units NaN on every row; a bound beyond float32
    (inputs around 1e11 in size) also gives NaN; rows without keys get 0. In fp16, a dS beyond fp16's range
    makes dK non-finite in both backwards, and the single pass's dQ of that row then holds whatever its int64
    conversion gave."""
    B, Sq, H, _ = q.shape
    if B == 0 or Sq == 0 or sched.dkdv.max_tiles == 0:  # no key any query attends
        for t in (dq, dk, dv):
            t.zero_()
        return
    if cfg.dq is None:
        launch_single_pass(do, q, k, v, out, lse, dlse, dq, dk, dv, sched.dkdv, sched.pair_masks, per_head_layout,
                           scale, cfg.dkdv)
        return
    delta = torch.empty(B, H, Sq, dtype=torch.float32, device=q.device)
    launch_delta(do, out, dlse, delta)
    launch_dkdv(do, q, k, v, lse, delta, dk, dv, sched.dkdv, per_head_layout, scale, cfg.dkdv)
    launch_dq(do, q, k, v, lse, delta, dq, sched.dq, per_head_layout, scale, cfg.dq)


def launch_single_pass(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dlse: Optional[Tensor],
                       dq: Tensor, dk: Tensor, dv: Tensor, sched: KernelSchedule, pair_masks: Tuple[Tensor, Tensor],
                       per_head_layout: bool, scale: float, tiles: BackwardTiles):
    """The single pass: the delta and bound pre-pass, the dK/dV kernel summing dQ into a zeroed int64 tensor,
    then its scaling into ``dq``. ``sched``: `build_key_schedule` at ``tiles.block_n``; ``pair_masks``:
    `build_pair_masks`. Returns ``(kernel, int64 sums, dq_unit)``: the launched compiled kernel (None if none
    ran) and what the scaling read."""
    B, Sq, H, _ = q.shape
    rows, keys = pair_masks
    delta, unit = (torch.empty(B, H, Sq, dtype=torch.float32, device=q.device) for _ in range(2))
    launch_delta(do, out, dlse, delta, key_bounds(k, v, keys, H), unit, k.shape[1])
    acc = torch.zeros(dq.shape, dtype=torch.int64, device=q.device)
    kernel = launch_dkdv(do, q, k, v, lse, delta, dk, dv, sched, per_head_layout, scale, tiles, acc, unit)
    dq.copy_(dq_from_units(acc, unit, scale, rows))
    return kernel, acc, unit


def dq_from_units(acc: Tensor, dq_unit: Tensor, scale: float, rows: Tensor) -> Tensor:
    """The single pass's dQ ``[B, Sq, H, D]`` float32: its int64 sums ``acc`` times their rows' ``dq_unit
    [B, H, Sq]`` (a power of two) and ``scale``; 0 on rows without keys (``rows``: `build_pair_masks`' bool
    ``[Hl, Sq]``), whatever their unit, as the dQ kernel writes."""
    dq = acc.to(torch.float32) * dq_unit.transpose(1, 2).unsqueeze(-1) * scale  # unit * scale may underflow
    return torch.where(rows.t()[None, :, :, None], dq, 0.0)


def _descriptors(tiles: BackwardTiles, *walked: Tensor) -> bool:
    """Whether a kernel at ``tiles`` reads the ``walked`` tensors through tensor descriptors (then Triton's
    scratch allocator is set for the launch)."""
    if not tiles.use_tma or not (interpreting() or descriptors_allowed(*walked)):
        return False
    ensure_tma_allocator()
    return True


def _constants(q: Tensor, k: Tensor, per_head_layout: bool, tiles: BackwardTiles) -> dict:
    return dict(NUM_HEADS=q.shape[2], KV_GROUP=q.shape[2] // k.shape[2], PER_HEAD_LAYOUT=per_head_layout,
                HEAD_DIM=q.shape[3], DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                num_warps=tiles.num_warps, num_stages=tiles.num_stages)


_TILE_FIELDS = ("block_m", "block_n", "num_warps", "num_stages", "use_tma")


def _pack_tiles(cfg: BackwardConfig) -> List[int]:
    """dK/dV's block_m, block_n, warps, stages, use_tma, then dQ's (all 0 for the single pass)."""
    dq = [int(getattr(cfg.dq, f)) for f in _TILE_FIELDS] if cfg.dq is not None else [0] * len(_TILE_FIELDS)
    return [int(getattr(cfg.dkdv, f)) for f in _TILE_FIELDS] + dq


def _unpack_tiles(ints: List[int]) -> BackwardConfig:
    dkdv, dq = ints[:5], ints[5:]
    return BackwardConfig(BackwardTiles(*dkdv[:4], bool(dkdv[4])),
                          BackwardTiles(*dq[:4], bool(dq[4])) if dq[0] else None)


def _strides(*ts: Tensor):
    return [s for t in ts for s in (t.stride(0), t.stride(1), t.stride(2))]


@torch.library.custom_op("lvsa_kernels::triton_block_sparse_fwd_train", mutates_args=())
def triton_block_sparse_fwd_train(
    q: Tensor, k: Tensor, v: Tensor, q_sched: List[Tensor], key_tiles: List[Tensor], max_q_tiles: int,
    per_head_layout: bool, scale: float,
    kernel: str, block_m: int, block_n: int, num_warps: int, num_stages: int, use_tma: bool, warp_spec: bool,
    exp2_poly: int, short_n: int,
    dq_sched: List[Tensor], dkdv_sched: List[Tensor], max_dq_tiles: int, max_dkdv_tiles: int, bwd_tiles: List[int],
) -> Tuple[Tensor, Tensor]:
    """The forward (``out [B, Sq, H, D]``, ``lse [B, H, Sq]`` float32) with a backward. ``q_sched``: the
    forward's `KernelSchedule` (tiles of ``block_m``) as ``tensors()``; ``kernel`` ``"portable"`` or
    ``"hopper"`` (then ``key_tiles`` are its `KeyTiles` ``tensors()`` with ``short_n``; empty for the portable
    kernel); the forward ints are its `KernelConfig`. The rest is for the backward: ``dq_sched`` /
    ``dkdv_sched`` are `BackwardSchedules` as tensors (``dq_sched``: `BackwardSchedules.dq_tensors`),
    ``bwd_tiles`` the `BackwardConfig` as 10 ints (`_pack_tiles`)."""
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
    dq_sched: List[Tensor], dkdv_sched: List[Tensor], max_dq_tiles: int, max_dkdv_tiles: int, per_head_layout: bool,
    scale: float, bwd_tiles: List[int],
) -> Tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` of `triton_block_sparse_fwd_train` for output gradient ``do`` (and lse gradient ``dlse``)."""
    if do.stride(-1) != 1:
        do = do.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    cfg = _unpack_tiles(bwd_tiles)
    dkdv_schedule = KernelSchedule(cfg.dkdv.block_n, *dkdv_sched, max_dkdv_tiles)
    if cfg.dq is None:
        sched = BackwardSchedules(None, dkdv_schedule, tuple(dq_sched))
    else:
        sched = BackwardSchedules(KernelSchedule(cfg.dq.block_m, *dq_sched, max_dq_tiles), dkdv_schedule)
    launch_backward(do, q, k, v, out, lse, None if dlse is None else dlse.contiguous(), dq, dk, dv, sched,
                    per_head_layout, scale, cfg)
    return dq, dk, dv


@triton_block_sparse_bwd.register_fake
def _fake_bwd(do, q, k, v, *args):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_FWD_ARGS = 17   # q, k, v, q_sched, key_tiles, max_q_tiles, per_head_layout, scale and the 9 forward config values


def _setup_context(ctx, inputs, output):
    assert len(inputs) == _FWD_ARGS + 5, "triton_block_sparse_fwd_train's signature changed: update _FWD_ARGS"
    q, k, v, q_sched, key_tiles = inputs[:5]
    per_head_layout, scale = inputs[6], inputs[7]
    dq_sched, dkdv_sched, max_dq_tiles, max_dkdv_tiles, bwd_tiles = inputs[_FWD_ARGS:]
    ctx.save_for_backward(q, k, v, *output, *dq_sched, *dkdv_sched)
    ctx.n_dq_sched = len(dq_sched)
    ctx.list_lens = (len(q_sched), len(key_tiles), len(dq_sched), len(dkdv_sched))
    ctx.args = (max_dq_tiles, max_dkdv_tiles, per_head_layout, scale, list(bwd_tiles))


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, *sched = ctx.saved_tensors
    n = ctx.n_dq_sched
    dq, dk, dv = torch.ops.lvsa_kernels.triton_block_sparse_bwd(dout, q, k, v, out, lse, dlse, sched[:n], sched[n:],
                                                                *ctx.args)
    n_q, n_tiles, n_dq, n_dkdv = ctx.list_lens  # a list argument takes one None per element
    return ((dq, dk, dv, [None] * n_q, [None] * n_tiles) + (None,) * (_FWD_ARGS - 5)
            + ([None] * n_dq, [None] * n_dkdv, None, None, None))


triton_block_sparse_fwd_train.register_autograd(_backward, setup_context=_setup_context)


def run_trainable(q: Tensor, k: Tensor, v: Tensor, layout: BlockSparseLayout, scale: float, cfg: KernelConfig,
                  bwd: BackwardConfig) -> Tuple[Tensor, Tensor]:
    """``(out, lse)`` of the forward kernel at ``cfg`` (portable, or Hopper at exact precision), differentiable
    in q, k and v through the backward kernels at ``bwd``. Schedules are built once per layout and cached."""
    q_sched = build_schedule(layout, cfg.block_m, q.device)
    tiles = build_key_tiles(layout, cfg.block_n, q.device) if cfg.kernel == "hopper" else None
    check_launch(q_sched, tiles, cfg, "exact")
    key_tiles, short_n = (list(tiles.tensors()), tiles.short_n) if tiles is not None else ([], 0)
    bsched = BackwardSchedules.build(layout, bwd, q.device)
    max_dq_tiles = bsched.dq.max_tiles if bsched.dq is not None else 0
    return torch.ops.lvsa_kernels.triton_block_sparse_fwd_train(
        q, k, v, list(q_sched.tensors()), key_tiles, q_sched.max_tiles, layout.num_heads > 1, scale,
        cfg.kernel, cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages, cfg.use_tma, cfg.warp_spec,
        cfg.exp2_poly, short_n,
        bsched.dq_tensors(), list(bsched.dkdv.tensors()), max_dq_tiles, bsched.dkdv.max_tiles, _pack_tiles(bwd))
