"""`BlockSparseLayout`: the compressed block-index layout that every backend reads.

A layout splits the query sequence (``Sq`` tokens) into ``nQB`` variable-size query blocks and the
key sequence (``Skv`` tokens) into ``nKB`` variable-size key blocks, both given by int32 token
offsets, and lists for every query block the key blocks it attends as a CSR (``row_ptr``,
``col_idx``). The layout is either shared by all attention heads (``num_heads == 1``) or given per
head (``num_heads == H``); per-head layouts may also have per-head block offsets (SVOO clusters).

Units: offsets are in **tokens**; block indices count blocks. For LVSA one block is one latent frame.

A layout is immutable and knows nothing of backends: facts derived from its own arrays (spans, density) are
computed once on the instance; backends and kernels keep what they build from it (schedules, device copies,
FlashInfer plans) in their own `LayoutMemo`, keyed by layout identity, so a layout planned once per denoising
step is shared by every layer without holding any backend state.
"""
from __future__ import annotations

import types
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Hashable, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = ["BlockSparseLayout", "LayoutError", "LayoutMemo", "Spans", "TextBlock"]

_INT = torch.int32


class LayoutError(ValueError):
    """A layout's arrays are inconsistent (raised by `BlockSparseLayout.validate`)."""


@dataclass(frozen=True)
class Spans:
    """Contiguous key runs per (layout head, query block), in token coordinates.

    ``ptr[h, r] : ptr[h, r + 1]`` indexes ``start``/``end`` for query block ``r`` of layout head ``h``;
    a span covers key tokens ``[start, end)``. Consecutive selected key blocks are merged into one span.
    """

    ptr: Tensor    # int32 [Hl, nQB + 1], absolute positions into start/end
    start: Tensor  # int32 [n_spans]
    end: Tensor    # int32 [n_spans]


@dataclass(frozen=True)
class TextBlock:
    """The text tokens of a layout: query block ``q_block`` and key block ``kv_block`` (block indices) hold them."""

    q_block: int
    kv_block: int


def _as_offsets(sizes: Union[Tensor, Sequence[int], Sequence[Sequence[int]]], name: str) -> Tensor:
    try:
        t = torch.as_tensor(sizes).cpu()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise LayoutError(f"{name}: expected integer block sizes, got {sizes!r} ({exc})") from None
    if t.numel() == 0:  # before the dtype check: an empty list converts to float32
        raise LayoutError(f"{name}: expected at least one block, got no block sizes ({sizes!r:.80})")
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise LayoutError(f"{name}: expected integer block sizes, got dtype {t.dtype} ({sizes!r:.80})")
    t = t.to(torch.int64)
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2:
        raise LayoutError(f"{name}: expected [n] or [H, n] block sizes, got shape {tuple(t.shape)}")
    if (t < 0).any():
        raise LayoutError(f"{name}: block sizes must be >= 0")
    off = torch.zeros(t.shape[0], t.shape[1] + 1, dtype=torch.int64)
    off[:, 1:] = torch.cumsum(t, dim=1)
    if off[:, -1].max() >= 2**31:
        raise LayoutError(f"{name}: total length {int(off[:, -1].max())} exceeds int32")
    return off.to(_INT)


