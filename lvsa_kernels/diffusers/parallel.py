"""Context parallelism for the LVSA processors under diffusers' ``enable_parallelism``: Ulysses, ring, or both.

diffusers splits the token sequence over its flattened ``(ring, ulysses)`` mesh before the first block and
gathers it after ``proj_out``: flat rank ``f = ring_rank * U + ulysses_rank`` holds the f-th piece (equal
pieces; ``ring_anything`` cuts them as ``torch.tensor_split`` does). Each LVSA processor then sees its piece
with all heads. With Ulysses (degree U) an all-to-all within the rank's Ulysses group turns the U pieces of
its ring shard into the whole ring shard for ``H / U`` heads; with ring attention (degree R) the layout-aware
ring (`lvsa_kernels.ring`) attends that shard against the keys the global layout makes it read on the other
R - 1 ring ranks of its ring group (same Ulysses rank, so the same heads); a second all-to-all returns the
piece with all heads. Ulysses alone: R = 1; ring alone: U = 1; both: USP. The layout is planned from the
global geometry, identical to one GPU. "Ulysses anything", per-call patterns (SVOO) under ring attention and
joint text+video attention under context parallelism raise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..ring import SequenceShards
from .geometry import VideoGeometry

__all__ = ["ContextGroups", "RingGroup", "UlyssesGroup", "context_groups", "seq_to_heads", "heads_to_seq"]


@dataclass(frozen=True)
class UlyssesGroup:
    """The Ulysses process group of one transformer call.

    Attributes:
        group: the process group of diffusers' ``ulysses`` mesh dimension.
        degree: N, the number of ranks sharing the sequence.
    """

    group: Any
    degree: int

    @property
    def rank(self) -> int:
        """This process's rank in the group (rank r holds heads ``[r*H/N, (r+1)*H/N)`` after `seq_to_heads`)."""
        return dist.get_rank(self.group)


@dataclass(frozen=True)
class RingGroup:
    """The ring process group of one transformer call (diffusers' ``ring`` mesh dimension).

    Attributes:
        group: the process group of the ranks with this rank's Ulysses rank (they hold the same heads).
        degree: R, the number of ring shards.
    """

    group: Any
    degree: int

    @property
    def rank(self) -> int:
        """This process's rank in the ring: it holds ring shard ``rank`` of the sequence."""
        return dist.get_rank(self.group)

    def shards(self, tokens: int) -> SequenceShards:
        """The R ring shards of a ``tokens``-long sequence (``torch.tensor_split`` order, as diffusers splits)."""
        return SequenceShards.split(tokens, self.degree)


@dataclass(frozen=True)
class ContextGroups:
    """Context parallelism of one transformer call: Ulysses, ring, or both (at least one is set)."""

    ulysses: Optional[UlyssesGroup]
    ring: Optional[RingGroup]

    @property
    def degree(self) -> int:
        """Ranks the sequence is split over (``U * R``)."""
        return (self.ulysses.degree if self.ulysses else 1) * (self.ring.degree if self.ring else 1)

    @property
    def rank(self) -> int:
        """This process's piece of diffusers' split: ``ring_rank * U + ulysses_rank``."""
        u = self.ulysses.degree if self.ulysses else 1
        return (self.ring.rank if self.ring else 0) * u + (self.ulysses.rank if self.ulysses else 0)


