"""Ulysses context parallelism for the LVSA processors under diffusers' ``enable_parallelism``.

With ``transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))`` diffusers splits
the token sequence over N ranks before the first block and gathers it after ``proj_out``; each LVSA
processor then sees ``S / N`` tokens with all heads. An all-to-all turns that into the full sequence for
``H / N`` heads, attention runs with the layout planned from the global geometry (identical to one GPU,
whatever N is), and a second all-to-all returns ``S / N`` tokens with all heads. Ring attention, "Ulysses
anything" (uneven shards) and joint text+video attention under context parallelism raise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .geometry import VideoGeometry

__all__ = ["UlyssesGroup", "ulysses_group", "seq_to_heads", "heads_to_seq"]


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


def ulysses_group(parallel_config: Any, heads: int, geometry: VideoGeometry, where: str,
                  supported: bool = True) -> Optional[UlyssesGroup]:
    """The Ulysses group of a transformer's diffusers ``_parallel_config``, or None without context parallelism.

    Args:
        parallel_config: ``transformer._parallel_config`` (a diffusers ``ParallelConfig``) or None.
        heads: attention heads of the transformer (must be divisible by the degree).
        geometry: the global video geometry of the call (``T * P`` must be divisible by the degree).
        where: model name used in messages.
        supported: False for models whose LVSA processor cannot run under context parallelism.

    Raises:
        ValueError / NotImplementedError with the reason for ring attention, uneven "anything" modes,
        unsupported models, heads or video tokens not divisible by the degree.
    """
    cp = getattr(parallel_config, "context_parallel_config", None)
    if cp is None:
        return None
    if not supported:
        raise NotImplementedError(
            f"LVSA ({where}): diffusers context parallelism is supported for Wan only (its self-attention is "
            "video-only); call disable_lvsa() or run without enable_parallelism()"
        )
    if cp.ring_degree > 1:
        raise NotImplementedError(
            f"LVSA ({where}): ring attention (ContextParallelConfig ring_degree={cp.ring_degree}) is not supported; "
            "use Ulysses, ContextParallelConfig(ulysses_degree=N), which gives each rank the full sequence so "
            "the LVSA layout is the same as on one GPU"
        )
    if cp.ulysses_anything:
        raise NotImplementedError(
            f"LVSA ({where}): ContextParallelConfig(ulysses_anything=True) (uneven shards) is not supported; "
            "use ulysses_anything=False with heads and T*P divisible by ulysses_degree"
        )
    degree = int(cp.ulysses_degree)
    if heads % degree:
        raise ValueError(
            f"LVSA ({where}): {heads} attention heads are not divisible by ulysses_degree={degree}; Ulysses gives "
            "each rank heads / ulysses_degree heads"
        )
    if geometry.video_tokens % degree:
        raise ValueError(
            f"LVSA ({where}): T*P = {geometry.frames}*{geometry.tokens_per_frame} = {geometry.video_tokens} video "
            f"tokens are not divisible by ulysses_degree={degree}; choose a frame count or resolution that is"
        )
    return UlyssesGroup(cp._ulysses_mesh.get_group(), degree)


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
