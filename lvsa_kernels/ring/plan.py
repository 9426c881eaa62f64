"""What each rank of a layout-aware ring reads from each key shard, and the sub-layouts it runs on it.

A sequence of ``S`` tokens is split into ``R`` contiguous shards (`SequenceShards`); rank ``r`` holds the
queries, keys and values of shard ``r``. From the global `BlockSparseLayout` alone (its CSR, never a token
mask), `ring_plan` lists for every (query rank ``r``, key shard ``s``) the key tokens of shard ``s`` that the
queries of shard ``r`` attend in any head, as merged runs (`KeyRuns`): rank ``s`` sends exactly those tokens,
packed in token order, to rank ``r``, and nothing when there are none. `rank_plan` adds rank ``r``'s
sub-layouts: the layout restricted to r's query tokens x the keys it holds from shard ``s`` (its own whole
shard, or the packed runs received), with blocks cut at the shard edges and key blocks renumbered over the
packed tokens. Merging the per-shard outputs by their lse gives r's rows of the global attention.

Both plans are cached per layout (`LayoutMemo`, keyed by layout identity and the shard bounds), so a layout
planned once per denoising step is split once per step for every layer. Cost O(R^2 * nnz) on the CPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..reference.layout import BlockSparseLayout, LayoutMemo

__all__ = ["KeyRuns", "RankPlan", "RingPlan", "RingTraffic", "SequenceShards", "rank_plan", "ring_plan"]

_MEMO = LayoutMemo()


@dataclass(frozen=True)
class SequenceShards:
    """Contiguous token shards of one sequence: shard ``r`` holds tokens ``[bounds[r], bounds[r + 1])``.

    Attributes:
        bounds: ``R + 1`` non-decreasing token offsets starting at 0 (shards may differ in size, even be empty).
    """

    bounds: Tuple[int, ...]

    def __post_init__(self) -> None:
        b = tuple(self.bounds)
        if len(b) < 2 or any(not isinstance(x, int) or isinstance(x, bool) for x in b):
            raise ValueError(f"bounds: expected R + 1 >= 2 integer token offsets, got {self.bounds!r}")
        if b[0] != 0 or any(y < x for x, y in zip(b, b[1:])):
            raise ValueError(f"bounds: expected non-decreasing token offsets starting at 0, got {b}")
        object.__setattr__(self, "bounds", b)

    @classmethod
    def split(cls, tokens: int, ranks: int) -> "SequenceShards":
        """``tokens`` over ``ranks`` shards as ``torch.tensor_split`` cuts them (the first ``tokens % ranks``
        shards hold one token more; diffusers' equal split and its ``ring_anything`` split)."""
        if ranks < 1 or tokens < 0:
            raise ValueError(f"SequenceShards.split: expected tokens >= 0 and ranks >= 1, got {tokens}, {ranks}")
        q, m = divmod(tokens, ranks)
        return cls.from_sizes([q + (r < m) for r in range(ranks)])

    @classmethod
    def from_sizes(cls, sizes: Sequence[int]) -> "SequenceShards":
        """Shards of the given token counts, in rank order."""
        bounds = [0]
        for n in sizes:
            if not isinstance(n, int) or n < 0:
                raise ValueError(f"sizes: expected non-negative integer token counts, got {list(sizes)}")
            bounds.append(bounds[-1] + n)
        return cls(tuple(bounds))

    @property
    def ranks(self) -> int:
        """R, the number of shards."""
        return len(self.bounds) - 1

    @property
    def tokens(self) -> int:
        """S, the sequence length."""
        return self.bounds[-1]

    def range(self, rank: int) -> Tuple[int, int]:
        """``(start, end)`` token range of shard ``rank``."""
        return self.bounds[rank], self.bounds[rank + 1]

    def size(self, rank: int) -> int:
        """Tokens of shard ``rank``."""
        return self.bounds[rank + 1] - self.bounds[rank]


@dataclass(frozen=True)
class KeyRuns:
    """Sorted, disjoint, non-adjacent token runs ``[starts[i], ends[i])`` (absolute token positions, int64)."""

    starts: Tensor
    ends: Tensor

    @property
    def tokens(self) -> int:
        """Tokens the runs cover."""
        return int((self.ends - self.starts).sum())

    def index(self, origin: int = 0) -> Tensor:
        """int64 ``[tokens]``: the covered token positions minus ``origin``, in order (the packing order)."""
        if not self.starts.numel():
            return torch.zeros(0, dtype=torch.int64)
        lens = self.ends - self.starts
        first = torch.repeat_interleave(self.starts - origin, lens)
        step = torch.arange(first.numel()) - torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens)
        return first + step

    def packed(self, offsets: Tensor) -> Tensor:
        """Token positions ``offsets`` (int64, any shape) mapped to positions in the packed runs: the number of
        covered tokens before each offset."""
        if not self.starts.numel():
            return torch.zeros_like(offsets)
        lens = self.ends - self.starts
        before = torch.cumsum(lens, 0) - lens
        idx = torch.searchsorted(self.starts, offsets, right=True) - 1
        i = idx.clamp(min=0)
        inside = before[i] + torch.minimum((offsets - self.starts[i]).clamp(min=0), lens[i])
        return torch.where(idx >= 0, inside, torch.zeros_like(offsets))