@dataclass(frozen=True, eq=False)
class BlockSparseLayout:
    """Block-sparse attention layout (see module docstring).

    Attributes:
        q_offsets:  int32 ``[Ho, nQB + 1]`` query-block token offsets; ``Ho`` is 1 or ``num_heads``.
        kv_offsets: int32 ``[Ho, nKB + 1]`` key-block token offsets.
        row_ptr:    int32 ``[num_heads, nQB + 1]``; row ``r`` of head ``h`` selects
                    ``col_idx[row_ptr[h, r]:row_ptr[h, r + 1]]`` (positions are absolute).
        col_idx:    int32 ``[nnz]`` key-block indices, strictly increasing within a row.
        meta:       free-form description (pattern name, kfi, anchors, ...) used by `describe` only.
        text:       the text block (`TextBlock`) when the pattern planned one, else None.
    """

    q_offsets: Tensor
    kv_offsets: Tensor
    row_ptr: Tensor
    col_idx: Tensor
    meta: Mapping[str, Any] = field(default_factory=dict)
    text: Optional[TextBlock] = None
    _derived: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "meta", types.MappingProxyType(dict(self.meta)))
        self.validate()
        # Plain-int facts, computed once so that call paths (and torch.compile tracing) never read tensors.
        q_sizes = self.block_sizes()[0]
        nonempty = q_sizes[q_sizes > 0]
        self._derived["scalars"] = {
            "q_len": int(self.q_offsets[0, -1]),
            "kv_len": int(self.kv_offsets[0, -1]),
            "computed_pairs": int((q_sizes.expand(self.num_heads, -1) * self.keys_per_block()).sum()),
            "typical_q_block": int(nonempty.median()) if nonempty.numel() else 0,
        }

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_block_mask(
        cls,
        mask: Tensor,
        q_block_sizes: Union[Tensor, Sequence[int], Sequence[Sequence[int]]],
        kv_block_sizes: Union[Tensor, Sequence[int], Sequence[Sequence[int]]],
        meta: Optional[Mapping[str, Any]] = None,
        text: Optional[TextBlock] = None,
    ) -> "BlockSparseLayout":
        """Build from a boolean block mask.

        Args:
            mask: bool ``[nQB, nKB]`` (shared by all heads) or ``[H, nQB, nKB]`` (per head);
                ``mask[.., r, c]`` = query block r attends key block c.
            q_block_sizes: ``[nQB]`` or ``[H, nQB]`` query-block sizes in tokens.
            kv_block_sizes: ``[nKB]`` or ``[H, nKB]`` key-block sizes in tokens.
            meta, text: see the class attributes.
        """
        mask = torch.as_tensor(mask)
        if mask.dtype != torch.bool:
            raise LayoutError(f"mask: expected dtype torch.bool, got {mask.dtype}")
        if mask.dim() == 2:
            mask = mask[None]
        if mask.dim() != 3:
            raise LayoutError(f"mask: expected [nQB, nKB] or [H, nQB, nKB], got shape {tuple(mask.shape)}")
        mask = mask.cpu()
        q_off = _as_offsets(q_block_sizes, "q_block_sizes")
        kv_off = _as_offsets(kv_block_sizes, "kv_block_sizes")
        H, nqb, nkb = mask.shape
        if q_off.shape[1] - 1 != nqb or kv_off.shape[1] - 1 != nkb:
            raise LayoutError(
                f"mask shape {tuple(mask.shape)} does not match {q_off.shape[1] - 1} query blocks "
                f"and {kv_off.shape[1] - 1} key blocks"
            )
        for name, off in (("q_block_sizes", q_off), ("kv_block_sizes", kv_off)):
            if off.shape[0] not in (1, H):
                raise LayoutError(f"{name}: leading dim must be 1 or H={H}, got {off.shape[0]}")
        if H > 1 and q_off.shape[0] != kv_off.shape[0]:
            q_off = q_off.expand(H, -1).contiguous()
            kv_off = kv_off.expand(H, -1).contiguous()
        counts = mask.sum(dim=2).reshape(-1)
        row_ptr = torch.zeros(H * nqb + 1, dtype=torch.int64)
        row_ptr[1:] = torch.cumsum(counts, 0)
        cols = mask.reshape(H * nqb, nkb).nonzero(as_tuple=False)[:, 1]
        # rows of head h are rows h*nqb ... h*nqb + nqb - 1 of the flat CSR; row_ptr[h, nqb] == row_ptr[h+1, 0]
        rp = torch.cat([row_ptr[:-1].view(H, nqb), row_ptr[nqb::nqb].view(H, 1)], dim=1)
        return cls(q_off, kv_off, rp.to(_INT).contiguous(), cols.to(_INT).contiguous(), dict(meta or {}), text)

    @classmethod
    def dense(cls, q_len: int, kv_len: Optional[int] = None) -> "BlockSparseLayout":
        """One query block attending one key block: plain dense attention."""
        kv_len = q_len if kv_len is None else kv_len
        return cls.from_block_mask(torch.ones(1, 1, dtype=torch.bool), [q_len], [kv_len], {"pattern": "dense"})

    # ------------------------------------------------------------------ shape properties
    @property
    def num_heads(self) -> int:
        """1 when the layout is shared by all heads, else the number of attention heads."""
        return self.row_ptr.shape[0]

    @property
    def num_q_blocks(self) -> int:
        return self.row_ptr.shape[1] - 1

    @property
    def num_kv_blocks(self) -> int:
        return self.kv_offsets.shape[1] - 1

    @property
    def q_len(self) -> int:
        """Query sequence length in tokens."""
        return self._derived["scalars"]["q_len"]

    @property
    def kv_len(self) -> int:
        """Key sequence length in tokens."""
        return self._derived["scalars"]["kv_len"]

    @property
    def typical_q_block(self) -> int:
        """Median size of the non-empty query blocks, in tokens (selects the kernel's tuning class)."""
        return self._derived["scalars"]["typical_q_block"]

    @property
    def nnz(self) -> int:
        """Selected (query block, key block) pairs, summed over layout heads."""
        return self.col_idx.numel()

    def _off(self, off: Tensor) -> Tensor:
        return off.expand(self.num_heads, -1)

    # ------------------------------------------------------------------ checks
    def validate(self) -> "BlockSparseLayout":
        """Raise `LayoutError` naming the first inconsistency; return self when valid."""
        for name in ("q_offsets", "kv_offsets", "row_ptr", "col_idx"):
            t = getattr(self, name)
            if not isinstance(t, Tensor) or t.dtype != _INT:
                raise LayoutError(f"{name}: expected an int32 tensor, got {getattr(t, 'dtype', type(t))}")
            if t.device.type != "cpu":
                raise LayoutError(f"{name}: layouts are stored on the CPU (device copies are cached)")
        for name in ("q_offsets", "kv_offsets", "row_ptr"):
            if getattr(self, name).dim() != 2:
                raise LayoutError(f"{name}: expected 2 dims [heads, n + 1], got {tuple(getattr(self, name).shape)}")
        if self.col_idx.dim() != 1:
            raise LayoutError(f"col_idx: expected 1 dim, got {tuple(self.col_idx.shape)}")
        H = self.num_heads
        for name in ("q_offsets", "kv_offsets"):
            off = getattr(self, name)
            if off.shape[0] not in (1, H):
                raise LayoutError(f"{name}: leading dim must be 1 or num_heads={H}, got {off.shape[0]}")
            if off.shape[1] < 2:
                raise LayoutError(f"{name}: needs at least one block (length >= 2)")
            if (off[:, 0] != 0).any():
                raise LayoutError(f"{name}: offsets must start at 0")
            if (off[:, 1:] < off[:, :-1]).any():
                raise LayoutError(f"{name}: offsets must be non-decreasing")
            if (off[:, -1] != off[0, -1]).any():
                raise LayoutError(f"{name}: every head must cover the same number of tokens")
        if self.q_offsets.shape[1] != self.row_ptr.shape[1]:
            raise LayoutError(
                f"row_ptr has {self.row_ptr.shape[1] - 1} rows but q_offsets has {self.q_offsets.shape[1] - 1} blocks"
            )
        rp = self.row_ptr.to(torch.int64)
        if int(rp[0, 0]) != 0:
            raise LayoutError("row_ptr: must start at 0")
        if (rp[:, 1:] < rp[:, :-1]).any():
            raise LayoutError("row_ptr: must be non-decreasing")
        if H > 1 and (rp[1:, 0] != rp[:-1, -1]).any():
            raise LayoutError("row_ptr: head h must start where head h - 1 ends")
        if int(rp[-1, -1]) != self.col_idx.numel():
            raise LayoutError(f"row_ptr ends at {int(rp[-1, -1])} but col_idx has {self.col_idx.numel()} entries")
        if self.col_idx.numel():
            nkb = self.num_kv_blocks
            if int(self.col_idx.min()) < 0 or int(self.col_idx.max()) >= nkb:
                raise LayoutError(f"col_idx: indices must lie in [0, {nkb})")
            first = torch.zeros(self.col_idx.numel(), dtype=torch.bool)
            starts = rp[:, :-1].reshape(-1)
            starts = starts[starts < self.col_idx.numel()]
            first[starts] = True
            c = self.col_idx.to(torch.int64)
            bad = (c[1:] <= c[:-1]) & ~first[1:]
            if bad.any():
                raise LayoutError("col_idx: indices must be strictly increasing (sorted, unique) within each row")
        if self.text is not None and not (0 <= self.text.q_block < self.num_q_blocks
                                          and 0 <= self.text.kv_block < self.num_kv_blocks):
            raise LayoutError(f"text: {self.text} lies outside the {self.num_q_blocks} x {self.num_kv_blocks} blocks")
        return self

    # ------------------------------------------------------------------ conversions
    def to_block_mask(self) -> Tensor:
        """bool ``[num_heads, nQB, nKB]``."""
        H, nqb, nkb = self.num_heads, self.num_q_blocks, self.num_kv_blocks
        rows = self._entry_rows()
        mask = torch.zeros(H * nqb, nkb, dtype=torch.bool)
        mask[rows, self.col_idx.long()] = True
        return mask.view(H, nqb, nkb)

    def to_token_mask(self, max_elements: int = 1 << 26) -> Tensor:
        """bool ``[num_heads, Sq, Skv]`` token mask. O(S^2): for tests on small sizes only."""
        H, sq, skv = self.num_heads, self.q_len, self.kv_len
        if H * sq * skv > max_elements:
            raise ValueError(f"to_token_mask: {H}x{sq}x{skv} elements exceeds max_elements={max_elements}")
        bm = self.to_block_mask()
        qb = self.token_to_block(self._off(self.q_offsets))    # [H, Sq]
        kb = self.token_to_block(self._off(self.kv_offsets))   # [H, Skv]
        h = torch.arange(H)[:, None, None]
        return bm[h, qb[:, :, None], kb[:, None, :]]

    @staticmethod
    def token_to_block(offsets: Tensor) -> Tensor:
        """int64 ``[H, S]`` block index of every token, from offsets ``[H, n + 1]``."""
        sizes = (offsets[:, 1:] - offsets[:, :-1]).long()
        n = sizes.shape[1]
        return torch.stack([torch.repeat_interleave(torch.arange(n), s) for s in sizes])

    def block_sizes(self) -> Tuple[Tensor, Tensor]:
        """int64 query- and key-block sizes, ``[Ho, nQB]`` and ``[Ho, nKB]``."""
        q, k = self.q_offsets.long(), self.kv_offsets.long()
        return q[:, 1:] - q[:, :-1], k[:, 1:] - k[:, :-1]

    # ------------------------------------------------------------------ derived, cached
    def _entry_rows(self) -> Tensor:
        """int64 ``[nnz]`` flat row id (head * nQB + query block) of every CSR entry."""
        key = "entry_rows"
        if key not in self._derived:
            rp = self.row_ptr.long()
            starts = torch.cat([rp[:, :-1].reshape(-1), rp[-1:, -1]])
            counts = starts[1:] - starts[:-1]
            self._derived[key] = torch.repeat_interleave(torch.arange(counts.numel()), counts)
        return self._derived[key]

    @property
    def spans(self) -> Spans:
        """Merged contiguous key spans per (layout head, query block); see `Spans`."""
        key = "spans"
        if key not in self._derived:
            self._derived[key] = self._build_spans()
        return self._derived[key]

    def _build_spans(self) -> Spans:
        H, nqb = self.num_heads, self.num_q_blocks
        rows = self._entry_rows()
        cols = self.col_idx.long()
        kv_off = self._off(self.kv_offsets).long()
        head = rows // nqb
        start, end = kv_off[head, cols], kv_off[head, cols + 1]
        keep = end > start  # empty key blocks contribute nothing
        rows, start, end = rows[keep], start[keep], end[keep]
        n = rows.numel()
        # a span continues while the next selected block starts where the previous one ended
        # (this also merges across unselected empty blocks)
        is_new = torch.ones(n, dtype=torch.bool)
        if n > 1:
            is_new[1:] = (rows[1:] != rows[:-1]) | (start[1:] != end[:-1])
        is_last = torch.ones(n, dtype=torch.bool)
        if n > 1:
            is_last[:-1] = is_new[1:]
        span_rows = rows[is_new]
        start, end = start[is_new], end[is_last]
        counts = torch.bincount(span_rows, minlength=H * nqb)
        ptr = torch.zeros(H * nqb + 1, dtype=torch.int64)
        ptr[1:] = torch.cumsum(counts, 0)
        ptr2 = torch.cat([ptr[:-1].view(H, nqb), ptr[nqb::nqb].view(H, 1)], dim=1)
        return Spans(ptr2.to(_INT), start.to(_INT), end.to(_INT))

    def keys_per_block(self) -> Tensor:
        """int64 ``[num_heads, nQB]``: key tokens attended by each query block."""
        sp = self.spans
        lens = (sp.end - sp.start).long()
        csum = torch.zeros(lens.numel() + 1, dtype=torch.int64)
        csum[1:] = torch.cumsum(lens, 0)
        p = sp.ptr.long()
        return csum[p[:, 1:]] - csum[p[:, :-1]]

    @property
    def computed_pairs(self) -> int:
        """Number of (query token, key token) pairs computed, summed over layout heads."""
        return self._derived["scalars"]["computed_pairs"]

    @property
    def density(self) -> float:
        """Fraction of token pairs computed: ``computed_pairs / (num_heads * Sq * Skv)``."""
        total = self.num_heads * self.q_len * self.kv_len
        return self.computed_pairs / total if total else 0.0

    @property
    def is_dense(self) -> bool:
        """True when every query token attends every key token (dense SDPA computes the same thing)."""
        return self.computed_pairs == self.num_heads * self.q_len * self.kv_len

    # ------------------------------------------------------------------ display
    def __repr__(self) -> str:
        qs, ks = self.block_sizes()
        kind = "shared" if self.num_heads == 1 else f"per-head x{self.num_heads}"
        return (
            f"BlockSparseLayout(q_len={self.q_len}, kv_len={self.kv_len}, q_blocks={self.num_q_blocks}, "
            f"kv_blocks={self.num_kv_blocks}, nnz={self.nnz}, spans={self.spans.start.numel()}, "
            f"density={self.density:.4f}, heads={kind}, "
            f"q_block_sizes={_size_summary(qs)}, kv_block_sizes={_size_summary(ks)})"
        )

    def describe(self, max_blocks: int = 160, head: int = 0) -> str:
        """Human-readable summary; adds an ASCII block map when the layout has at most ``max_blocks`` blocks.

        Map characters: ``G`` global anchor column, ``W`` other selected (window) block, ``T`` text block,
        ``.`` skipped. Rows are query blocks, columns key blocks.
        """
        lines = [repr(self)]
        for k, v in self.meta.items():
            lines.append(f"  {k}: {v}")
        if max(self.num_q_blocks, self.num_kv_blocks) <= max_blocks:
            bm = self.to_block_mask()[head]
            globals_ = set(self.meta.get("global_kv_blocks", ()))
            text_q = {self.text.q_block} if self.text else set()
            text_k = {self.text.kv_block} if self.text else set()
            lines.append(f"  block map (head {head}; rows = query blocks, columns = key blocks):")
            for r in range(bm.shape[0]):
                chars = []
                for c in range(bm.shape[1]):
                    if not bm[r, c]:
                        chars.append(".")
                    elif c in text_k or r in text_q:
                        chars.append("T")
                    elif c in globals_:
                        chars.append("G")
                    else:
                        chars.append("W")
                lines.append(f"  {r:4d} {''.join(chars)}")
        return "\n".join(lines)


