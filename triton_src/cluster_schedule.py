"""Device-side plan of one SVOO attention call: query tiles, packed key segments and key tiles.

Built from the block map and the cluster sizes with tensor ops on their device plus one small
Triton kernel (`pack_key_tiles`): no host round trip, no synchronisation, nothing of size S x S.
Every array's size is fixed by the shapes (grids use upper bounds; unused slots are empty), so a
plan can be built inside CUDA graphs. See `cluster_attn.py` for the vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

i32 = torch.int32

from .cluster_attn import pack_key_tiles

__all__ = ["ClusterSchedule", "build_cluster_schedule", "WINDOW"]

WINDOW = 4  # segments one key tile may touch (its column -> row map costs WINDOW - 1 selects per column)


@dataclass(frozen=True)
class ClusterSchedule:
    """Arrays read by `cluster_attn_fwd` (int32, on the device of the block map).

    tile_row, tile_q0, tile_q1  ``[G, q_slots]``  query tile: its row ``g * n_q + i`` and positions
                                ``[q0, q1)`` in query-cluster order (``q0 == q1``: empty slot)
    key_tiles ``[R, key_slots, 2 * window + 1]``, key_count ``[R, 2]``   key tile records per row
                (full tiles from the front, partial ones from the back) and their numbers (full, partial)
    seg_cum, seg_delta ``[R, n_k + window + 1]``   packed segments per row (kept for inspection)
    keys_per_row ``[R]`` int64   selected key tokens of each row (its work)
    """

    block_m: int
    block_n: int
    window: int
    tile_row: Tensor
    tile_q0: Tensor
    tile_q1: Tensor
    key_tiles: Tensor
    key_count: Tensor
    seg_cum: Tensor
    seg_delta: Tensor
    keys_per_row: Tensor

    def tensors(self):
        return (self.tile_row, self.tile_q0, self.tile_q1, self.key_tiles, self.key_count)


def _exclusive_cumsum(x: Tensor) -> Tensor:
    """``[..., n] -> [..., n + 1]`` starting at 0."""
    return torch.nn.functional.pad(torch.cumsum(x, dim=-1), (1, 0))


def build_cluster_schedule(mask: Tensor, q_sizes: Tensor, k_sizes: Tensor, seq_len: int, block_m: int,
                           block_n: int, window: int = WINDOW) -> ClusterSchedule:
    """Plan attention of query clusters to their selected key clusters over permuted tokens.

    Args:
        mask: bool ``[G, n_q, n_k]``: query cluster i of group g attends key cluster j.
        q_sizes: int ``[G, n_q]``, k_sizes: int ``[G, n_k]``: tokens per cluster (each row sums to seq_len).
        seq_len: tokens per group (S).
        block_m, block_n: query rows per tile, packed key columns per tile.
        window: segments one key tile may touch (a power of two).
    Rows of a group are ordered heaviest first (most selected keys), so long tiles do not trail the launch.
    Empty key clusters are never selected; a query cluster with no selected keys gets output 0, lse -inf.
    """
    G, n_q, n_k = mask.shape
    dev = mask.device
    q_sizes, k_sizes = q_sizes.to(device=dev, dtype=torch.int64), k_sizes.to(device=dev, dtype=torch.int64)
    R = G * n_q
    if window < 1 or window & (window - 1):
        raise ValueError(f"window: expected a power of two, got {window}")
    width = n_k + window

    # packed segments: each row's selected, non-empty key clusters in cluster order
    sel = (mask & (k_sizes > 0).unsqueeze(1)).reshape(R, n_k)
    pos = torch.where(sel, torch.cumsum(sel, dim=1) - 1, width - 1)  # unselected -> a spare column
    seg_len = torch.zeros(R, width, dtype=torch.int64, device=dev)
    seg_len.scatter_(1, pos, torch.where(sel, k_sizes.repeat_interleave(n_q, dim=0), 0))
    seg_len[:, n_k:] = 0
    seg_start = torch.zeros(R, width, dtype=torch.int64, device=dev)
    seg_start.scatter_(1, pos, _exclusive_cumsum(k_sizes)[:, :-1].repeat_interleave(n_q, dim=0))
    seg_cum = _exclusive_cumsum(seg_len)
    seg_delta = torch.nn.functional.pad(seg_start - seg_cum[:, :-1], (0, 1))  # same row stride as seg_cum
    keys_per_row = seg_cum[:, -1]

    # query tiles: rows of a group heaviest first, each row's tokens cut into ceil(size / block_m) tiles;
    # sum_i ceil(size_i / block_m) <= seq_len // block_m + n_q bounds the slots
    q_slots = seq_len // block_m + n_q
    order = torch.argsort(keys_per_row.view(G, n_q), dim=1, descending=True, stable=True)
    tiles = (q_sizes.gather(1, order) + block_m - 1) // block_m
    tiles_end = torch.cumsum(tiles, dim=1)
    slot = torch.arange(q_slots, device=dev).expand(G, q_slots).contiguous()
    which = torch.searchsorted(tiles_end, slot, right=True)  # position in `order`; n_q: no tile
    used = which < n_q
    which = which.clamp(max=n_q - 1)
    cluster = order.gather(1, which)
    local = slot - (tiles_end.gather(1, which) - tiles.gather(1, which))
    q_start = _exclusive_cumsum(q_sizes)
    q0 = q_start.gather(1, cluster) + local * block_m
    q1 = torch.minimum(q0 + block_m, q_start.gather(1, cluster + 1))
    q0 = torch.where(used, q0, 0)
    q1 = torch.where(used, q1, 0)
    tile_row = torch.arange(G, device=dev).unsqueeze(1) * n_q + cluster

    # key tiles: greedy cut of each row's packed keys (one Triton program per row)
    key_slots = seq_len // block_n + n_k // window + 1
    seg_cum32, seg_delta32 = seg_cum.to(i32), seg_delta.to(i32)
    key_tiles = torch.empty(R, key_slots, 2 * window + 1, dtype=i32, device=dev)
    key_count = torch.empty(R, 2, dtype=i32, device=dev)
    if R:
        pack_key_tiles[(R,)](seg_cum32, seg_delta32, key_tiles, key_count, seg_cum32.shape[1], key_slots,
                             BLOCK_N=block_n, WINDOW=window)
    return ClusterSchedule(
        block_m=block_m, block_n=block_n, window=window,
        tile_row=tile_row.to(i32), tile_q0=q0.to(i32), tile_q1=q1.to(i32),
        key_tiles=key_tiles, key_count=key_count, seg_cum=seg_cum32, seg_delta=seg_delta32,
        keys_per_row=keys_per_row,
    )
