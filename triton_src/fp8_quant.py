"""8-bit quantization for the block-sparse kernel's ``precision="fp8"`` / ``"int8_qk"`` modes.

`quantize_kv` is the pre-pass that runs once per call before the attention kernel:

* K is smoothed (its per-head mean over the tokens subtracted; softmax is invariant to a per-row
  constant, so every row of any block-sparse layout is unchanged) and quantized to INT8 with one scale per
  block of `KEY_QUANT_BLOCK` (128) consecutive tokens from token 0: for block ``j``,
  ``k8[b, s, h] = rne((k - mean) * (127 / amax_block))``, ``k_scale[b, h, j] = amax_block / 127``, the
  amax over the block's tokens (the last block may be partial) and all channels. A key tile that lies in one
  aligned block needs one scale.
* V is quantized per channel, ``v_scale[b, h, d] = amax over tokens / 448``, and written transposed,
  ``vt8 [B, H_kv, D, S_pad]`` (tokens contiguous, ``S_pad - S`` zero columns): Hopper's FP8 MMA wants its B
  operand K-major, and for ``P @ V`` the reduction runs over the tokens. For the Hopper kernel the tokens of
  every aligned group of 32 are stored in "wgmma key order" (`wgmma_key_slot`), which lets the kernel hand its
  e4m3 P to the MMA without moving it between threads.

Q is quantized to INT8 per query tile of the kernel schedule (`quantize_q_tile`): in the portable
kernel's prologue, or by the `quantize_q_tiles` pre-pass for the Hopper kernel (which reads Q through TMA);
P goes to e4m3 with a fixed scale inside the attention kernels. Scales are float32; scale arithmetic uses IEEE
division (`tl.math.div_rn`: Triton's ``fdiv(..., ieee_rounding=True)`` ignores its flag and divides approximately
on the GPU), so the PyTorch fake-quant reference (`lvsa_kernels.reference.fp8`) reproduces every rounding.
"""
from __future__ import annotations

from typing import NamedTuple, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .interpreter import launch_lock


__all__ = ["Fp8KV", "KEY_GROUP", "KEY_QUANT_BLOCK", "QuantizedQ", "quantize_kv", "quantize_q_tile", "quantize_q_tiles",
           "to_e4m3", "to_int8", "wgmma_key_slot"]

KEY_QUANT_BLOCK = 128  # tokens per K scale, blocks aligned to token 0
KEY_GROUP = 32  # tokens per group of the wgmma key order (`wgmma_key_slot`): K of one 8-bit wgmma
_RNE = 12582912.0  # 1.5 * 2**23: (x + _RNE) - _RNE rounds |x| < 2**22 to an integer, nearest even
_Q_CHUNK = 32  # query rows the Q pre-pass holds at once


@triton.jit
def to_int8(x, INTERPRETED: tl.constexpr):
    """float32 tile -> int8, round to nearest even, saturating at +-127.

    On the GPU one ``cvt.rni`` per element rounds (an add/subtract of 1.5 * 2**23 could be folded away by the
    compiler, leaving a truncating cast); the CPU interpreter rounds with that add/subtract in numpy."""
    x = tl.minimum(tl.maximum(x, -127.0), 127.0)
    if INTERPRETED:
        return ((x + 12582912.0) - 12582912.0).to(tl.int8)
    return tl.inline_asm_elementwise("cvt.rni.s32.f32 $0, $1;", "=r,f", [x], dtype=tl.int32, is_pure=True,
                                     pack=1).to(tl.int8)


@triton.jit
def to_e4m3(x, INTERPRETED: tl.constexpr):
    """float32 tile -> float8e4nv, round to nearest even, saturating at +-448.

    The CPU interpreter (whose float32 -> fp8 cast drops the rounding carry into the exponent) first rounds
    to the e4m3 grid with exact float32 arithmetic, so the cast only re-encodes; the GPU converts in hardware.
    """
    x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    if INTERPRETED:
        expo = ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        ulp = ((tl.maximum(expo, -6) - 3 + 127) << 23).to(tl.float32, bitcast=True)  # e4m3 spacing at |x|
        x = ((x / ulp + 12582912.0) - 12582912.0) * ulp  # see _RNE
    return x.to(tl.float8e4nv)


@triton.jit
def quantize_q_tile(qf, k_mean, INTERPRETED: tl.constexpr):
    """One query tile ``qf [BLOCK_M, D]`` (float32; rows past the tile are 0) -> ``(q8, scale, q_mu)``: INT8
    values with one scale for the tile (``amax / 127``; 1 for an all-zero tile) and each row's ``q . k_mean``
    (float32 ``[BLOCK_M]``, which undoes the key smoothing in the lse)."""
    q_mu = tl.sum(qf * k_mean[None, :], 1)
    inv, scale = _int8_scales(tl.max(tl.max(tl.abs(qf), 1), 0))
    return to_int8(qf * inv, INTERPRETED), scale, q_mu