def _merge(starts: Tensor, ends: Tensor) -> KeyRuns:
    """Union of the token intervals ``[starts, ends)`` (all non-empty) as `KeyRuns` (touching runs merged)."""
    if not starts.numel():
        empty = torch.zeros(0, dtype=torch.int64)
        return KeyRuns(empty, empty)
    order = torch.argsort(starts, stable=True)
    s, e = starts[order], ends[order]
    reach = torch.cummax(e, 0).values
    new = torch.ones_like(s, dtype=torch.bool)
    new[1:] = s[1:] > reach[:-1]
    last = torch.ones_like(new)
    last[:-1] = new[1:]
    return KeyRuns(s[new].contiguous(), reach[last].contiguous())


@dataclass(frozen=True)
class _Entries:
    """One row per CSR entry of a layout: layout head, query block, key block and their token ranges."""

    head: Tensor
    q_block: Tensor
    kv_block: Tensor
    q_head: Tensor   # row of q_offsets of the entry (0 for shared offsets)
    kv_head: Tensor  # row of kv_offsets
    q0: Tensor
    q1: Tensor
    k0: Tensor
    k1: Tensor

    @classmethod
    def of(cls, layout: BlockSparseLayout) -> "_Entries":
        heads, nqb = layout.num_heads, layout.num_q_blocks
        rp = layout.row_ptr.long()
        rows = torch.repeat_interleave(torch.arange(heads * nqb), (rp[:, 1:] - rp[:, :-1]).reshape(-1))
        head, qb, kb = rows // nqb, rows % nqb, layout.col_idx.long()
        qo, ko = layout.q_offsets.long(), layout.kv_offsets.long()
        qh = head if qo.shape[0] > 1 else torch.zeros_like(head)
        kh = head if ko.shape[0] > 1 else torch.zeros_like(head)
        return cls(head, qb, kb, qh, kh, qo[qh, qb], qo[qh, qb + 1], ko[kh, kb], ko[kh, kb + 1])


@dataclass(frozen=True)
class RingTraffic:
    """Key/value tokens sent by a layout-aware ring vs a dense ring (every shard to every other rank).

    Multiply by ``2 * B * H_kv * D * element size`` (k and v) for bytes.
    """

    sent_tokens: int
    dense_tokens: int

    @property
    def ratio(self) -> float:
        """``sent_tokens / dense_tokens`` (0 when a dense ring sends nothing)."""
        return self.sent_tokens / self.dense_tokens if self.dense_tokens else 0.0


@dataclass(frozen=True)
class RingPlan:
    """For every query rank ``r`` and key shard ``s``, ``runs[r][s]``: the key tokens of shard ``s`` that the
    queries of shard ``r`` attend (any head), as absolute `KeyRuns`."""

    shards: SequenceShards
    runs: Tuple[Tuple[KeyRuns, ...], ...]

    def sent_tokens(self, rank: int) -> int:
        """Key/value tokens rank ``rank`` sends in one ring pass."""
        return sum(self.runs[d][rank].tokens for d in range(self.shards.ranks) if d != rank)

    def traffic(self) -> RingTraffic:
        """Tokens sent by all ranks in one ring pass vs a dense ring's ``(R - 1) * S``."""
        R = self.shards.ranks
        return RingTraffic(sum(self.sent_tokens(r) for r in range(R)), (R - 1) * self.shards.tokens)


def _check_layout(layout: BlockSparseLayout, shards: SequenceShards) -> None:
    if not isinstance(layout, BlockSparseLayout):
        raise TypeError(f"layout: expected a BlockSparseLayout, got {type(layout).__name__}")
    if not isinstance(shards, SequenceShards):
        raise TypeError(f"shards: expected SequenceShards, got {type(shards).__name__}")
    if layout.q_len != shards.tokens or layout.kv_len != shards.tokens:
        raise ValueError(f"layout: covers {layout.q_len} query x {layout.kv_len} key tokens but the shards "
                         f"{shards.bounds} split a sequence of {shards.tokens}; the ring needs self-attention "
                         "over the sharded sequence (q_len == kv_len == S)")


def ring_plan(layout: BlockSparseLayout, shards: SequenceShards) -> RingPlan:
    """The key runs every rank reads from every shard (cached per layout and shards)."""
    _check_layout(layout, shards)
    return _MEMO.get(layout, ("ring", shards.bounds), lambda: _build_ring_plan(layout, shards))


def _entries(layout: BlockSparseLayout) -> _Entries:
    return _MEMO.get(layout, "entries", lambda: _Entries.of(layout))


