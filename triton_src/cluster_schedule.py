"""Device-side plan of one SVOO attention call: query tiles, packed key segments and key tiles.

Built from the block map and the cluster sizes by two Triton launches (`cluster_plan.py`): no host
round trip, no synchronisation, nothing of size S x S.
Every array's size is fixed by the shapes (grids use upper bounds; unused slots are empty), so a
plan can be built inside CUDA graphs. See `cluster_attn.py` for the vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import torch
import triton
from torch import Tensor

i32 = torch.int32

from .cluster_plan import plan_key_tiles, plan_query_tiles
from .interpreter import interpreting, launch_lock

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
    from the front, partial ones from the back, see `cluster_plan.plan_key_tiles`) and ``count [R, 2]``
    (full, partial)."""

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


def build_cluster_schedule(mask: Tensor, q_sizes: Tensor, k_sizes: Tensor, seq_len: int,
                           tiles: Sequence[Tuple[int, int]], window: int = WINDOW) -> ClusterSchedule:
    """Plan attention of query clusters to their selected key clusters over permuted tokens (two launches).

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
    if q_sizes.shape != (G, n_q) or k_sizes.shape != (G, n_k):
        raise ValueError(f"q_sizes, k_sizes: expected {(G, n_q)} and {(G, n_k)} for mask {tuple(mask.shape)}, "
                         f"got {tuple(q_sizes.shape)} and {tuple(k_sizes.shape)}")
    q_sizes = q_sizes.to(device=dev, dtype=torch.int64).contiguous()
    k_sizes = k_sizes.to(device=dev, dtype=torch.int64).contiguous()
    mask = mask.contiguous()
    R = G * n_q
    widths = sorted({bn for _, bn in tiles}, reverse=True)
    keys_per_row = torch.empty(R, dtype=torch.int64, device=dev)
    key_tiles = {bn: _empty_key_tiles(R, seq_len // bn + n_k // window + 1, bn, window, dev) for bn in widths}
    parts = [_empty_query_tiles(G, bm, seq_len // bm + n_q if p == 0 else n_q, dev) for p, (bm, _) in enumerate(tiles)]
    if R:
        seg_stride = n_k + window + 1
        seg = torch.empty(R, 2, seg_stride, dtype=i32, device=dev)
        kt1, kt2 = key_tiles[widths[0]], key_tiles[widths[-1]]
        q1, q2 = parts[0], parts[-1]
        block_q = triton.next_power_of_2(n_q)
        with launch_lock():  # serial walks: one warp, many rows per SM
            plan_key_tiles[(R,)](mask, k_sizes, seg, keys_per_row, kt1.records, kt1.count, kt2.records, kt2.count,
                                 n_q, n_k, seg_stride, kt1.records.shape[1], kt2.records.shape[1],
                                 BLOCK_K=triton.next_power_of_2(n_k), BLOCK_N1=widths[0],
                                 BLOCK_N2=widths[-1] if len(widths) == 2 else 0, WINDOW=window, num_warps=1)
        with launch_lock():
            plan_query_tiles[(G,)](keys_per_row, q_sizes, torch.empty(G, block_q, dtype=torch.int64, device=dev),
                                   q1.row, q1.q0, q1.q1, q2.row, q2.q0, q2.q1, n_q, q1.row.shape[1], q2.row.shape[1],
                                   BLOCK_Q=block_q, BLOCK_S=16 if interpreting() else 32, BM1=q1.block_m,
                                   BM2=q2.block_m if len(parts) == 2 else 0, num_warps=4)
    return ClusterSchedule(window=window, parts=tuple((qt, key_tiles[bn]) for qt, (_, bn) in zip(parts, tiles)),
                           keys_per_row=keys_per_row)


def _empty_query_tiles(G: int, block_m: int, slots: int, dev: torch.device) -> QueryTiles:
    return QueryTiles(block_m, *(torch.empty(G, slots, dtype=i32, device=dev) for _ in range(3)))


def _empty_key_tiles(R: int, slots: int, block_n: int, window: int, dev: torch.device) -> KeyTiles:
    return KeyTiles(block_n, torch.empty(R, slots, 2 * window + 1, dtype=i32, device=dev),
                    torch.empty(R, 2, dtype=i32, device=dev))
