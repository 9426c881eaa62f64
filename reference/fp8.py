"""Fake-quant reference of the 8-bit block-sparse kernel (``precision="fp8"`` / ``"int8_qk"``), float32 math.

It reproduces the kernel's quantization, roundings and tile walk on any device:

* K smoothed by its per-(batch, kv head) mean over all tokens (`key_mean`), then INT8 with one scale per
  block of ``KEY_QUANT_BLOCK`` (128) consecutive tokens from token 0 (`quantize_keys`):
  ``k8 = rne(k_s * (127 / amax_block))``, scale ``amax_block / 127``;
* Q in INT8 per query tile: tiles of ``block_m`` rows from the start of each run of consecutive query
  blocks with identical key spans (the kernel's schedule), scale ``amax_tile / 127``, folded into the
  softmax scale; Q K^T is exact on these integers;
* online softmax in the exp2 domain over the block's key spans, in the kernel's order (`_walk`): the
  portable kernel cuts each span into ``block_n`` tiles from its start and takes every full tile, then every
  ragged tail; ``aligned_tiles`` cuts spans at multiples of ``block_n`` instead and ``short_n`` cuts every
  shorter piece into tiles of at most ``short_n`` keys (the Hopper kernel: ``block_n=128,
  aligned_tiles=True`` and its key tiles' ``short_n``, which it picks per layout: 0, 32 or 64);
* P in e4m3 with the fixed scale 448 (P <= 1 against the running max, so 1 maps onto e4m3's largest
  finite value); V in e4m3 per channel (`value_channel_scale`); both scales undone on the float32 output.
  With ``fp8_pv=False`` P is rounded to V's dtype and V is used as is.

Rows with no keys give 0 and lse -inf. Inputs must be finite on every token (the K mean and V scales
read the whole sequence).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor

from .layout import BlockSparseLayout

__all__ = ["E4M3_MAX", "INT8_MAX", "KEY_QUANT_BLOCK", "P_SCALE", "fp8_reference_attention", "key_mean",
           "quantize_int8", "quantize_keys", "value_channel_scale"]

E4M3_MAX = 448.0   # largest finite float8_e4m3fn
INT8_MAX = 127.0
P_SCALE = 448.0    # fixed scale of P in [0, 1]
KEY_QUANT_BLOCK = 128  # tokens per K scale (aligned blocks from token 0)
_LOG2E = 1.4426950408889634


def key_mean(k: Tensor) -> Tensor:
    """float32 ``[B, H_kv, D]`` mean of k ``[B, S, H_kv, D]`` over the tokens (the smoothing constant)."""
    return k.mean(dim=1, dtype=torch.float32)  # as the kernels' pre-pass computes it


def _scales(amax: Tensor, top: float = E4M3_MAX) -> Tuple[Tensor, Tensor]:
    """``(amax / top, top / amax)`` (1 and 1 where amax is 0), each one correctly rounded float32 division
    (tensor by tensor: torch may turn a division by or of a Python scalar into a reciprocal multiply)."""
    nonzero = amax > 0
    safe = torch.where(nonzero, amax, torch.ones_like(amax))
    top = torch.full_like(safe, top)
    return torch.where(nonzero, safe / top, 1.0), torch.where(nonzero, top / safe, 1.0)


def value_channel_scale(v: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel e4m3 scale of v ``[B, S, H_kv, D]``: ``(amax / 448, 448 / amax)`` float32 ``[B, H_kv, D]``
    (1 and 1 for an all-zero channel)."""
    return _scales(torch.maximum(v.amax(dim=1).float(), -v.amin(dim=1).float()))


def _e4m3(x: Tensor) -> Tensor:
    """Round float32 to the e4m3 grid (nearest even, saturating), returned as float32."""
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()


def quantize_int8(x: Tensor, dim: int = -1) -> Tuple[Tensor, Tensor]:
    """INT8 values (as float32) and float32 scales of x with one scale per slice reduced over ``dim``
    (``amax / 127``; 1 for an all-zero slice): ``x ~ values * scale``; rounding to nearest even."""
    x = x.float()
    scale, inv = _scales(x.abs().amax(dim=dim, keepdim=True), INT8_MAX)
    return torch.round(x * inv).clamp(-INT8_MAX, INT8_MAX), scale