def _build_ring_plan(layout: BlockSparseLayout, shards: SequenceShards) -> RingPlan:
    e = _entries(layout)
    runs = []
    for r in range(shards.ranks):
        a, b = shards.range(r)
        reads = torch.maximum(e.q0, torch.tensor(a)) < torch.minimum(e.q1, torch.tensor(b))
        k0, k1 = e.k0[reads], e.k1[reads]
        row = []
        for s in range(shards.ranks):
            c, d = shards.range(s)
            ks, ke = k0.clamp(c, d), k1.clamp(c, d)
            hit = ke > ks
            row.append(_merge(ks[hit], ke[hit]))
        runs.append(tuple(row))
    return RingPlan(shards, tuple(runs))


@dataclass(frozen=True)
class RankPlan:
    """Rank ``rank``'s part of a ring pass.

    Attributes:
        ring: the whole `RingPlan` (what every rank sends to every other).
        rank: this rank.
        parts: per key shard ``s``, the sub-layout over this rank's query tokens x the keys it holds from ``s``
            (its whole own shard for ``s == rank``, else ``ring.runs[rank][s]`` packed), or None when its
            queries read no key of ``s``.
    """

    ring: RingPlan
    rank: int
    parts: Tuple[Optional[BlockSparseLayout], ...]

    def recv(self, source: int) -> KeyRuns:
        """Key runs this rank receives from rank ``source``."""
        return self.ring.runs[self.rank][source]

    def send(self, dest: int) -> KeyRuns:
        """Key runs this rank sends to rank ``dest``."""
        return self.ring.runs[dest][self.rank]


def rank_plan(layout: BlockSparseLayout, shards: SequenceShards, rank: int) -> RankPlan:
    """Rank ``rank``'s sub-layouts and exchanges (cached per layout, shards and rank)."""
    ring = ring_plan(layout, shards)
    if not 0 <= rank < shards.ranks:
        raise ValueError(f"rank: expected 0 <= rank < {shards.ranks} (the number of shards), got {rank}")
    return _MEMO.get(layout, ("rank", shards.bounds, rank), lambda: _build_rank_plan(layout, ring, rank))


def _build_rank_plan(layout: BlockSparseLayout, ring: RingPlan, rank: int) -> RankPlan:
    a, b = ring.shards.range(rank)
    parts = []
    for s in range(ring.shards.ranks):
        if s == rank:
            keys = KeyRuns(torch.tensor([a], dtype=torch.int64), torch.tensor([b], dtype=torch.int64))
        else:
            keys = ring.runs[rank][s]
        parts.append(sub_layout(layout, (a, b), keys, {"key_shard": s}) if ring.runs[rank][s].tokens else None)
    return RankPlan(ring, rank, tuple(parts))


def _kept(sizes: Tensor) -> Tuple[int, int]:
    """``(first, last + 1)`` of the blocks with tokens in any head (sizes ``[heads, n]``)."""
    used = torch.nonzero((sizes > 0).any(0)).flatten()
    return int(used[0]), int(used[-1]) + 1


def sub_layout(layout: BlockSparseLayout, queries: Tuple[int, int], keys: KeyRuns,
               meta: Optional[dict] = None) -> Optional[BlockSparseLayout]:
    """``layout`` restricted to query tokens ``[queries[0], queries[1])`` x the key tokens of ``keys``, packed.

    Query blocks are cut to the range, key blocks to the runs (a key block keeps the tokens of it the runs
    cover, in token order); blocks left empty in every head are dropped, so the result has
    ``queries[1] - queries[0]`` query and ``keys.tokens`` key tokens. Entries whose query or key block is
    left empty are dropped; None when none remains. ``text`` is not carried over (the result is a plain
    block-sparse layout).
    """
    a, b = queries
    e = _entries(layout)
    qo = layout.q_offsets.long().clamp(a, b) - a
    ko = keys.packed(layout.kv_offsets.long())
    q_sizes, k_sizes = qo[:, 1:] - qo[:, :-1], ko[:, 1:] - ko[:, :-1]
    keep = (q_sizes[e.q_head, e.q_block] > 0) & (k_sizes[e.kv_head, e.kv_block] > 0)
    if not bool(keep.any()):
        return None
    qlo, qhi = _kept(q_sizes)
    klo, khi = _kept(k_sizes)
    nq = qhi - qlo
    rows = e.head[keep] * nq + (e.q_block[keep] - qlo)
    counts = torch.bincount(rows, minlength=layout.num_heads * nq)
    flat = torch.zeros(counts.numel() + 1, dtype=torch.int64)
    flat[1:] = torch.cumsum(counts, 0)
    row_ptr = torch.cat([flat[:-1].view(layout.num_heads, nq), flat[nq::nq].view(layout.num_heads, 1)], dim=1)
    i32 = torch.int32
    return BlockSparseLayout(qo[:, qlo:qhi + 1].to(i32).contiguous(), ko[:, klo:khi + 1].to(i32).contiguous(),
                             row_ptr.to(i32).contiguous(), (e.kv_block[keep] - klo).to(i32).contiguous(),
                             {"pattern": "ring part", "of": layout.meta.get("pattern"), "query_tokens": (a, b),
                              **(meta or {})})
