"""Layout-aware ring attention over a process group (pure ``torch.distributed``, any `block_sparse_attn` backend).

Rank ``r`` of the group holds shard ``r`` of q, k and v (`SequenceShards`). Its queries attend its own keys
and, from every other rank ``s``, only the key tokens the global layout makes them read (`RankPlan`): rank
``s`` packs those tokens of k and v into one buffer and sends it; a rank whose queries read nothing of ``s``
receives nothing from it. The exchange runs in ``R - 1`` rounds (round ``i``: send to ``r + i``, receive from
``r - i``), each posted before the previous round's part is computed, so at most two received buffers are
alive: memory per rank is O(its shard + the largest two parts it reads). Each part runs `block_sparse_attn`
on its cached sub-layout with ``return_lse=True`` and the parts are merged by their lse in float32.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor

from ..api import block_sparse_attn
from ..reference.layout import BlockSparseLayout
from .plan import KeyRuns, SequenceShards, rank_plan

__all__ = ["TrafficCounter", "merge_partial", "ring_attention"]

_READY: "weakref.WeakSet" = weakref.WeakSet()  # groups a collective has set up (batched p2p may then skip ranks)


@dataclass
class TrafficCounter:
    """Key/value bytes this rank sent through `ring_attention`, and what a dense ring would have sent
    (its whole shard to each of the ``R - 1`` other ranks), summed over calls."""

    sent_bytes: int = 0
    dense_bytes: int = 0
    calls: int = 0

    @property
    def ratio(self) -> float:
        """``sent_bytes / dense_bytes`` (0 before any traffic a dense ring would have had)."""
        return self.sent_bytes / self.dense_bytes if self.dense_bytes else 0.0


def merge_partial(out: Tensor, lse: Tensor, part_out: Tensor, part_lse: Tensor) -> None:
    """Fold one part into the running result, in place: ``out [B, S, H, D]`` float32 and ``lse [B, H, S]``
    float32 become the attention over the union of their keys and the part's (``part_out`` any float dtype,
    ``part_lse [B, H, S]``). Rows without keys on both sides stay 0 with lse -inf."""
    part_lse = part_lse.float()
    total = torch.logaddexp(lse, part_lse)
    none = torch.isneginf(total)
    w_old = torch.where(none, 0.0, torch.exp(lse - total)).transpose(1, 2).unsqueeze(-1)
    w_new = torch.where(none, 0.0, torch.exp(part_lse - total)).transpose(1, 2).unsqueeze(-1)
    out.mul_(w_old).add_(part_out.float() * w_new)
    lse.copy_(total)


def _check(q: Tensor, k: Tensor, v: Tensor, shards: SequenceShards, rank: int, world: int) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor [B, S_r, H, D] (this rank's shard), "
                             f"got {getattr(t, 'shape', type(t).__name__)}")
    if shards.ranks != world:
        raise ValueError(f"shards: {shards.ranks} shards {shards.bounds} for a process group of {world} ranks")
    n = shards.size(rank)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.shape[1] != n:
            raise ValueError(f"{name}: rank {rank} holds shard {shards.range(rank)} of {n} tokens but {name} has "
                             f"S_r={t.shape[1]} (shape {tuple(t.shape)}); shard sizes {_sizes(shards)}")


def _sizes(shards: SequenceShards) -> List[int]:
    return [shards.size(r) for r in range(shards.ranks)]


def _pack(k: Tensor, v: Tensor, runs: KeyRuns, origin: int) -> Tensor:
    """``[2, B, n, H_kv, D]``: the tokens of ``runs`` (absolute) of this rank's k and v (shard starting at
    ``origin``), contiguous for one send."""
    idx = runs.index(origin).to(k.device)
    buf = k.new_empty((2, k.shape[0], idx.numel()) + tuple(k.shape[2:]))
    torch.index_select(k, 1, idx, out=buf[0])
    torch.index_select(v, 1, idx, out=buf[1])
    return buf


def _ensure_ready(group, device: torch.device) -> None:
    """One collective on a new group before its first p2p batch: NCCL's batched p2p may then leave ranks out."""
    group = dist.group.WORLD if group is None else group
    if group not in _READY:
        dist.all_reduce(torch.zeros(1, device=device), group=group)
        _READY.add(group)