@triton.jit
def _int8_scales(amax):
    """``(127 / amax, amax / 127)`` of a tile's absolute maximum (1 and 1 for an all-zero tile), each an IEEE
    division."""
    nonzero = amax > 0.0
    inv = tl.where(nonzero, tl.math.div_rn(tl.full(amax.shape, 127.0, tl.float32), tl.where(nonzero, amax, 1.0)), 1.0)
    scale = tl.where(nonzero, tl.math.div_rn(amax, tl.full(amax.shape, 127.0, tl.float32)), 1.0)
    return inv, scale


@triton.jit
def _quantize_q_tiles(Q, K_MEAN, Q8, QS, QMU, stride_qb, stride_qs, stride_qh, tile_ptr, tile_start, tile_end,
                      q_len, max_tiles, NUM_HEADS: tl.constexpr, KV_GROUP: tl.constexpr,
                      PER_HEAD_LAYOUT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                      CHUNK: tl.constexpr, INTERPRETED: tl.constexpr):
    """Query tile ``program_id(0)`` of head ``program_id(1) = b * H + h`` (the attention kernels' grid), read
    ``CHUNK`` rows at a time (``BLOCK_M`` a multiple of it): one pass for the tile's absolute maximum, a second
    to quantize and store (a whole 128- or 192-row tile in registers spilled)."""
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // NUM_HEADS
    h = pid_bh % NUM_HEADS
    lh = h if PER_HEAD_LAYOUT else 0
    t_lo = tl.load(tile_ptr + lh)
    if pid_t >= tl.load(tile_ptr + lh + 1) - t_lo:
        return
    row0 = tl.load(tile_start + t_lo + pid_t)
    row_end = tl.load(tile_end + t_lo + pid_t)
    offs_d = tl.arange(0, HEAD_DIM)
    b64 = b.to(tl.int64)
    q_head = Q + b64 * stride_qb + h * stride_qh
    amax = tl.zeros([HEAD_DIM], tl.float32)
    for c in range(BLOCK_M // CHUNK):
        rows = row0 + c * CHUNK + tl.arange(0, CHUNK)
        ok = rows < row_end
        qf = tl.load(q_head + rows[:, None].to(tl.int64) * stride_qs + offs_d[None, :], mask=ok[:, None],
                     other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(qf), 0))
    inv, scale = _int8_scales(tl.max(amax, 0))
    k_mean = tl.load(K_MEAN + (b * (NUM_HEADS // KV_GROUP) + h // KV_GROUP) * HEAD_DIM + offs_d)
    for c in range(BLOCK_M // CHUNK):
        rows = row0 + c * CHUNK + tl.arange(0, CHUNK)
        ok = rows < row_end
        qf = tl.load(q_head + rows[:, None].to(tl.int64) * stride_qs + offs_d[None, :], mask=ok[:, None],
                     other=0.0).to(tl.float32)
        tl.store(Q8 + ((b64 * q_len + rows[:, None]) * NUM_HEADS + h) * HEAD_DIM + offs_d[None, :],
                 to_int8(qf * inv, INTERPRETED), mask=ok[:, None])
        tl.store(QMU + pid_bh.to(tl.int64) * q_len + rows, tl.sum(qf * k_mean[None, :], 1), mask=ok)
    tl.store(QS + pid_bh.to(tl.int64) * max_tiles + pid_t, scale)


@triton.jit
def _program_rows(X, stride_b, stride_s, stride_h, seq_len, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_S: tl.constexpr):
    """This program's ``(bh, b, h, rows, offs_d, ok, x)``: rows ``program_id(0) * BLOCK_S ..`` of head
    ``program_id(1) = b * H_kv + h`` of X ``[B, S, H_kv, D]`` as float32 ``x [BLOCK_S, D]`` (0 past ``seq_len``)."""
    bh = tl.program_id(1)
    b = bh // NUM_KV_HEADS
    h = bh % NUM_KV_HEADS
    rows = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = rows < seq_len
    x = tl.load(X + b.to(tl.int64) * stride_b + h * stride_h + rows[:, None].to(tl.int64) * stride_s
                + offs_d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    return bh, b, h, rows, offs_d, ok, x


@triton.jit
def _quantize_k(K, MEAN, K8, KS, stride_kb, stride_ks, stride_kh, seq_len, num_blocks,
                NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, INTERPRETED: tl.constexpr):
    """Key block ``program_id(0)`` (``BLOCK_S`` tokens) of head ``program_id(1) = b * H_kv + h``: smooth, one
    scale for the block's real tokens, cast."""
    bh, b, h, rows, offs_d, ok, x = _program_rows(K, stride_kb, stride_ks, stride_kh, seq_len, NUM_KV_HEADS,
                                                  HEAD_DIM, BLOCK_S)
    x = tl.where(ok[:, None], x - tl.load(MEAN + bh * HEAD_DIM + offs_d)[None, :], 0.0)
    amax = tl.max(tl.max(tl.abs(x), 1), 0)
    nonzero = amax > 0.0
    inv = tl.where(nonzero, tl.math.div_rn(tl.full(amax.shape, 127.0, tl.float32), tl.where(nonzero, amax, 1.0)), 1.0)
    scale = tl.where(nonzero, tl.math.div_rn(amax, tl.full(amax.shape, 127.0, tl.float32)), 1.0)
    k8 = to_int8(x * inv, INTERPRETED)
    out = K8 + (b.to(tl.int64) * seq_len + rows[:, None]) * (NUM_KV_HEADS * HEAD_DIM) + h * HEAD_DIM + offs_d[None, :]
    tl.store(out, k8, mask=ok[:, None])
    tl.store(KS + bh.to(tl.int64) * num_blocks + tl.program_id(0), scale)


@triton.jit
def wgmma_key_slot(token):
    """The V^T column of ``token`` in the Hopper kernel's fp8 layout ("wgmma key order").

    Within an aligned group of `KEY_GROUP` tokens, a wgmma accumulator thread holds the scores of keys
    ``2q + {0, 1} + 8i`` (``q`` its lane in the quad, ``i = 0..3``) while an 8-bit A operand thread must hold
    the product's K positions ``4q + {0..3}`` and ``16 + 4q + {0..3}``. Storing key ``16h + 8i + 2q + e`` at
    column ``16h + 4q + 2i + e`` (bit 3 of the index to bit 1, bits 1-2 to bits 2-3) makes each thread's own
    scores the operand it needs: ``P V`` sums over positions, so permuting P's columns and V's rows alike
    leaves it unchanged."""
    return (token & ~14) | ((token & 8) >> 2) | ((token & 6) << 1)


@triton.jit
def _quantize_vt(V, INV, VT8, stride_vb, stride_vs, stride_vh, seq_len, padded_len,
                 NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr,
                 WGMMA_ORDER: tl.constexpr, INTERPRETED: tl.constexpr):
    """Tokens ``program_id(0) * BLOCK_S ..`` of head ``program_id(1)``: scale per channel, cast, store
    transposed (at `wgmma_key_slot` columns with WGMMA_ORDER); columns from ``seq_len`` to ``padded_len`` get 0."""
    bh, b, h, rows, offs_d, ok, x = _program_rows(V, stride_vb, stride_vs, stride_vh, seq_len, NUM_KV_HEADS,
                                                  HEAD_DIM, BLOCK_S)
    v8 = to_e4m3(x * tl.load(INV + bh * HEAD_DIM + offs_d)[None, :], INTERPRETED)
    cols = wgmma_key_slot(rows) if WGMMA_ORDER else rows
    out = VT8 + (bh.to(tl.int64) * HEAD_DIM + offs_d[:, None]) * padded_len + cols[None, :]
    tl.store(out, tl.trans(v8), mask=(rows < padded_len)[None, :])


def _channel_scales(v: Tensor):
    """``(amax / 448, 448 / amax)`` per channel of v ``[B, S, H_kv, D]`` as float32 ``[B, H_kv, D]`` (1 and 1 for an
    all-zero channel); both are correctly rounded float32 divisions of two tensors."""
    amax = v.abs().amax(dim=1).float()
    nonzero = amax > 0
    safe = torch.where(nonzero, amax, torch.ones_like(amax))
    e4m3_max = torch.full_like(safe, 448.0)
    return torch.where(nonzero, safe / e4m3_max, 1.0), torch.where(nonzero, e4m3_max / safe, 1.0)


class Fp8KV(NamedTuple):
    """Quantized keys and values of one call (see the module docstring for the formulas)."""

    k8: Tensor        # int8 [B, S, H_kv, D], contiguous
    k_scale: Tensor   # float32 [B, H_kv, ceil(S / KEY_QUANT_BLOCK)], contiguous: one scale per 128-token block
    k_mean: Tensor    # float32 [B, H_kv, D]
    vt8: Tensor       # float8_e4m3fn [B, H_kv, D, S_pad] (S_pad = S rounded up to 16; to 32 in wgmma key order),
                      # or None without FP8 P @ V
    v_scale: Tensor   # float32 [B, H_kv, D], or None without FP8 P @ V


def quantize_kv(k: Tensor, v: Tensor, fp8_pv: bool, interpreted: bool, block_s: int = 64,
                wgmma_order: bool = False) -> Fp8KV:
    """Quantize k, v ``[B, S, H_kv, D]`` (fp16/bf16/fp32, contiguous head dim) for the FP8 kernel.

    ``fp8_pv=False`` skips V (the kernel then multiplies P @ V in the input dtype). ``interpreted``: round in
    float32 arithmetic first (Triton's CPU interpreter). ``block_s``: tokens per V program. ``wgmma_order``:
    V^T's tokens at `wgmma_key_slot` columns (the Hopper kernel's layout).
    """
    B, S, H, D = k.shape
    mean = k.mean(dim=1, dtype=torch.float32)  # [B, H_kv, D]: the smoothing constant (no float32 copy of k)
    k8 = torch.empty(B, S, H, D, dtype=torch.int8, device=k.device)
    num_blocks = triton.cdiv(S, KEY_QUANT_BLOCK)
    k_scale = torch.empty(B, H, num_blocks, dtype=torch.float32, device=k.device)
    if B * H * S:
        with launch_lock():
            _quantize_k[(num_blocks, B * H)](k, mean, k8, k_scale, k.stride(0), k.stride(1), k.stride(2), S,
                                             num_blocks, NUM_KV_HEADS=H, HEAD_DIM=D, BLOCK_S=KEY_QUANT_BLOCK,
                                             INTERPRETED=interpreted)
    if not fp8_pv:
        return Fp8KV(k8, k_scale, mean, None, None)
    v_scale, inv = _channel_scales(v)
    align = KEY_GROUP if wgmma_order else 16  # 16-byte rows for tensor descriptors; whole groups to permute
    padded = triton.cdiv(max(S, 1), align) * align
    vt8 = torch.empty(B, H, D, padded, dtype=torch.float8_e4m3fn, device=v.device)
    if B * H * S:
        with launch_lock():
            _quantize_vt[(triton.cdiv(padded, block_s), B * H)](
                v, inv, vt8, v.stride(0), v.stride(1), v.stride(2), S, padded,
                NUM_KV_HEADS=H, HEAD_DIM=D, BLOCK_S=block_s, WGMMA_ORDER=wgmma_order, INTERPRETED=interpreted)
    return Fp8KV(k8, k_scale, mean, vt8, v_scale)


class QuantizedQ(NamedTuple):
    """Queries quantized per query tile of a kernel schedule (`quantize_q_tiles`)."""

    q8: Tensor       # int8 [B, Sq, H, D], contiguous (rows of no tile are left unwritten)
    q_scale: Tensor  # float32 [B * H, max_tiles]: the scale of tile ``pid_t`` of head ``b * H + h``
    q_mu: Tensor     # float32 [B, H, Sq]: q . k_mean per row


def quantize_q_tiles(q: Tensor, k_mean: Tensor, tiles: Tuple[Tensor, Tensor, Tensor], max_tiles: int,
                     per_head_layout: bool, block_m: int, interpreted: bool) -> QuantizedQ:
    """Quantize q ``[B, Sq, H, D]`` to INT8 with one scale per query tile, as the portable kernel's prologue does.

    ``tiles``: the schedule's ``(tile_ptr, tile_start, tile_end)`` for ``block_m``-row tiles (`schedule.py`; a
    multiple of 32 rows);
    ``k_mean``: `quantize_kv`'s smoothing constant ``[B, H_kv, D]``. A negative softmax scale is the caller's
    to fold in (pass ``-q``)."""
    B, Sq, H, D = q.shape
    if block_m % _Q_CHUNK:
        raise ValueError(f"block_m: expected a multiple of {_Q_CHUNK} query rows, got {block_m}")
    q8 = torch.empty(B, Sq, H, D, dtype=torch.int8, device=q.device)
    q_scale = torch.empty(B * H, max(max_tiles, 1), dtype=torch.float32, device=q.device)
    q_mu = torch.empty(B, H, Sq, dtype=torch.float32, device=q.device)
    if B * H * max_tiles:
        with launch_lock():
            _quantize_q_tiles[(max_tiles, B * H)](
                q, k_mean, q8, q_scale, q_mu, q.stride(0), q.stride(1), q.stride(2), *tiles, Sq, q_scale.shape[1],
                NUM_HEADS=H, KV_GROUP=H // k_mean.shape[1], PER_HEAD_LAYOUT=per_head_layout, HEAD_DIM=D,
                BLOCK_M=block_m, CHUNK=_Q_CHUNK, INTERPRETED=interpreted)
    return QuantizedQ(q8, q_scale, q_mu)
