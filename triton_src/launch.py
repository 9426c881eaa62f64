"""Host side of the Triton kernels: the launches, and their registration as torch custom ops.

``torch.ops.lvsa_kernels.triton_block_sparse_fwd`` (portable kernel) and
``torch.ops.lvsa_kernels.triton_block_sparse_fwd_hopper`` (warp-specialised Gluon kernel, sm_90) have fake
(meta) implementations, so ``torch.compile(fullgraph=True)`` traces through
`block_sparse_attn(..., backend="triton")` without graph breaks. The schedule arrays (see `schedule.py`)
are ordinary tensor arguments of the ops.

Precisions (both kernels): ``"exact"`` (the input dtype's MMAs), ``"fp8"`` (INT8 Q K^T, e4m3 P V) and
``"int8_qk"`` (INT8 Q K^T, P V in the input dtype); the 8-bit ones quantize K and V first
(`fp8_quant.quantize_kv`), and for the Hopper kernel Q too (`fp8_quant.quantize_q_tiles`).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
from torch import Tensor

from .block_sparse_fwd import LOG2E, block_sparse_attn_fwd
from .fp8_quant import KEY_QUANT_BLOCK, quantize_kv, quantize_q_tiles
from .gluon_compat import hopper_triton_refusal
from .interpreter import launch_lock
from .schedule import KernelSchedule, KeyTiles
from .tuning import KernelConfig, interpreting

__all__ = ["check_launch", "hopper_device_refusal", "hopper_kernel_available", "hopper_meta", "hopper_refusal",
           "descriptors_allowed", "ensure_tma_allocator", "hopper_supports", "launch", "launch_hopper",
           "run_scheduled"]

# The Hopper kernel's registers: the launch caps every thread at HOPPER_MAXNREG; inside (setmaxnreg) each
# consumer warpgroup of a worker partition takes HOPPER_CONSUMER_REGS and the loader warp 32; the first consumer
# (the default partition) gets what is left. Keyed by the number of consumer warpgroups (query tile rows / 64).
HOPPER_MAXNREG = {2: 168, 3: 128}
HOPPER_CONSUMER_REGS = {2: 240, 3: 160}


def _scratch(size: int, alignment: int, stream: Optional[int]) -> Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_tma_allocator() -> None:
    """On-device tensor descriptors need a global scratch allocator. Triton keeps it in a context variable, which
    a thread that did not set it does not see (the autograd engine's device thread recomputes checkpointed
    forwards), so it is set before every launch that needs it (a context-variable write; it replaces an allocator
    the caller set)."""
    triton.set_allocator(_scratch)


def descriptors_allowed(*tensors: Tensor) -> bool:
    """Whether these ``[B, S, H, D]`` tensors can be read through tensor descriptors: a Hopper+ GPU, 16-byte
    aligned bases, non-zero batch/sequence/head strides that are multiples of 16 bytes (an expanded tensor's
    zero stride is refused: it goes through pointer loads)."""
    t0 = tensors[0]
    if t0.device.type != "cuda" or torch.cuda.get_device_capability(t0.device)[0] < 9:
        return False
    e = t0.element_size()
    return all(t.data_ptr() % 16 == 0 and all(s > 0 and (s * e) % 16 == 0 for s in t.stride()[:3]) for t in tensors)


def hopper_device_refusal(device: torch.device) -> Optional[str]:
    """Why the warp-specialised Gluon kernel cannot run on ``device`` with this Triton (None: it can): it needs
    an sm_90 GPU (H100/H200) and a Triton release it is tested with (`gluon_compat.hopper_triton_refusal`)."""
    if device.type != "cuda":
        return f"needs a CUDA sm_90 GPU, not {device.type}"
    cc = torch.cuda.get_device_capability(device)
    if cc != (9, 0):
        return f"needs an sm_90 GPU (H100/H200); {torch.cuda.get_device_name(device)} is sm_{cc[0]}{cc[1]}"
    return hopper_triton_refusal()


def hopper_refusal(q: Tensor, k: Tensor, v: Tensor) -> Optional[str]:
    """Why the Hopper kernel cannot run these inputs (None: it can): `hopper_device_refusal`, then bf16/fp16,
    head dim 64 or 128, and q/k/v rows readable by TMA (16-byte aligned bases and strides). Any layout runs, at
    any precision."""
    reason = hopper_device_refusal(q.device)
    if reason is not None:
        return reason
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"takes bf16 or fp16, got {str(q.dtype).replace('torch.', '')}"
    if q.shape[-1] not in (64, 128):
        return f"takes head dim 64 or 128, got {q.shape[-1]}"
    e = q.element_size()
    if not all(t.data_ptr() % 16 == 0 and all((s * e) % 16 == 0 for s in t.stride()[:3]) for t in (q, k, v)):
        return "needs q/k/v with 16-byte aligned base pointers and strides (TMA)"
    return None


def hopper_supports(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether the Hopper kernel can run these inputs (see `hopper_refusal`)."""
    return hopper_refusal(q, k, v) is None


