"""Kernel schedule: a `BlockSparseLayout` cut into query tiles and key tiles for one (BLOCK_M, BLOCK_N).

Query tiles never straddle query blocks with different key spans: a run of consecutive blocks that
attend identical key spans (e.g. every block of a dense layout) is tiled as one, ``ceil(n / BLOCK_M)``
tiles for a run of ``n`` tokens, so no tile ever needs a per-row mask.
Each query block's key spans are cut into *full* key tiles (``BLOCK_N`` valid columns, no masking) and
at most one *tail* tile per span (fewer valid columns, masked in the kernel). Softmax is order-free, so
the kernel runs all full tiles first and the tails after. Tiles of each head are ordered heaviest
first (most key columns), so the expensive tiles (e.g. dense text rows) do not form a tail at the end
of the launch.

All arrays are int32 on the target device. Built once per (layout, BLOCK_M, BLOCK_N, device) and cached
on the layout.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..reference import BlockSparseLayout

__all__ = ["KernelSchedule", "build_schedule"]


@dataclass(frozen=True)
class KernelSchedule:
    """Index arrays read by the Triton kernel (see module docstring).

    tile_ptr    [Hl + 1]  query tiles of layout head h: tile_ptr[h] : tile_ptr[h + 1]
    tile_start  [nT]      first query token of the tile
    tile_end    [nT]      one past its last query token
    tile_row    [nT]      flat query-block row (head * nQB + block) whose key tiles it reads
    full_ptr    [Hl*nQB + 1], full_start [nF]                      full key tiles per row
    tail_ptr    [Hl*nQB + 1], tail_start [nTl], tail_end [nTl]     tail key tiles per row
    max_tiles   the largest number of query tiles of one layout head (grid dim 0)
    """

    block_m: int
    block_n: int
    tile_ptr: Tensor
    tile_start: Tensor
    tile_end: Tensor
    tile_row: Tensor
    full_ptr: Tensor
    full_start: Tensor
    tail_ptr: Tensor
    tail_start: Tensor
    tail_end: Tensor
    span_ptr: Tensor
    span_start: Tensor
    span_end: Tensor
    max_tiles: int

    def tensors(self):
        return (self.tile_ptr, self.tile_start, self.tile_end, self.tile_row,
                self.full_ptr, self.full_start, self.tail_ptr, self.tail_start, self.tail_end,
                self.span_ptr, self.span_start, self.span_end)


def _csr_ptr(counts: Tensor) -> Tensor:
    ptr = torch.zeros(counts.numel() + 1, dtype=torch.int64)
    ptr[1:] = torch.cumsum(counts, 0)
    return ptr


def build_schedule(layout: BlockSparseLayout, block_m: int, block_n: int,
                   device: torch.device) -> KernelSchedule:
    """The cached `KernelSchedule` of ``layout`` for tile sizes ``block_m`` x ``block_n`` on ``device``."""
    key = ("triton_schedule", block_m, block_n, str(device))
    return layout.cached(key, lambda: _build(layout, block_m, block_n, torch.device(device)))


def _build(layout: BlockSparseLayout, bm: int, bn: int, device: torch.device) -> KernelSchedule:
    Hl, nqb = layout.num_heads, layout.num_q_blocks
    sp = layout.spans
    n_rows = Hl * nqb
    span_ptr = torch.cat([sp.ptr[:, :-1].reshape(-1), sp.ptr[-1:, -1]]).long()
    span_row = torch.repeat_interleave(torch.arange(n_rows), span_ptr[1:] - span_ptr[:-1])
    s0, s1 = sp.start.long(), sp.end.long()
    length = s1 - s0

    # full key tiles: span j contributes length // bn tiles starting at s0 + i * bn
    n_full = length // bn
    full_row = torch.repeat_interleave(span_row, n_full)
    span_of_full = torch.repeat_interleave(torch.arange(s0.numel()), n_full)
    first_of_span = _csr_ptr(n_full)[:-1]
    i_in_span = torch.arange(full_row.numel()) - torch.repeat_interleave(first_of_span, n_full)
    full_start = s0[span_of_full] + i_in_span * bn
    # spans are stored row by row, so full tiles are already grouped by row
    full_ptr = _csr_ptr(torch.bincount(full_row, minlength=n_rows))

    # tail key tiles: the remainder of each span
    has_tail = (length % bn) > 0
    tail_start = s0[has_tail] + n_full[has_tail] * bn
    tail_end = s1[has_tail]
    tail_ptr = _csr_ptr(torch.bincount(span_row[has_tail], minlength=n_rows))

    # query tiles per run of consecutive blocks with identical key spans, heaviest first within each head
    run_row, run_lo, run_hi = _query_runs(layout, span_ptr, s0, s1)
    n_qt = (run_hi - run_lo + bm - 1) // bm
    tile_row = torch.repeat_interleave(run_row, n_qt)
    i_in_run = torch.arange(tile_row.numel()) - torch.repeat_interleave(_csr_ptr(n_qt)[:-1], n_qt)
    tile_start = torch.repeat_interleave(run_lo, n_qt) + i_in_run * bm
    tile_end = torch.minimum(tile_start + bm, torch.repeat_interleave(run_hi, n_qt))
    work = (full_ptr[1:] - full_ptr[:-1] + tail_ptr[1:] - tail_ptr[:-1])[tile_row]
    tile_head = tile_row // nqb
    # sort by head ascending, then work descending (stable keeps block order among equals)
    order = torch.argsort(tile_head * (work.max() + 1 if work.numel() else 1) - work, stable=True)
    tile_row, tile_start, tile_end = tile_row[order], tile_start[order], tile_end[order]
    tiles_per_head = torch.bincount(tile_head, minlength=Hl)
    tile_ptr = _csr_ptr(tiles_per_head)

    def dev(t: Tensor) -> Tensor:
        if t.numel() and int(t.max()) >= 2**31:
            raise ValueError("schedule index exceeds int32")
        if t.numel() == 0:  # never read (its CSR counts are 0), but kernels need a valid pointer
            t = torch.zeros(1, dtype=torch.int64)
        return t.to(torch.int32).to(device)

    return KernelSchedule(
        block_m=bm, block_n=bn,
        tile_ptr=dev(tile_ptr), tile_start=dev(tile_start), tile_end=dev(tile_end), tile_row=dev(tile_row),
        full_ptr=dev(full_ptr), full_start=dev(full_start),
        tail_ptr=dev(tail_ptr), tail_start=dev(tail_start), tail_end=dev(tail_end),
        span_ptr=dev(span_ptr), span_start=dev(s0), span_end=dev(s1),
        max_tiles=int(tiles_per_head.max()) if tiles_per_head.numel() else 0,
    )


def _query_runs(layout: BlockSparseLayout, span_ptr: Tensor, s0: Tensor, s1: Tensor):
    """Merge consecutive non-empty query blocks of one head whose key spans are identical.

    Rows of such a run attend exactly the same keys, so tiling the run as one block wastes fewer
    tile rows (a dense layout of 1560-token frames tiles 21 * 1560 rows as one run) and still never
    needs a per-row mask. Returns (first flat row, first token, end token) per run, int64.
    """
    Hl, nqb = layout.num_heads, layout.num_q_blocks
    q_off = layout.q_offsets.expand(Hl, -1).tolist()
    ptr, st, en = span_ptr.tolist(), s0.tolist(), s1.tolist()
    rows, lo, hi = [], [], []
    for h in range(Hl):
        prev = None
        for r in range(nqb):
            a, b = q_off[h][r], q_off[h][r + 1]
            if a == b:
                continue
            row = h * nqb + r
            spans = (st[ptr[row]:ptr[row + 1]], en[ptr[row]:ptr[row + 1]])
            if spans == prev and hi[-1] == a:
                hi[-1] = b
            else:
                rows.append(row), lo.append(a), hi.append(b)
                prev = spans
    return torch.tensor(rows, dtype=torch.int64), torch.tensor(lo, dtype=torch.int64), torch.tensor(hi, dtype=torch.int64)