def _size_summary(sizes: Tensor) -> str:
    u = torch.unique(sizes)
    if u.numel() <= 3:
        return "{" + ",".join(str(int(x)) for x in u) + "}"
    return f"[{int(u.min())}..{int(u.max())}]"


class LayoutMemo:
    """Values one consumer (a backend, a kernel's scheduler) derives from layouts, keyed by layout identity.

    A layout's values are dropped when the layout is garbage-collected (weak reference) and, beyond
    ``max_layouts`` layouts, least recently used first (values may hold the layout alive, e.g. a closure).
    """

    def __init__(self, max_layouts: int = 64) -> None:
        self.max_layouts = max_layouts
        self._entries: "OrderedDict[int, Tuple[weakref.ref, Dict[Hashable, Any]]]" = OrderedDict()

    def _values(self, layout: BlockSparseLayout) -> Optional[Dict[Hashable, Any]]:
        entry = self._entries.get(id(layout))
        if entry is None or entry[0]() is not layout:
            return None
        self._entries.move_to_end(id(layout))
        return entry[1]

    def get(self, layout: BlockSparseLayout, key: Hashable, build: Callable[[], Any]) -> Any:
        """The value of ``key`` for ``layout``; ``build()`` it on first use."""
        values = self._values(layout)
        if values is None:
            values, ident, entries = {}, id(layout), self._entries
            entries[ident] = (weakref.ref(layout, lambda _, ident=ident: entries.pop(ident, None)), values)
            while len(entries) > self.max_layouts:
                entries.popitem(last=False)
        if key not in values:
            values[key] = build()
        return values[key]

    def peek(self, layout: BlockSparseLayout, key: Hashable) -> Any:
        """What `get` stored for ``layout`` and ``key``, or None (never builds; safe inside torch.compile tracing)."""
        values = self._values(layout)
        return None if values is None else values.get(key)

    def __len__(self) -> int:
        return len(self._entries)