def hopper_kernel_available() -> bool:
    """Whether this Triton release can run the Hopper kernel at all (see `gluon_compat`)."""
    return hopper_triton_refusal() is None


def launch_hopper(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, sched_tensors: Tuple[Tensor, ...],
                  key_tiles: Tuple[Tensor, ...], short_n: int, max_tiles: int, per_head_layout: bool, scale: float,
                  cfg: KernelConfig, precision: str = "exact"):
    """Run the Hopper kernel (same contract as `launch`); a negative ``scale`` runs as ``-q`` with ``-scale``.

    ``key_tiles``: `KeyTiles.tensors()` built for ``precision`` (``short_n``: its `KeyTiles.short_n`). The 8-bit
    precisions quantize first: K and V with `quantize_kv`, Q per schedule tile with `quantize_q_tiles` (the
    kernel reads Q through TMA, so it cannot quantize it on the fly). ``cfg.block_m``: the schedule's query tile
    height, 128, or 192 (three consumer warpgroups; fp8 only)."""
    _check_precision(precision)
    from .block_sparse_hopper import block_sparse_attn_fwd_hopper

    B, Sq, H, D = q.shape
    if max_tiles == 0 or B == 0:
        return None
    if scale < 0:
        q, scale = -q, -scale
    ensure_tma_allocator()
    k, v, v_strides, quant = _kv_operands(k, v, precision, interpreted=False, wgmma_order=True)
    q_scale = q_mu = k_scale = v_scale = lse  # unread placeholders where a mode does not read them
    if quant is not None:
        q8 = quantize_q_tiles(q, quant.k_mean, sched_tensors[:3], max_tiles, per_head_layout, cfg.block_m,
                              interpreted=False)
        q, k_scale, q_scale, q_mu = q8.q8, quant.k_scale, q8.q_scale, q8.q_mu
        if quant.v_scale is not None:
            v_scale = quant.v_scale
    grid = (max_tiles, B * H)
    return block_sparse_attn_fwd_hopper[grid](
        q, k, v, out, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        *v_strides,
        out.stride(0), out.stride(1), out.stride(2),
        *sched_tensors[:4], *key_tiles,
        scale * LOG2E, Sq, k.shape[1],
        q_scale, q_mu, k_scale, v_scale, q_scale.shape[-1],
        NUM_HEADS=H, KV_GROUP=H // k.shape[2], PER_HEAD_LAYOUT=per_head_layout,
        **hopper_meta(D, q.dtype, k.dtype, v.dtype, out.dtype, cfg, short_n, precision),
    )


