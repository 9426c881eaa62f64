"""Kernel schedule: a `BlockSparseLayout` cut into query tiles for one BLOCK_M.

A query tile is at most ``BLOCK_M`` consecutive rows that attend identical keys: consecutive query
blocks with identical key spans (e.g. every block of a dense layout) form one run, tiled as
``ceil(n / BLOCK_M)`` tiles for ``n`` tokens, so no tile ever needs a per-row mask. The kernel reads the
layout's merged key spans of the tile's row directly. Tiles of each head are ordered heaviest first
(most key tokens), so expensive tiles (e.g. dense text rows) do not form a tail at the end of a launch.

All arrays are int32 on the target device, built once per (layout, BLOCK_M, device) and memoised per layout (`LayoutMemo`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
from torch import Tensor

from ..reference.layout import BlockSparseLayout, LayoutMemo

__all__ = ["KernelSchedule", "KeyTiles", "build_key_schedule", "build_key_tiles", "build_pair_masks", "build_schedule",
           "transpose_layout"]

_SCHEDULES = LayoutMemo()   # per layout: the kernel schedule of each (block_m, device)


@dataclass(frozen=True)
class KernelSchedule:
    """Index arrays read by the Triton kernel (see module docstring).

    tile_ptr    [Hl + 1]  query tiles of layout head h: tile_ptr[h] : tile_ptr[h + 1]
    tile_start  [nT]      first query token of the tile
    tile_end    [nT]      one past its last query token
    tile_row    [nT]      flat query-block row (head * nQB + block) whose spans it reads
    span_ptr    [Hl*nQB + 1], span_start, span_end   the layout's merged key spans per row (tokens)
    max_tiles   the largest number of query tiles of one layout head (grid dim 0)
    """

    block_m: int
    tile_ptr: Tensor
    tile_start: Tensor
    tile_end: Tensor
    tile_row: Tensor
    span_ptr: Tensor
    span_start: Tensor
    span_end: Tensor
    max_tiles: int

    def tensors(self):
        return (self.tile_ptr, self.tile_start, self.tile_end, self.tile_row,
                self.span_ptr, self.span_start, self.span_end)


def _csr_ptr(counts: Tensor) -> Tensor:
    ptr = torch.zeros(counts.numel() + 1, dtype=torch.int64)
    ptr[1:] = torch.cumsum(counts, 0)
    return ptr


def build_schedule(layout: BlockSparseLayout, block_m: int, device: torch.device) -> KernelSchedule:
    """The cached `KernelSchedule` of ``layout`` for query tiles of ``block_m`` rows on ``device``."""
    key = ("triton_schedule", block_m, str(device))
    return _SCHEDULES.get(layout, key, lambda: _build(layout, block_m, torch.device(device)))


def build_key_schedule(layout: BlockSparseLayout, block_n: int, device: torch.device) -> KernelSchedule:
    """The backward's key-side schedule: `build_schedule` of the layout's transpose (`transpose_layout`), so
    ``tile_*`` are key tiles of at most ``block_n`` keys whose query spans are identical and the spans are query
    tokens. The transpose is built once per layout and kept with the layout's other schedules."""
    transposed = _SCHEDULES.get(layout, ("triton_transpose",), lambda: transpose_layout(layout))
    return build_schedule(transposed, block_n, device)


def build_pair_masks(layout: BlockSparseLayout, device: torch.device) -> Tuple[Tensor, Tensor]:
    """bool ``[Hl, q_len]``, the query tokens of layout head ``h`` that attend some key, and bool ``[Hl, kv_len]``,
    the key tokens some query of head ``h`` attends; cached with the layout's schedules (the single-pass
    backward bounds dQ over the attended keys and writes 0 on the other rows)."""
    def build():
        transposed = _SCHEDULES.get(layout, ("triton_transpose",), lambda: transpose_layout(layout))
        rows = _token_mask(layout.keys_per_block() > 0, layout.q_offsets)
        keys = _token_mask(transposed.keys_per_block() > 0, layout.kv_offsets)
        return rows.to(device), keys.to(device)

    return _SCHEDULES.get(layout, ("pair_masks", str(device)), build)