def ring_attention(q: Tensor, k: Tensor, v: Tensor, layout: BlockSparseLayout, group, shards: SequenceShards, *,
                   backend: str = "auto", scale: Optional[float] = None, return_lse: bool = False,
                   precision: str = "exact", counter: Optional[TrafficCounter] = None
                   ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """This rank's rows of ``block_sparse_attn`` over the sharded sequence, exchanging only the keys it reads.

    Args:
        q: ``[B, S_r, H, D]``; k, v: ``[B, S_r, H_kv, D]``: shard ``r = dist.get_rank(group)`` of the sequence
            (tokens ``shards.range(r)``).
        layout: the global `BlockSparseLayout` over ``S x S`` tokens (1 or H heads), the same on every rank.
        group: the ring's process group (None: the default group); its size must be ``shards.ranks``.
        shards: the token shards of the ranks, in group-rank order (uneven sizes allowed).
        backend, scale, precision: as in `block_sparse_attn` (every part uses the same scale, default
            ``1/sqrt(D)``).
        return_lse: also return lse ``[B, H, S_r]`` (float32; -inf for rows without keys).
        counter: a `TrafficCounter` to add this call's sent and dense-ring bytes to.

    Returns:
        ``out [B, S_r, H, D]`` in q's dtype (0 for rows without keys), or ``(out, lse)``.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    _check(q, k, v, shards, rank, world)
    plan = rank_plan(layout, shards, rank)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    B, n, H, _ = q.shape
    per_token = 2 * B * k.shape[2] * k.shape[3] * k.element_size()  # bytes of one token of k and v
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full((B, H, n), float("-inf"), dtype=torch.float32, device=q.device)
    origin = shards.range(rank)[0]

    def attend(kk: Tensor, vv: Tensor, part: BlockSparseLayout) -> None:
        o, l = block_sparse_attn(q, kk, vv, part, backend=backend, scale=scale, return_lse=True,
                                 precision=precision)
        merge_partial(out, lse, o, l)

    def post(i: int):
        """Round ``i``'s send and receive as ``(source, receive buffer or None, works, bytes sent)``; None when
        this rank neither sends nor receives in it."""
        dst, src = (rank + i) % world, (rank - i) % world
        send, recv = plan.send(dst), plan.recv(src)
        ops, buf = [], None
        if send.tokens:
            ops.append(dist.P2POp(dist.isend, _pack(k, v, send, origin), group=group, group_peer=dst))
        if recv.tokens:
            buf = k.new_empty((2, B, recv.tokens) + tuple(k.shape[2:]))
            ops.append(dist.P2POp(dist.irecv, buf, group=group, group_peer=src))
        if not ops:
            return None
        return src, buf, dist.batch_isend_irecv(ops), send.tokens * per_token

    if world > 1:
        _ensure_ready(group, q.device)
    pending = post(1) if world > 1 else None
    if plan.parts[rank] is not None:
        attend(k, v, plan.parts[rank])
    sent = 0
    for i in range(1, world):
        current = pending
        if current is not None:
            for work in current[2]:
                work.wait()
        pending = post(i + 1) if i + 1 < world else None
        if current is not None:
            src, buf, _, sent_bytes = current
            sent += sent_bytes
            if buf is not None:
                attend(buf[0], buf[1], plan.parts[src])
    if counter is not None:
        counter.sent_bytes += sent
        counter.dense_bytes += (world - 1) * n * per_token
        counter.calls += 1
    result = out.to(q.dtype)
    return (result, lse) if return_lse else result