def context_groups(parallel_config: Any, heads: int, geometry: VideoGeometry, where: str,
                   supported: bool = True, per_call_pattern: bool = False) -> Optional[ContextGroups]:
    """The context-parallel groups of a transformer's diffusers ``_parallel_config``, or None without them.

    Args:
        parallel_config: ``transformer._parallel_config`` (a diffusers ``ParallelConfig``) or None.
        heads: attention heads of the transformer (must be divisible by ``ulysses_degree``).
        geometry: the global video geometry of the call (``T * P`` must be divisible by
            ``ulysses_degree * ring_degree``, except with ``ring_anything``, whose shards may differ by a token).
        where: model name used in messages.
        supported: False for models whose LVSA processor cannot run under context parallelism.
        per_call_pattern: True when the pattern plans per call from q and k (SVOO): not under ring attention.

    Raises:
        ValueError / NotImplementedError with the reason for uneven "Ulysses anything", per-call patterns under
        ring attention, unsupported models, heads or video tokens not divisible by the degrees.
    """
    cp = getattr(parallel_config, "context_parallel_config", None)
    if cp is None:
        return None
    if not supported:
        raise NotImplementedError(
            f"LVSA ({where}): diffusers context parallelism is supported for Wan only (its self-attention is "
            "video-only); call disable_lvsa() or run without enable_parallelism()"
        )
    u, r = int(cp.ulysses_degree), int(cp.ring_degree)
    if r > 1 and per_call_pattern:
        raise NotImplementedError(
            f"LVSA ({where}): ring attention (ContextParallelConfig ring_degree={r}) needs a layout planned from the "
            "geometry (LVSAPattern); SVOO plans each call from the full q and k, which no ring rank holds. Use "
            "Ulysses, ContextParallelConfig(ulysses_degree=N), for SVOO"
        )
    if cp.ulysses_anything:
        raise NotImplementedError(
            f"LVSA ({where}): ContextParallelConfig(ulysses_anything=True) (uneven shards) is not supported; "
            "use ulysses_anything=False with heads and T*P divisible by ulysses_degree, or ring attention "
            "(ring_degree=N, ring_anything=True handles uneven shards)"
        )
    if heads % u:
        raise ValueError(
            f"LVSA ({where}): {heads} attention heads are not divisible by ulysses_degree={u}; Ulysses gives "
            "each rank heads / ulysses_degree heads"
        )
    if geometry.video_tokens % (u * r) and not cp.ring_anything:
        ranks = (f"ulysses_degree={u}" if r == 1 else f"ring_degree={r}" if u == 1
                 else f"ulysses_degree * ring_degree = {u}*{r} = {u * r}")
        raise ValueError(
            f"LVSA ({where}): T*P = {geometry.frames}*{geometry.tokens_per_frame} = {geometry.video_tokens} video "
            f"tokens are not divisible by {ranks}; choose a frame count or resolution that is"
            + ("" if u > 1 else ", or ContextParallelConfig(ring_anything=True) for uneven shards")
        )
    return ContextGroups(UlyssesGroup(cp._ulysses_mesh.get_group(), u) if u > 1 else None,
                         RingGroup(cp._ring_mesh.get_group(), r) if r > 1 else None)


def _check(x: Tensor, dim: int, degree: int, name: str, expected: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D tensor {expected}, got shape {tuple(x.shape)}")
    if x.shape[dim] % degree:
        raise ValueError(f"{name}: dim {dim} of {expected} = {x.shape[dim]} is not divisible by the Ulysses "
                         f"degree {degree}; got shape {tuple(x.shape)}")


def _all_to_all(chunks: Tensor, ug: UlyssesGroup) -> Tensor:
    """Chunk j of ``chunks [N, ...]`` goes to rank j; returns the chunks received, indexed by source rank."""
    out = torch.empty_like(chunks)
    dist.all_to_all_single(out, chunks, group=ug.group)
    return out


def seq_to_heads(xs: Sequence[Tensor], ug: UlyssesGroup, name: str = "x") -> List[Tensor]:
    """``[B, S/N, H, D]`` sequence shards, all heads -> ``[B, S, H/N, D]`` full sequence, this rank's heads.

    Rank r receives heads ``[r*H/N, (r+1)*H/N)``; the sequence is in rank order (diffusers' equal split).
    Tensors of one shape and dtype (q, k, v without GQA) travel in one all-to-all.
    """
    for x in xs:
        _check(x, 2, ug.degree, name, "[B, S/N, H, D]")
    if any(x.shape != xs[0].shape or x.dtype != xs[0].dtype for x in xs):
        return [seq_to_heads([x], ug, name)[0] for x in xs]
    b, s, h, d = xs[0].shape
    n, m = ug.degree, len(xs)
    chunks = xs[0].new_empty(n, m * b, s, h // n, d)
    for i, x in enumerate(xs):  # chunk j = head group j of every tensor
        chunks[:, i * b:(i + 1) * b].copy_(x.reshape(b, s, n, h // n, d).permute(2, 0, 1, 3, 4))
    got = _all_to_all(chunks, ug)  # [N (seq shard), m*B, S/N, H/N, D]
    return list(got.transpose(0, 1).reshape(m * b, n * s, h // n, d).chunk(m))


def heads_to_seq(x: Tensor, ug: UlyssesGroup, name: str = "out") -> Tensor:
    """``[B, S, H/N, D]`` full sequence, this rank's heads -> ``[B, S/N, H, D]`` sequence shard, all heads
    (the inverse of `seq_to_heads`)."""
    _check(x, 1, ug.degree, name, "[B, S, H/N, D]")
    b, s, h, d = x.shape
    n = ug.degree
    chunks = x.reshape(b, n, s // n, h, d).transpose(0, 1).contiguous()  # [N (seq shard), B, S/N, H/N, D]
    got = _all_to_all(chunks, ug)                                        # [N (head group), B, S/N, H/N, D]
    return got.permute(1, 2, 0, 3, 4).reshape(b, s // n, n * h, d)