def _token_mask(block_mask: Tensor, offsets: Tensor) -> Tensor:
    """bool ``[H, S]`` of a per-block ``[H, n]`` mask, blocks given by token offsets ``[1 or H, n + 1]``."""
    token_block = BlockSparseLayout.token_to_block(offsets)
    return torch.gather(block_mask, 1, token_block.expand(block_mask.shape[0], -1))


def transpose_layout(layout: BlockSparseLayout) -> BlockSparseLayout:
    """The layout with queries and keys swapped: key block c of head h attends the query blocks that attend it.
    O(nnz) from the CSR (no dense block mask)."""
    H, nqb, nkb = layout.num_heads, layout.num_q_blocks, layout.num_kv_blocks
    rp = layout.row_ptr.long()
    counts = torch.cat([rp[:, :-1].reshape(-1), rp[-1:, -1]]).diff()
    rows = torch.repeat_interleave(torch.arange(H * nqb), counts)       # flat head * nQB + query block per entry
    head, qblock = rows // nqb, rows % nqb
    t_rows = head * nkb + layout.col_idx.long()                           # flat head * nKB + key block
    order = torch.argsort(t_rows * nqb + qblock)
    t_ptr = _csr_ptr(torch.bincount(t_rows, minlength=H * nkb))
    t_row_ptr = torch.cat([t_ptr[:-1].view(H, nkb), t_ptr[nkb::nkb].view(H, 1)], dim=1)
    return BlockSparseLayout(layout.kv_offsets, layout.q_offsets, t_row_ptr.to(torch.int32).contiguous(),
                             qblock[order].to(torch.int32).contiguous(), {"pattern": "transpose"})


def _build(layout: BlockSparseLayout, bm: int, device: torch.device) -> KernelSchedule:
    Hl, nqb = layout.num_heads, layout.num_q_blocks
    sp = layout.spans
    span_ptr = torch.cat([sp.ptr[:, :-1].reshape(-1), sp.ptr[-1:, -1]]).long()
    s0, s1 = sp.start.long(), sp.end.long()
    keys = torch.zeros(s0.numel() + 1, dtype=torch.int64)
    keys[1:] = torch.cumsum(s1 - s0, 0)
    keys_per_row = keys[span_ptr[1:]] - keys[span_ptr[:-1]]

    run_row, run_lo, run_hi = _query_runs(layout, span_ptr, s0, s1)
    n_qt = (run_hi - run_lo + bm - 1) // bm
    tile_row = torch.repeat_interleave(run_row, n_qt)
    i_in_run = torch.arange(tile_row.numel()) - torch.repeat_interleave(_csr_ptr(n_qt)[:-1], n_qt)
    tile_start = torch.repeat_interleave(run_lo, n_qt) + i_in_run * bm
    tile_end = torch.minimum(tile_start + bm, torch.repeat_interleave(run_hi, n_qt))
    work = keys_per_row[tile_row]
    tile_head = tile_row // nqb
    # sort by head ascending, then work descending (stable keeps block order among equals)
    order = torch.argsort(tile_head * (work.max() + 1 if work.numel() else 1) - work, stable=True)
    tile_row, tile_start, tile_end = tile_row[order], tile_start[order], tile_end[order]
    tiles_per_head = torch.bincount(tile_head, minlength=Hl)

    def dev(t: Tensor) -> Tensor:
        if t.numel() and int(t.max()) >= 2**31:
            raise ValueError("schedule index exceeds int32")
        if t.numel() == 0:  # never read (its counts are 0), but kernels need a valid pointer
            t = torch.zeros(1, dtype=torch.int64)
        return t.to(torch.int32).to(device)

    return KernelSchedule(
        block_m=bm,
        tile_ptr=dev(_csr_ptr(tiles_per_head)), tile_start=dev(tile_start), tile_end=dev(tile_end),
        tile_row=dev(tile_row), span_ptr=dev(span_ptr), span_start=dev(s0), span_end=dev(s1),
        max_tiles=int(tiles_per_head.max()) if tiles_per_head.numel() else 0,
    )