def quantize_keys(k_s: Tensor) -> Tuple[Tensor, Tensor]:
    """INT8 values (float32 ``[B, S, H_kv, D]``) and scales (float32 ``[B, H_kv, ceil(S / 128)]``) of smoothed
    keys k_s ``[B, S, H_kv, D]`` with one scale per block of `KEY_QUANT_BLOCK` tokens (the last one may be
    partial) and all channels: ``amax / 127`` (1 for an all-zero block); rounding to nearest even."""
    B, S, H, D = k_s.shape
    n = -(-S // KEY_QUANT_BLOCK)
    padded = torch.zeros(B, n * KEY_QUANT_BLOCK, H, D, dtype=torch.float32, device=k_s.device)
    padded[:, :S] = k_s
    amax = padded.view(B, n, KEY_QUANT_BLOCK, H, D).abs().amax(dim=(2, 4))  # [B, n, H]
    scale, inv = _scales(amax, INT8_MAX)
    per_token = inv.repeat_interleave(KEY_QUANT_BLOCK, dim=1)[:, :S, :, None]
    return torch.round(k_s * per_token).clamp(-INT8_MAX, INT8_MAX), scale.transpose(1, 2).contiguous()


def _runs(layout: BlockSparseLayout, lh: int) -> List[Tuple[int, int, int, int]]:
    """``(q0, q1, s0, s1)`` per run of consecutive non-empty query blocks of layout head ``lh`` that attend
    identical key spans (rows ``q0 .. q1``, spans ``s0 .. s1``); blocks without keys are left out."""
    sp = layout.spans
    q_off = layout.q_offsets[min(lh, layout.q_offsets.shape[0] - 1)]
    runs: List[Tuple[int, int, int, int]] = []
    prev = None
    for r in range(layout.num_q_blocks):
        q0, q1 = int(q_off[r]), int(q_off[r + 1])
        s0, s1 = int(sp.ptr[lh, r]), int(sp.ptr[lh, r + 1])
        if q1 <= q0 or s1 <= s0:
            prev = None
            continue
        spans = (sp.start[s0:s1].tolist(), sp.end[s0:s1].tolist())
        if prev == spans:
            runs[-1] = (runs[-1][0], q1, runs[-1][2], runs[-1][3])
        else:
            runs.append((q0, q1, s0, s1))
        prev = spans
    return runs


def _walk(starts, ends, block_n: int, aligned: bool = False, short_n: int = 0) -> List[Tuple[int, int]]:
    """The kernel's key tiles ``(a, e)`` for spans ``[starts, ends)`` (layout order).

    Each span is cut at ``start + j * block_n`` or, with ``aligned``, at every multiple of ``block_n`` inside
    it (each piece then lies in one aligned block). Order: pieces of ``block_n`` keys, then the shorter ones;
    with ``short_n > 0`` each shorter piece is first cut into tiles of at most ``short_n`` keys. Within a class,
    span order, then position."""
    full: List[Tuple[int, int]] = []
    rest: List[Tuple[int, int]] = []
    for s, e in zip(starts, ends):
        s, e = int(s), int(e)
        a = s
        while a < e:
            b = min(e, (a // block_n + 1) * block_n if aligned else a + block_n)
            if b - a == block_n:
                full.append((a, b))
            else:
                width = short_n or block_n
                rest.extend((c, min(c + width, b)) for c in range(a, b, width))
            a = b
    return full + rest


def _steps(walk: List[Tuple[int, int]], block_n: int, tiles_per_step: int) -> List[List[Tuple[int, int]]]:
    """The walk's tiles as softmax steps: one tile each, or (``tiles_per_step=2``) the full tiles (``block_n``
    keys, at the walk's head) in consecutive pairs, then every tile left one at a time."""
    full = sum(1 for a, e in walk if e - a == block_n) if tiles_per_step == 2 else 0
    paired = full - full % 2
    return [walk[i:i + 2] for i in range(0, paired, 2)] + [[t] for t in walk[paired:]]


def fp8_reference_attention(q: Tensor, k: Tensor, v: Tensor, layout: BlockSparseLayout,
                            scale: Optional[float] = None, block_m: int = 128, block_n: int = 128,
                            fp8_pv: bool = True, return_lse: bool = False, aligned_tiles: bool = False,
                            short_n: int = 0, tiles_per_step: int = 1,
                            rowsum_rounded: bool = False) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Block-sparse attention as the 8-bit kernel computes it with tiles ``block_m`` x ``block_n``.

    Args:
        q: ``[B, Sq, H, D]``; k, v: ``[B, Skv, H_kv, D]`` (fp16/bf16/fp32); layout as in `reference_attention`.
        scale: softmax scale (> 0), default ``1 / sqrt(D)``.
        fp8_pv: P and V in e4m3 (``precision="fp8"``); False: P rounded to v's dtype (``"int8_qk"``).
        return_lse: also return lse ``[B, H, Sq]`` (float32, natural log), un-smoothed.
        aligned_tiles, short_n: the key walk (`_walk`); defaults: the portable kernel's.
        tiles_per_step: 2 folds the walk's full tiles two at a time (one running-max update per pair, as the
            Hopper kernel's fp8 mode with ``tiles_per_step=2``; an odd full tile left over and the shorter ones
            one at a time); 1: every tile alone.
        rowsum_rounded: with ``fp8_pv``, the softmax normaliser sums the e4m3-rounded P the output is made of
            (the Hopper kernel's ``rowsum_mma``, which sums on the tensor cores); False: the unrounded P.

    Returns:
        ``out [B, Sq, H, D]`` in q's dtype (and lse).
    """
    B, Sq, H, D = q.shape
    Hkv = k.shape[2]
    if layout.q_len != Sq or layout.kv_len != k.shape[1]:
        raise ValueError(f"layout covers {layout.q_len}x{layout.kv_len} tokens, inputs are {Sq}x{k.shape[1]}")
    if not 0 <= short_n < block_n:
        raise ValueError(f"short_n: expected 0 <= short_n < block_n = {block_n}, got {short_n}")
    if tiles_per_step not in (1, 2):
        raise ValueError(f"tiles_per_step: expected 1 or 2, got {tiles_per_step}")
    if rowsum_rounded and not fp8_pv:
        raise ValueError("rowsum_rounded: sums the e4m3-rounded P, so it needs fp8_pv=True")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    qk_scale = scale * _LOG2E
    mean = key_mean(k)                                                    # [B, Hkv, D]
    k8, k_scale = quantize_keys(k.float() - mean[:, None])                # [B, S, Hkv, D], [B, Hkv, S / 128]
    if fp8_pv:
        v_scale, v_inv = value_channel_scale(v)
        v_used = _e4m3(v.float() * v_inv[:, None])
    else:
        v_used = v.float()
    out = torch.zeros(B, Sq, H, D, dtype=torch.float32, device=q.device)
    lse = torch.full((B, H, Sq), float("-inf"), dtype=torch.float32, device=q.device)
    head_of_kv = torch.arange(H, device=q.device) // (H // Hkv)
    sp = layout.spans
    for lh in range(layout.num_heads):
        heads = torch.arange(H, device=q.device) if layout.num_heads == 1 else torch.tensor([lh], device=q.device)
        kvh = head_of_kv[heads]
        for q0, q1, s0, s1 in _runs(layout, lh):
            m_rows = q1 - q0
            tiles = -(-m_rows // block_m)
            qq = torch.zeros(B, len(heads), tiles * block_m, D, device=q.device)
            qq[:, :, :m_rows] = q[:, q0:q1][:, :, heads].float().transpose(1, 2)
            q8, q_scale = quantize_int8(qq.view(B, len(heads), tiles, block_m * D))
            q8 = q8.view(B, len(heads), tiles, block_m, D)
            row_scale = qk_scale * q_scale[..., None]                      # [B, h, tiles, 1, 1]
            m_i = torch.full((B, len(heads), tiles, block_m, 1), float("-inf"), device=q.device)
            l_i = torch.zeros_like(m_i)
            acc = torch.zeros(B, len(heads), tiles, block_m, D, device=q.device)
            walk = _walk(sp.start[s0:s1].tolist(), sp.end[s0:s1].tolist(), block_n, aligned_tiles, short_n)
            for step in _steps(walk, block_n, tiles_per_step):
                keys = torch.cat([torch.arange(a, e, device=q.device) for a, e in step])
                kk = k8[:, keys][:, :, kvh].permute(0, 2, 3, 1)[:, :, None]     # [B, h, 1, D, n]
                blocks = keys // KEY_QUANT_BLOCK
                ks = k_scale[:, kvh][:, :, blocks][:, :, None, None]                 # [B, h, 1, 1, n]
                qk = torch.matmul(q8, kk) * ks
                m_new = torch.maximum(m_i, qk.amax(-1, keepdim=True) * row_scale)
                p = torch.exp2(qk * row_scale - m_new)
                alpha = torch.exp2(m_i - m_new)
                p_used = _e4m3(p * P_SCALE) if fp8_pv else p.to(v.dtype).float()
                summed = p_used / P_SCALE if fp8_pv and rowsum_rounded else p
                l_i = l_i * alpha + summed.sum(-1, keepdim=True)
                p = p_used
                vv = v_used[:, keys][:, :, kvh].transpose(1, 2)[:, :, None]     # [B, h, 1, n, D]
                acc = acc * alpha + torch.matmul(p, vv)
                m_i = m_new
            o = acc / l_i
            if fp8_pv:
                o = o * (v_scale[:, kvh] / P_SCALE)[:, :, None, None]
            q_mu = torch.einsum("bhmd,bhd->bhm", qq, mean[:, kvh]).view(B, len(heads), tiles, block_m, 1)
            row_lse = (m_i + torch.log2(l_i) + qk_scale * q_mu) * math.log(2.0)
            out[:, q0:q1, heads] = o.reshape(B, len(heads), -1, D)[:, :, :m_rows].transpose(1, 2)
            lse[:, heads, q0:q1] = row_lse.reshape(B, len(heads), -1)[:, :, :m_rows]
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out
