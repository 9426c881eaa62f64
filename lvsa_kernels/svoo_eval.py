"""Synthetic clustered inputs and sampled-row checks for SVOO, shared by the demo and ``bench/svoo_bench.py``.

Random q/k give nearly uniform attention, where every key cluster looks equally relevant; these inputs
draw q and k around shared per-head centres, so attention is peaked as with trained weights.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor

from .reference.svoo import CoClustering

__all__ = ["clustered_qkv", "sampled_rows", "selected_attention"]


def clustered_qkv(S: int, H: int, D: int, centres: int, device: torch.device, dtype: torch.dtype,
                  seed: int = 0) -> Tuple[Tensor, Tensor, Tensor]:
    """q, k, v ``[1, S, H, D]``; q and k around ``centres`` shared centres per head (same-centre logits ~ 8)."""
    g = torch.Generator().manual_seed(seed)
    spread = math.sqrt(8.0 / math.sqrt(D))
    c = torch.randn(H, centres, D, generator=g) * spread

    def around() -> Tensor:
        idx = torch.randint(0, centres, (H, S), generator=g)
        x = torch.gather(c, 1, idx[..., None].expand(H, S, D)) + 0.5 * spread * torch.randn(H, S, D, generator=g)
        return x.transpose(0, 1)[None]

    v = torch.randn(1, S, H, D, generator=g)
    return tuple(t.to(device=device, dtype=dtype).contiguous() for t in (around(), around(), v))


def sampled_rows(S: int, n: int, device: torch.device) -> Tensor:
    """``n`` evenly spread query positions of ``S`` (int64, unique)."""
    return torch.linspace(0, S - 1, min(S, n)).round().long().unique().to(device)


def selected_attention(q: Tensor, k: Tensor, v: Tensor, clustering: CoClustering, mask: Tensor,
                       rows: Tensor) -> Tuple[Tensor, float]:
    """Exact float32 attention of query ``rows`` restricted to the selected blocks, and the recall.

    q, k, v ``[1, S, H, D]`` (batch element 0), ``mask`` bool ``[H, n_q, n_k]``. Returns ``(out [rows, H, D],
    recall)``, recall = mean softmax mass (over all keys) that the selected blocks cover.
    """
    H, D = q.shape[2], q.shape[3]
    mask = mask.to(q.device)
    outs, recall = [], 0.0
    for h in range(H):
        logits = (q[0, rows, h].float() @ k[0, :, h].float().T) / math.sqrt(D)
        allowed = mask[h][clustering.q.labels[h, rows]].gather(1, clustering.k.labels[h].expand(rows.numel(), -1))
        recall += float((torch.softmax(logits, -1) * allowed).sum(-1).mean()) / H
        outs.append(torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1) @ v[0, :, h].float())
    return torch.stack(outs, 1), recall
