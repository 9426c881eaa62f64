"""Device-side plan of one SVOO attention call: query tiles, packed key segments and key tiles.

Built from the block map and the cluster sizes with tensor ops on their device plus one small
Triton kernel (`pack_key_tiles`): no host round trip, no synchronisation, nothing of size S x S.
Every array's size is fixed by the shapes (grids use upper bounds; unused slots are empty), so a
plan can be built inside CUDA graphs. See `cluster_attn.py` for the vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

i32 = torch.int32

from .cluster_attn import pack_key_tiles
from .interpreter import launch_lock

__all__ = ["ClusterSchedule", "KeyTiles", "QueryTiles", "WINDOW", "build_cluster_schedule"]

WINDOW = 4  # segments one key tile may touch (its column -> row map costs WINDOW - 1 selects per column)


@dataclass(frozen=True)
class QueryTiles:
    """Query tiles of one launch: ``row, q0, q1`` int32 ``[G, slots]`` (row ``g * n_q + i`` and positions
    ``[q0, q1)`` in query-cluster order; ``q0 == q1``: empty slot)."""

    block_m: int
    row: Tensor
    q0: Tensor
    q1: Tensor


@dataclass(frozen=True)
class KeyTiles:
    """Key tiles of every row for ``block_n`` columns: ``records [R, slots, 2 * window + 1]`` int32 (full tiles
    from the front, partial ones from the back, see `pack_key_tiles`) and ``count [R, 2]`` (full, partial)."""

    block_n: int
    records: Tensor
    count: Tensor


@dataclass(frozen=True)
class ClusterSchedule:
    """Everything `cluster_attn_fwd` reads besides q, k, v (int32, on the device of the block map).

    parts   one (query tiles, key tiles) pair per kernel launch: big query tiles first, then (optionally)
            the small ones that hold a query cluster's remainder of at most their ``block_m`` rows
    keys_per_row ``[R]`` int64   selected key tokens of each row (its work)
    """

    window: int
    parts: Tuple[Tuple[QueryTiles, KeyTiles], ...]
    keys_per_row: Tensor


def _exclusive_cumsum(x: Tensor) -> Tensor:
    """``[..., n] -> [..., n + 1]`` starting at 0."""
    return torch.nn.functional.pad(torch.cumsum(x, dim=-1), (1, 0))


def build_cluster_schedule(mask: Tensor, q_sizes: Tensor, k_sizes: Tensor, seq_len: int,
                           tiles: Sequence[Tuple[int, int]], window: int = WINDOW) -> ClusterSchedule:
    """Plan attention of query clusters to their selected key clusters over permuted tokens.

    Args:
        mask: bool ``[G, n_q, n_k]``: query cluster i of group g attends key cluster j.
        q_sizes: int ``[G, n_q]``, k_sizes: int ``[G, n_k]``: tokens per cluster (each row sums to seq_len).
        seq_len: tokens per group (S).
        tiles: ``(block_m, block_n)`` of each launch: one pair, or two where the second has fewer rows: a
            cluster of s tokens then gets ``s // bm1`` big tiles plus its remainder r as one big tile when
            ``r > bm2``, else as one small tile (less padding for short remainders).
        window: segments one key tile may touch (a power of two).
    Rows of a group are ordered heaviest first (most selected keys), so long tiles do not trail a launch.
    Empty key clusters are never selected; a query cluster with no selected keys gets output 0, lse -inf.
    """
    G, n_q, n_k = mask.shape
    dev = mask.device
    if window < 1 or window & (window - 1):
        raise ValueError(f"window: expected a power of two, got {window}")
    if len(tiles) not in (1, 2) or (len(tiles) == 2 and tiles[1][0] >= tiles[0][0]):
        raise ValueError(f"tiles: expected [(bm, bn)] or [(bm1, bn1), (bm2, bn2)] with bm2 < bm1, got {tiles}")
    q_sizes, k_sizes = q_sizes.to(device=dev, dtype=torch.int64), k_sizes.to(device=dev, dtype=torch.int64)
    R = G * n_q
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
    seg_cum32, seg_delta32 = seg_cum.to(i32), seg_delta.to(i32)

    # query tiles: rows of a group heaviest first
    order = torch.argsort(keys_per_row.view(G, n_q), dim=1, descending=True, stable=True)
    sizes = q_sizes.gather(1, order)
    q_start = _exclusive_cumsum(q_sizes).gather(1, order)
    bm = tiles[0][0]
    small = tiles[1][0] if len(tiles) == 2 else 0
    rem = sizes % bm
    big = sizes // bm + (rem > small).long()
    parts = [_query_tiles(order, sizes, q_start, big, bm, seq_len // bm + n_q)]
    if small:
        parts.append(_query_tiles(order, sizes, q_start, ((rem > 0) & (rem <= small)).long(), small, n_q,
                                  first=sizes // bm * bm))

    key_tiles = {bn: _key_tiles(seg_cum32, seg_delta32, seq_len, n_k, bn, window) for bn in {bn for _, bn in tiles}}
    return ClusterSchedule(window=window, parts=tuple((qt, key_tiles[bn]) for qt, (_, bn) in zip(parts, tiles)),
                           keys_per_row=keys_per_row)


def _query_tiles(order: Tensor, sizes: Tensor, q_start: Tensor, count: Tensor, block_m: int, slots: int,
                 first: Optional[Tensor] = None) -> QueryTiles:
    """``count[g, i]`` tiles of ``block_m`` rows for the i-th heaviest cluster of group g (``order``, ``sizes``,
    ``q_start`` in that order), starting ``first`` rows into the cluster (default 0), in ``slots`` slots."""
    G, n_q = order.shape
    dev = order.device
    tiles_end = torch.cumsum(count, dim=1)
    slot = torch.arange(slots, device=dev).expand(G, slots).contiguous()
    which = torch.searchsorted(tiles_end, slot, right=True)  # position in `order`; n_q: no tile
    used = which < n_q
    which = which.clamp(max=n_q - 1)
    local = slot - (tiles_end.gather(1, which) - count.gather(1, which))
    lo = q_start.gather(1, which) + (0 if first is None else first.gather(1, which))
    q0 = lo + local * block_m
    q1 = torch.minimum(q0 + block_m, q_start.gather(1, which) + sizes.gather(1, which))
    row = torch.arange(G, device=dev).unsqueeze(1) * n_q + order.gather(1, which)
    return QueryTiles(block_m, row.to(i32), torch.where(used, q0, 0).to(i32), torch.where(used, q1, 0).to(i32))


def _key_tiles(seg_cum: Tensor, seg_delta: Tensor, seq_len: int, n_k: int, block_n: int, window: int) -> KeyTiles:
    """Greedy cut of each row's packed keys into tile records (one Triton program per row)."""
    R = seg_cum.shape[0]
    slots = seq_len // block_n + n_k // window + 1
    records = torch.empty(R, slots, 2 * window + 1, dtype=i32, device=seg_cum.device)
    count = torch.empty(R, 2, dtype=i32, device=seg_cum.device)
    if R:
        with launch_lock():  # a serial walk: one warp, many rows per SM
            pack_key_tiles[(R,)](seg_cum, seg_delta, records, count, seg_cum.shape[1], slots, BLOCK_N=block_n,
                                 WINDOW=window, num_warps=1)
    return KeyTiles(block_n, records, count)
