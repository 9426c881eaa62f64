"""Layout -> NPU call plans: query-block groups that share a key-span list, and the exact tile grid for
``npu_block_sparse_attention``. Pure CPU computations, cached on the layout."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

from ..reference.layout import BlockSparseLayout, LayoutMemo

__all__ = ["SpanGroup", "TileGrid", "span_groups", "tile_grid"]

_GROUPS = LayoutMemo()   # per layout: span groups and tile grids

Ranges = Tuple[Tuple[int, int], ...]


@dataclass(frozen=True)
class SpanGroup:
    """Query tokens that attend exactly the same key tokens.

    ``head`` is the layout head (None for a layout shared by all heads); ``q_ranges`` are the group's
    query token ranges ``[a, b)`` (adjacent blocks merged); ``kv_spans`` the key token ranges they attend.
    """

    head: Optional[int]
    q_ranges: Ranges
    kv_spans: Ranges


def _merge(ranges: List[Tuple[int, int]]) -> Ranges:
    merged: List[Tuple[int, int]] = []
    for a, b in ranges:
        if merged and merged[-1][1] == a:
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    return tuple(merged)


def span_groups(layout: BlockSparseLayout) -> List[SpanGroup]:
    """One `SpanGroup` per distinct (layout head, key-span list). Query blocks without tokens or without
    keys belong to no group (their output is 0 and lse -inf)."""
    def build() -> List[SpanGroup]:
        sp = layout.spans
        ptr, start, end = sp.ptr.tolist(), sp.start.tolist(), sp.end.tolist()
        q_off = layout.q_offsets.expand(layout.num_heads, -1).tolist()
        groups: List[SpanGroup] = []
        for h in range(layout.num_heads):
            by_spans: Dict[Ranges, List[Tuple[int, int]]] = {}
            for r in range(layout.num_q_blocks):
                a, b = q_off[h][r], q_off[h][r + 1]
                spans = tuple(zip(start[ptr[h][r]:ptr[h][r + 1]], end[ptr[h][r]:ptr[h][r + 1]]))
                if b > a and spans:
                    by_spans.setdefault(spans, []).append((a, b))
            head = None if layout.num_heads == 1 else h
            groups += [SpanGroup(head, _merge(q), spans) for spans, q in by_spans.items()]
        return groups
    return _GROUPS.get(layout, "span_groups", build)


@dataclass(frozen=True)
class TileGrid:
    """The layout on an ``X x Y`` token tile grid: ``mask`` bool ``[Hl, ceil(Sq / X), ceil(Skv / Y)]``,
    True = compute. Exact: every tile lies inside one (query block, key block) pair."""

    x: int
    y: int
    mask: Tensor


def _interior_gcd(offsets: Tensor) -> int:
    g = 0
    for v in offsets[:, 1:-1].flatten().tolist():
        g = math.gcd(g, v)
    return g


def tile_grid(layout: BlockSparseLayout, y_multiple: int = 128) -> Union[TileGrid, str]:
    """The coarsest exact `TileGrid` whose key tile ``Y`` is a multiple of ``y_multiple``, or the reason
    (a string) why none exists. ``X``/``Y`` are the gcd of the interior block boundaries."""
    def build() -> Union[TileGrid, str]:
        sq, skv = layout.q_len, layout.kv_len
        gy = _interior_gcd(layout.kv_offsets)
        y = gy if gy else y_multiple * max(1, -(-skv // y_multiple))
        if y % y_multiple:
            return f"key block boundaries lie on a {gy}-token grid, not a multiple of {y_multiple}"
        x = _interior_gcd(layout.q_offsets) or max(sq, 1)
        nx, ny = -(-sq // x), -(-skv // y)
        qb = BlockSparseLayout.token_to_block(layout.q_offsets.expand(layout.num_heads, -1))[:, ::x][:, :nx]
        kb = BlockSparseLayout.token_to_block(layout.kv_offsets.expand(layout.num_heads, -1))[:, ::y][:, :ny]
        bm = layout.to_block_mask()
        h = torch.arange(layout.num_heads)[:, None, None]
        return TileGrid(x, y, bm[h, qb[:, :, None], kb[:, None, :]])
    return _GROUPS.get(layout, ("tile_grid", y_multiple), build)
