"""Exact block-sparse reference attention, the oracle every backend is checked against.

Computes masked softmax attention with float32 (or float64 for float64 inputs) accumulation, one
(layout head, query block) at a time over that block's key spans, in row chunks, so memory stays
O(chunk * keys) and never O(S^2). Tensors are ``[B, S, H, D]`` (flash-attn / diffusers convention).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .layout import BlockSparseLayout

__all__ = ["reference_attention"]

_CHUNK_ELEMENTS = 1 << 25  # score elements per chunk (128 MiB in float32)


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: BlockSparseLayout,
    scale: Optional[float] = None,
    return_lse: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Block-sparse attention computed exactly.

    Args:
        q: ``[B, Sq, H, D]``; k, v: ``[B, Skv, H_kv, D]`` with ``H % H_kv == 0`` (GQA: query head h
            reads key head ``h // (H // H_kv)``).
        layout: `BlockSparseLayout` with ``q_len == Sq``, ``kv_len == Skv`` and 1 or H heads.
        scale: softmax scale; default ``1 / sqrt(D)``.
        return_lse: also return the natural-log sum-exp ``[B, H, Sq]`` (float32).

    Returns:
        ``out`` ``[B, Sq, H, D]`` in q's dtype (and ``lse``). Query rows with no keys give 0 and lse -inf.
    """
    B, Sq, H, D = q.shape
    Hkv = k.shape[2]
    if layout.q_len != Sq or layout.kv_len != k.shape[1]:
        raise ValueError(f"layout covers {layout.q_len}x{layout.kv_len} tokens, inputs are {Sq}x{k.shape[1]}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros(B, Sq, H, v.shape[-1], dtype=acc, device=q.device)
    lse = torch.full((B, H, Sq), float("-inf"), dtype=torch.float32, device=q.device)
    head_of_kv = torch.arange(H, device=q.device) // (H // Hkv)
    sp = layout.spans
    q_off = layout.q_offsets.expand(layout.num_heads, -1)
    for lh in range(layout.num_heads):
        heads = torch.arange(H, device=q.device) if layout.num_heads == 1 else torch.tensor([lh], device=q.device)
        kv_heads = head_of_kv[heads]
        for r in range(layout.num_q_blocks):
            q0, q1 = int(q_off[lh, r]), int(q_off[lh, r + 1])
            s0, s1 = int(sp.ptr[lh, r]), int(sp.ptr[lh, r + 1])
            if q1 <= q0 or s1 <= s0:
                continue  # empty block or no keys: output stays 0, lse stays -inf
            idx = torch.cat([torch.arange(int(a), int(b)) for a, b in zip(sp.start[s0:s1], sp.end[s0:s1])])
            idx = idx.to(q.device)
            kk = k[:, idx][:, :, kv_heads].to(acc).permute(0, 2, 3, 1)  # [B, h, D, n]
            vv = v[:, idx][:, :, kv_heads].to(acc).transpose(1, 2)      # [B, h, n, Dv]
            rows = max(1, _CHUNK_ELEMENTS // max(1, B * len(heads) * idx.numel()))
            for c0 in range(q0, q1, rows):
                c1 = min(q1, c0 + rows)
                qq = q[:, c0:c1][:, :, heads].to(acc).transpose(1, 2)   # [B, h, m, D]
                s = torch.matmul(qq, kk) * scale
                m = s.amax(dim=-1, keepdim=True)
                p = torch.exp(s - m)
                denom = p.sum(dim=-1, keepdim=True)
                o = torch.matmul(p, vv) / denom
                out[:, c0:c1, heads] = o.transpose(1, 2)
                lse[:, heads, c0:c1] = (m + torch.log(denom)).squeeze(-1).float()
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out