def _query_runs(layout: BlockSparseLayout, span_ptr: Tensor, s0: Tensor, s1: Tensor):
    """Merge consecutive non-empty query blocks of one head whose key spans are identical.

    Rows of such a run attend exactly the same keys, so tiling the run as one block wastes fewer
    tile rows (a dense layout of 1560-token frames tiles 21 * 1560 rows as one run) and still never
    needs a per-row mask. Only directly adjacent blocks merge (an empty block in between ends a run).
    Returns (first flat row, first token, end token) per run, int64, vectorised over all rows.
    """
    Hl, nqb = layout.num_heads, layout.num_q_blocks
    q_off = layout.q_offsets.expand(Hl, -1).long()
    q_lo, q_hi = q_off[:, :-1].reshape(-1), q_off[:, 1:].reshape(-1)
    n_rows = Hl * nqb
    count = span_ptr[1:] - span_ptr[:-1]
    # row r continues row r - 1 when both are non-empty blocks of one head with equally many spans ...
    same = torch.zeros(n_rows, dtype=torch.bool)
    same[1:] = (count[1:] == count[:-1]) & (q_hi[:-1] > q_lo[:-1]) & (torch.arange(1, n_rows) % nqb != 0)
    # ... and every span equals the span at the same position in row r - 1
    span_row = torch.repeat_interleave(torch.arange(n_rows), count)
    pos = torch.arange(s0.numel())
    check = same[span_row]
    prev = pos[check] - count[span_row[check]]
    differs = (s0[check] != s0[prev]) | (s1[check] != s1[prev])
    same &= torch.bincount(span_row[check][differs], minlength=n_rows) == 0
    rows = torch.nonzero(q_hi > q_lo).squeeze(1)
    starts = ~same[rows]
    run_id = torch.cumsum(starts.long(), 0) - 1
    run_row = rows[starts]
    run_hi = torch.zeros(run_row.numel(), dtype=torch.int64).scatter_reduce(0, run_id, q_hi[rows], "amax")
    return run_row, q_lo[run_row], run_hi


@dataclass(frozen=True)
class KeyTiles:
    """Each query-block row's key tiles, as the Hopper kernel walks them (see `build_key_tiles`).

    row_ptr   [Hl*nQB + 1]  key tiles of flat row r: row_ptr[r] : row_ptr[r + 1]
    start     [nK]          first key token of the tile
    end       [nK]          one past its last key token (``end - start < block_n`` only for a ragged piece)
    row_masked [Hl*nQB]     how many of row r's tiles need a column mask: its last ones (the short tiles,
                            ``end - start <= short_n``, or with ``short_n = 0`` the ragged ones)

    The tiles of a row cover its merged key spans exactly, each class in span order: full tiles of ``block_n``
    keys first. With ``short_n > 0`` every shorter piece is cut into short tiles of at most ``short_n`` keys,
    which come last (the kernel runs them as ``short_n``-column products on ``short_n``-row loads). With
    ``short_n = 0`` (fp8, or no piece shorter than ``block_n``) the ragged pieces follow the full tiles as
    masked ``block_n``-wide tiles. Either way the full tiles come first and run unmasked, and the last
    ``row_masked`` tiles of a row are the masked ones.
    ``aligned``: spans are cut at every multiple of ``block_n`` (token index), so no tile crosses one
    (the 8-bit modes scale K per aligned block); otherwise every ``block_n`` keys from the span's start.
    ``cuts_short``: pieces shorter than ``block_n`` are cut into short tiles when there are any (every
    precision but fp8); False: they stay ragged ``block_n``-wide tiles, which only fp8's kernel masks.
    """

    block_n: int
    short_n: int
    aligned: bool
    cuts_short: bool
    row_ptr: Tensor
    start: Tensor
    end: Tensor
    row_masked: Tensor

    def tensors(self):
        return (self.row_ptr, self.start, self.end, self.row_masked)