def hopper_meta(head_dim: int, q_dtype: torch.dtype, k_dtype: torch.dtype, v_dtype: torch.dtype,
                out_dtype: torch.dtype, cfg: KernelConfig, short_n: int, precision: str) -> dict:
    """The Hopper kernel's compile-time arguments beyond the head counts: tile shapes, shared-memory layouts
    of the operands as the kernel receives them (``*_dtype``: after quantization; ``out_dtype``: bf16 or fp16),
    the register split and the launch options. Shared by `launch_hopper` and `compile_check`."""
    from triton.experimental.gluon import language as gl

    from .hopper_ring import HALF_M

    half = gl.bfloat16 if out_dtype == torch.bfloat16 else gl.float16
    v_block = [head_dim, cfg.block_n] if precision == "fp8" else [cfg.block_n, head_dim]
    consumers = cfg.block_m // int(HALF_M)
    return dict(
        HEAD_DIM=head_dim, BLOCK_N=cfg.block_n, SHORT_N=short_n, STAGES=cfg.num_stages,
        Q_LAYOUT=gl.NVMMASharedLayout.get_default_for([int(HALF_M), head_dim], _gluon_dtype(q_dtype, half)),
        K_LAYOUT=gl.NVMMASharedLayout.get_default_for([cfg.block_n, head_dim], _gluon_dtype(k_dtype, half)),
        V_LAYOUT=gl.NVMMASharedLayout.get_default_for(v_block, _gluon_dtype(v_dtype, half)),
        CONSUMER_REGS=HOPPER_CONSUMER_REGS[consumers], EXP2_POLY=cfg.exp2_poly, TILES_PER_STEP=cfg.tiles_per_step,
        CONSUMERS=consumers, ROWSUM_MMA=cfg.rowsum_mma, num_warps=4, maxnreg=HOPPER_MAXNREG[consumers],
    )


def _kv_operands(k: Tensor, v: Tensor, precision: str, interpreted: bool, wgmma_order: bool = False):
    """K and V as both kernels read them: ``(k, v, v_strides, quant)``. Exact: the inputs and no ``quant``.
    8-bit: `quantize_kv`'s INT8 K and, for fp8, its e4m3 V^T ``[B, H_kv, D, S_pad]`` (``wgmma_order``: the Hopper
    kernel's key order), whose channel stride (``S_pad``) takes the kernels' sequence-stride slot; ``quant`` holds
    the scales and the K mean."""
    v_strides = (v.stride(0), v.stride(1), v.stride(2))
    if precision == "exact":
        return k, v, v_strides, None
    quant = quantize_kv(k, v, precision == "fp8", interpreted, wgmma_order=wgmma_order)
    if precision == "fp8":
        v = quant.vt8
        v_strides = (v.stride(0), v.stride(2), v.stride(1))
    return quant.k8, v, v_strides, quant


def _check_precision(precision: str) -> None:
    if precision not in ("exact", "fp8", "int8_qk"):
        raise ValueError(f"precision: expected 'exact', 'fp8' or 'int8_qk', got {precision!r}")


def _gluon_dtype(dtype: torch.dtype, half):
    """Gluon's element type for a tensor of ``dtype`` (``half``: the one of the bf16/fp16 inputs)."""
    from triton.experimental.gluon import language as gl

    return {torch.int8: gl.int8, torch.float8_e4m3fn: gl.float8e4nv}.get(dtype, half)


def launch(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, sched_tensors: Tuple[Tensor, ...],
           max_tiles: int, per_head_layout: bool, scale: float, cfg: KernelConfig, precision: str = "exact"):
    """Run the kernel writing ``out [B, Sq, H, D]`` and ``lse [B, H, Sq]`` (contiguous float32).

    ``precision``: ``"exact"``, ``"fp8"`` or ``"int8_qk"``. Returns Triton's compiled-kernel handle
    (register/spill counts for diagnostics), or None if nothing ran.
    """
    _check_precision(precision)
    if precision == "fp8" and cfg.use_tma:  # V^T column blocks at unaligned token offsets fault through TMA
        raise ValueError("the portable kernel's fp8 mode reads K and V^T with pointer loads: use_tma must be False")
    B, Sq, H, D = q.shape
    if max_tiles == 0 or B == 0:
        return None
    if cfg.use_tma:
        ensure_tma_allocator()
    qk_int8, fp8_pv = precision != "exact", precision == "fp8"
    k, v, v_strides, quant = _kv_operands(k, v, precision, interpreting())
    k_scale = k_mean = v_scale = k  # unread placeholders where a mode does not read them
    if quant is not None:
        k_scale, k_mean = quant.k_scale, quant.k_mean
        if quant.v_scale is not None:
            v_scale = quant.v_scale
    dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"
    grid = (max_tiles, B * H)
    with launch_lock():
        return block_sparse_attn_fwd[grid](
            q, k, v, out, lse,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            *v_strides,
            out.stride(0), out.stride(1), out.stride(2),
            *sched_tensors,
            scale * LOG2E, Sq, k.shape[1],
            k_scale, k_mean, v_scale,
            NUM_HEADS=H, KV_GROUP=H // k.shape[2], PER_HEAD_LAYOUT=per_head_layout,
            HEAD_DIM=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            USE_TMA=cfg.use_tma, DOT_PRECISION=dot_precision, WARP_SPEC=cfg.warp_spec,
            QK_INT8=qk_int8, FP8_PV=fp8_pv, INTERPRETED=interpreting(),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )


@torch.library.custom_op("lvsa_kernels::triton_block_sparse_fwd", mutates_args=())
def triton_block_sparse_fwd(
    q: Tensor, k: Tensor, v: Tensor,
    tile_ptr: Tensor, tile_start: Tensor, tile_end: Tensor, tile_row: Tensor,
    span_ptr: Tensor, span_start: Tensor, span_end: Tensor,
    max_tiles: int, per_head_layout: bool, scale: float,
    block_m: int, block_n: int, num_warps: int, num_stages: int, use_tma: bool, warp_spec: bool,
    precision: str = "exact",
) -> Tuple[Tensor, Tensor]:
    """Block-sparse attention forward: returns ``(out [B, Sq, H, D], lse [B, H, Sq] float32)``."""
    B, Sq, H, D = q.shape
    out = torch.empty(B, Sq, H, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, Sq, dtype=torch.float32, device=q.device)
    sched = (tile_ptr, tile_start, tile_end, tile_row, span_ptr, span_start, span_end)
    cfg = KernelConfig(block_m, block_n, num_warps, num_stages, use_tma, warp_spec)
    launch(q, k, v, out, lse, sched, max_tiles, per_head_layout, scale, cfg, precision)
    return out, lse


@torch.library.custom_op("lvsa_kernels::triton_block_sparse_fwd_hopper", mutates_args=())
def triton_block_sparse_fwd_hopper(
    q: Tensor, k: Tensor, v: Tensor,
    tile_ptr: Tensor, tile_start: Tensor, tile_end: Tensor, tile_row: Tensor,
    row_kv_ptr: Tensor, kv_tile_start: Tensor, kv_tile_end: Tensor, row_kv_masked: Tensor,
    max_tiles: int, per_head_layout: bool, scale: float, block_n: int, short_n: int, num_stages: int,
    precision: str = "exact", exp2_poly: int = 0, tiles_per_step: int = 1, block_m: int = 128,
    rowsum_mma: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Block-sparse attention forward on Hopper: returns ``(out [B, Sq, H, D], lse [B, H, Sq] float32)``."""
    B, Sq, H, D = q.shape
    out = torch.empty(B, Sq, H, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, Sq, dtype=torch.float32, device=q.device)
    cfg = KernelConfig(block_m, block_n, 4, num_stages, True, True, "hopper", exp2_poly, tiles_per_step, rowsum_mma)
    launch_hopper(q, k, v, out, lse, (tile_ptr, tile_start, tile_end, tile_row),
                  (row_kv_ptr, kv_tile_start, kv_tile_end, row_kv_masked), short_n, max_tiles, per_head_layout, scale,
                  cfg, precision)
    return out, lse


@triton_block_sparse_fwd.register_fake
def _fake(q, k, v, *args, **kwargs):
    B, Sq, H, D = q.shape
    return q.new_empty(B, Sq, H, D), q.new_empty(B, H, Sq, dtype=torch.float32)


triton_block_sparse_fwd_hopper.register_fake(_fake)


def check_launch(sched: KernelSchedule, key_tiles: Optional[KeyTiles], cfg: KernelConfig, precision: str):
    """Raise where ``cfg`` cannot run with this schedule and these key tiles (the Hopper kernel's) at
    ``precision``; shared by the inference and the differentiable forward."""
    if cfg.kernel not in ("portable", "hopper"):
        raise ValueError(f"cfg.kernel: expected 'portable' or 'hopper', got {cfg.kernel!r}")
    hopper = cfg.kernel == "hopper"
    if cfg.exp2_poly not in ((0, 4) if hopper else (0,)):
        raise ValueError(f"cfg.exp2_poly: expected 0 or 4 (one softmax exponential in 4 on the FMA units; the Hopper "
                         f"kernel only), got {cfg.exp2_poly} for {cfg}")
    pairs_ok = hopper and precision == "fp8"
    if cfg.tiles_per_step not in ((1, 2) if pairs_ok else (1,)):
        raise ValueError(f"cfg.tiles_per_step: expected {'1 or 2' if pairs_ok else '1'}, got {cfg.tiles_per_step} "
                         f"for {cfg} at precision {precision!r} (2, full key tiles two per softmax step, exists in "
                         f"the Hopper kernel's fp8 mode only)")
    if cfg.rowsum_mma and not (hopper and precision == "fp8" and cfg.block_m == 128):
        raise ValueError(f"cfg.rowsum_mma: the row sums on the tensor cores exist in the hopper kernel's fp8 mode "
                         f"with 128-row tiles only, got {cfg} at precision {precision!r}")
    if not hopper:
        return
    if cfg.block_m not in ((128, 192) if precision == "fp8" else (128,)):
        raise ValueError(f"cfg.block_m: the hopper kernel takes query tiles of 128 rows (two consumer warpgroups)"
                         f"{', or 192 in fp8 (three)' if precision == 'fp8' else ''}, got {cfg.block_m}")
    if cfg.block_m == 192 and cfg.tiles_per_step != 1:
        raise ValueError(f"cfg.tiles_per_step: 192-row query tiles fold one key tile per step, got {cfg}")
    if cfg.tiles_per_step == 2 and cfg.num_stages < 2:  # a pair holds two ring slots at once
        raise ValueError(f"cfg.num_stages: two key tiles per step need a ring of at least 2 stages, got {cfg}")
    if key_tiles is None or key_tiles.block_n != cfg.block_n:
        raise ValueError(f"the hopper kernel needs the key tiles of BLOCK_N={cfg.block_n}")
    if key_tiles.aligned != (precision != "exact") or key_tiles.cuts_short != (precision != "fp8"):
        raise ValueError(f"key_tiles: built for another precision than {precision!r} (see schedule.build_key_tiles)")
    if precision != "exact" and cfg.block_n != KEY_QUANT_BLOCK:
        raise ValueError(f"the hopper kernel's 8-bit modes take key tiles of {KEY_QUANT_BLOCK} keys (one K scale "
                         f"each), got BLOCK_N={cfg.block_n}")
    if sched.block_m != cfg.block_m:
        raise ValueError(f"the schedule has query tiles of {sched.block_m} rows, cfg {cfg.block_m}")


def run_scheduled(q: Tensor, k: Tensor, v: Tensor, sched: KernelSchedule, per_head_layout: bool,
                  scale: float, cfg: KernelConfig, out: Optional[Tensor] = None,
                  precision: str = "exact", key_tiles: Optional[KeyTiles] = None) -> Tuple[Tensor, Tensor]:
    """Run with a prepared schedule (and, for the Hopper kernel, the key tiles of ``cfg.block_n``);
    through the custom op unless ``out`` (a buffer to write) is given."""
    hopper = cfg.kernel == "hopper"
    check_launch(sched, key_tiles, cfg, precision)
    if out is None:
        if hopper:
            return torch.ops.lvsa_kernels.triton_block_sparse_fwd_hopper(
                q, k, v, *sched.tensors()[:4], *key_tiles.tensors(), sched.max_tiles, per_head_layout, scale,
                cfg.block_n, key_tiles.short_n, cfg.num_stages, precision, cfg.exp2_poly, cfg.tiles_per_step,
                cfg.block_m, cfg.rowsum_mma)
        return torch.ops.lvsa_kernels.triton_block_sparse_fwd(
            q, k, v, *sched.tensors(), sched.max_tiles, per_head_layout, scale,
            cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages, cfg.use_tma, cfg.warp_spec, precision)
    lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32, device=q.device)
    if hopper:
        launch_hopper(q, k, v, out, lse, sched.tensors(), key_tiles.tensors(), key_tiles.short_n, sched.max_tiles,
                      per_head_layout, scale, cfg, precision)
    else:
        launch(q, k, v, out, lse, sched.tensors(), sched.max_tiles, per_head_layout, scale, cfg, precision)
    return out, lse
