"""8-bit quantization for the block-sparse kernel's ``precision="fp8"`` / ``"int8_qk"`` modes.

`quantize_kv` is the pre-pass that runs once per call before the attention kernel:

* K is smoothed (its per-head mean over the tokens subtracted; softmax is invariant to a per-row
  constant, so every row of any block-sparse layout is unchanged) and quantized to INT8 per token:
  ``k8[b, s, h] = rne(127 * (k - mean) / amax_row)``, ``k_scale[b, h, s] = amax_row / 127``.
* V is quantized per channel, ``v_scale[b, h, d] = amax over tokens / 448``, and written transposed,
  ``vt8 [B, H_kv, D, S_pad]`` (tokens contiguous): Hopper's FP8 MMA wants its B operand K-major,
  and for ``P @ V`` the reduction runs over the tokens.

Q is quantized to INT8 inside the attention kernel, per query tile (`to_int8` below), and P to e4m3
with a fixed scale there. Scales are float32; scale arithmetic uses IEEE division so the PyTorch fake-quant
reference (`lvsa_kernels.reference.fp8`) reproduces every rounding.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .interpreter import launch_lock


__all__ = ["Fp8KV", "quantize_kv", "to_e4m3", "to_int8"]

_RNE = 12582912.0  # 1.5 * 2**23: (x + _RNE) - _RNE rounds |x| < 2**22 to an integer, nearest even


@triton.jit
def to_int8(x):
    """float32 tile -> int8, round to nearest even, saturating at +-127."""
    x = tl.minimum(tl.maximum(x, -127.0), 127.0)
    return ((x + 12582912.0) - 12582912.0).to(tl.int8)


@triton.jit
def to_e4m3(x, EMULATE: tl.constexpr):
    """float32 tile -> float8e4nv, round to nearest even, saturating at +-448.

    EMULATE (the CPU interpreter, whose float32 -> fp8 cast drops the rounding carry into the exponent)
    first rounds to the e4m3 grid with exact float32 arithmetic, so the cast only re-encodes.
    """
    x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    if EMULATE:
        expo = ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        ulp = ((tl.maximum(expo, -6) - 3 + 127) << 23).to(tl.float32, bitcast=True)  # e4m3 spacing at |x|
        x = ((x / ulp + 12582912.0) - 12582912.0) * ulp  # see _RNE
    return x.to(tl.float8e4nv)


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
def _quantize_k(K, MEAN, K8, KS, stride_kb, stride_ks, stride_kh, seq_len,
                NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr):
    """Rows ``program_id(0) * BLOCK_S ..`` of head ``program_id(1) = b * H_kv + h``: smooth, scale per row, cast."""
    bh, b, h, rows, offs_d, ok, x = _program_rows(K, stride_kb, stride_ks, stride_kh, seq_len, NUM_KV_HEADS,
                                                  HEAD_DIM, BLOCK_S)
    x = x - tl.load(MEAN + bh * HEAD_DIM + offs_d)[None, :]
    amax = tl.max(tl.abs(x), 1)
    nonzero = amax > 0.0
    inv = tl.where(nonzero, tl.fdiv(tl.full([BLOCK_S], 127.0, tl.float32), tl.where(nonzero, amax, 1.0),
                                    ieee_rounding=True), 1.0)
    scale = tl.where(nonzero, tl.fdiv(amax, tl.full([BLOCK_S], 127.0, tl.float32), ieee_rounding=True), 1.0)
    k8 = to_int8(x * inv[:, None])
    out = K8 + (b.to(tl.int64) * seq_len + rows[:, None]) * (NUM_KV_HEADS * HEAD_DIM) + h * HEAD_DIM + offs_d[None, :]
    tl.store(out, k8, mask=ok[:, None])
    tl.store(KS + bh.to(tl.int64) * seq_len + rows, scale, mask=ok)


@triton.jit
def _quantize_vt(V, INV, VT8, stride_vb, stride_vs, stride_vh, seq_len, padded_len,
                 NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, EMULATE: tl.constexpr):
    """Tokens ``program_id(0) * BLOCK_S ..`` of head ``program_id(1)``: scale per channel, cast, store transposed."""
    bh, b, h, rows, offs_d, ok, x = _program_rows(V, stride_vb, stride_vs, stride_vh, seq_len, NUM_KV_HEADS,
                                                  HEAD_DIM, BLOCK_S)
    v8 = to_e4m3(x * tl.load(INV + bh * HEAD_DIM + offs_d)[None, :], EMULATE)
    out = VT8 + (bh.to(tl.int64) * HEAD_DIM + offs_d[:, None]) * padded_len + rows[None, :]
    tl.store(out, tl.trans(v8), mask=ok[None, :])


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
    k_scale: Tensor   # float32 [B, H_kv, S]
    k_mean: Tensor    # float32 [B, H_kv, D]
    vt8: Tensor       # float8_e4m3fn [B, H_kv, D, S_pad] (S_pad = S rounded up to 16), or None without FP8 P @ V
    v_scale: Tensor   # float32 [B, H_kv, D], or None without FP8 P @ V


def quantize_kv(k: Tensor, v: Tensor, fp8_pv: bool, emulate: bool, block_s: int = 64) -> Fp8KV:
    """Quantize k, v ``[B, S, H_kv, D]`` (fp16/bf16/fp32, contiguous head dim) for the FP8 kernel.

    ``fp8_pv=False`` skips V (the kernel then multiplies P @ V in the input dtype). ``emulate``: round in
    float32 arithmetic first (Triton's CPU interpreter).
    """
    B, S, H, D = k.shape
    mean = k.float().mean(dim=1)  # [B, H_kv, D]: the smoothing constant
    k8 = torch.empty(B, S, H, D, dtype=torch.int8, device=k.device)
    k_scale = torch.empty(B, H, S, dtype=torch.float32, device=k.device)
    grid = (triton.cdiv(S, block_s), B * H)
    if B * H * S:
        with launch_lock():
            _quantize_k[grid](k, mean, k8, k_scale, k.stride(0), k.stride(1), k.stride(2), S,
                              NUM_KV_HEADS=H, HEAD_DIM=D, BLOCK_S=block_s)
    if not fp8_pv:
        return Fp8KV(k8, k_scale, mean, None, None)
    v_scale, inv = _channel_scales(v)
    padded = triton.cdiv(max(S, 1), 16) * 16  # 16-byte rows for tensor descriptors
    vt8 = torch.empty(B, H, D, padded, dtype=torch.float8_e4m3fn, device=v.device)
    if B * H * S:
        with launch_lock():
            _quantize_vt[grid](v, inv, vt8, v.stride(0), v.stride(1), v.stride(2), S, padded,
                               NUM_KV_HEADS=H, HEAD_DIM=D, BLOCK_S=block_s, EMULATE=emulate)
    return Fp8KV(k8, k_scale, mean, vt8, v_scale)