def build_key_tiles(layout: BlockSparseLayout, block_n: int, device: torch.device,
                    precision: str = "exact") -> KeyTiles:
    """The cached `KeyTiles` of ``layout`` for the Hopper kernel with key tiles of ``block_n`` columns at
    ``precision``: ``"exact"`` cuts each span from its start; the 8-bit modes cut at aligned blocks of
    ``block_n`` tokens (one K scale per tile). Short tiles: ``short_n`` in ``{block_n / 4, block_n / 2}``,
    whichever loads fewer keys over the layout (0 when every piece is full); none for ``"fp8"`` (its V^T
    tiles are column blocks)."""
    aligned, short = precision != "exact", precision != "fp8"
    key = ("triton_key_tiles", block_n, aligned, short, str(device))
    return _SCHEDULES.get(layout, key, lambda: _build_key_tiles(layout, block_n, aligned, short,
                                                                torch.device(device)))


def _build_key_tiles(layout: BlockSparseLayout, bn: int, aligned: bool, short: bool, device: torch.device) -> KeyTiles:
    sp = layout.spans
    span_ptr = torch.cat([sp.ptr[:, :-1].reshape(-1), sp.ptr[-1:, -1]]).long()
    s0, s1 = sp.start.long(), sp.end.long()
    origin = s0 // bn * bn if aligned else s0  # tiles step by bn from here, clipped to the span
    n_tiles = (s1 - origin + bn - 1) // bn
    i_in_span = torch.arange(int(n_tiles.sum())) - torch.repeat_interleave(_csr_ptr(n_tiles)[:-1], n_tiles)
    step = torch.repeat_interleave(origin, n_tiles) + i_in_span * bn
    start = torch.maximum(step, torch.repeat_interleave(s0, n_tiles))
    end = torch.minimum(step + bn, torch.repeat_interleave(s1, n_tiles))
    length = end - start
    short_n = _short_width(length, bn) if short else 0
    if short_n:  # every piece shorter than bn becomes tiles of at most short_n keys, in key order
        cuts = torch.where(length < bn, (length + short_n - 1) // short_n, 1)  # tiles per piece
        span_of_piece = torch.repeat_interleave(torch.arange(n_tiles.numel()), n_tiles)
        n_tiles = torch.zeros_like(n_tiles).index_add_(0, span_of_piece, cuts)
        i_in_piece = torch.arange(int(cuts.sum())) - torch.repeat_interleave(_csr_ptr(cuts)[:-1], cuts)
        width = torch.repeat_interleave(torch.where(length < bn, short_n, bn), cuts)
        start = torch.repeat_interleave(start, cuts) + i_in_piece * width
        end = torch.minimum(start + width, torch.repeat_interleave(end, cuts))
        length = end - start
    row_ptr = _csr_ptr(n_tiles)[span_ptr]
    n_rows = span_ptr.numel() - 1
    row = torch.repeat_interleave(torch.arange(n_rows), row_ptr[1:] - row_ptr[:-1])
    kind = (length < bn).long() + (length <= short_n).long()  # 0 full, 1 ragged (no short tiles), 2 short
    order = torch.argsort(row * 3 + kind, stable=True)
    start, end = start[order], end[order]
    row_masked = torch.bincount(row[kind > 0], minlength=n_rows)

    def dev(t: Tensor) -> Tensor:
        if t.numel() and int(t.max()) >= 2**31:
            raise ValueError("key tile index exceeds int32")
        if t.numel() == 0:
            t = torch.zeros(1, dtype=torch.int64)
        return t.to(torch.int32).to(device)

    return KeyTiles(block_n=bn, short_n=short_n, aligned=aligned, cuts_short=short, row_ptr=dev(row_ptr),
                    start=dev(start), end=dev(end), row_masked=dev(row_masked))


def _short_width(length: Tensor, bn: int) -> int:
    """The short-tile width for pieces of these lengths: 0 when every piece is full (``bn`` keys), else
    ``bn / 4`` or ``bn / 2``, whichever loads fewer keys when each shorter piece is cut into tiles of that width
    (ties: the wider, fewer tiles)."""
    ragged = length[length < bn]
    if ragged.numel() == 0:
        return 0

    def loaded(n: int) -> int:
        return int(((ragged + n - 1) // n * n).sum())
    return min((bn // 2, bn // 4), key=loaded)
