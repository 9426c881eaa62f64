"""`AttentionPlan`: what a pattern hands to `block_sparse_attn`.

A plan is a block layout plus, optionally, a token permutation per (batch element, head): SVOO reorders queries
and keys so that clusters are contiguous and plans blocks over the reordered tokens. `block_sparse_attn` owns
the permutation: a backend that reads through it runs the plan directly (Triton's cluster kernel), every other
backend runs the per-batch host layouts on permuted copies, and the output comes back in token order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Hashable, Mapping, Optional, Protocol, Tuple, Union

import torch
from torch import Tensor

from .layout import BlockSparseLayout

__all__ = ["AttentionCall", "AttentionPlan", "BlockMap", "VideoPattern", "inverse_permutation", "permute_tokens",
           "unpermute_tokens"]


@dataclass(frozen=True, eq=False)
class BlockMap:
    """Blocks of every (batch element, head) group over its permuted tokens, on any device.

    Attributes:
        mask: bool ``[B * H, n_q, n_k]``: query block i of group g attends key block j.
        q_sizes: int ``[B * H, n_q]``, k_sizes: int ``[B * H, n_k]``: tokens per block (zero-size allowed).
        batch: B.
        meta: description copied into the host layouts (see `BlockSparseLayout.describe`).
    Nothing here reads the tensors on the host until `layouts` is asked for.
    """

    mask: Tensor
    q_sizes: Tensor
    k_sizes: Tensor
    batch: int
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        G = self.mask.shape[0]
        if self.batch < 1 or G % self.batch:
            raise ValueError(f"mask: {G} groups is not a multiple of batch={self.batch}")

    @property
    def heads(self) -> int:
        return self.mask.shape[0] // self.batch

    @cached_property
    def layouts(self) -> Tuple[BlockSparseLayout, ...]:
        """One per-head variable-block layout per batch element (copied to the host and built once)."""
        H = self.heads
        mask, q_sizes, k_sizes = self.mask.cpu(), self.q_sizes.cpu(), self.k_sizes.cpu()
        return tuple(BlockSparseLayout.from_block_mask(mask[b * H:(b + 1) * H], q_sizes[b * H:(b + 1) * H],
                                                       k_sizes[b * H:(b + 1) * H], self.meta)
                     for b in range(self.batch))


@dataclass(frozen=True, eq=False)
class AttentionPlan:
    """A layout, or per-group blocks over permuted tokens.

    Attributes:
        blocks: a `BlockSparseLayout` (token order, no permutation) or a `BlockMap` (with ``q_perm``/``k_perm``).
        q_perm, k_perm: int64 ``[B, H, S]`` token orders (see `permute_tokens`), or None for a plain layout.
    """

    blocks: Union[BlockSparseLayout, BlockMap]
    q_perm: Optional[Tensor] = None
    k_perm: Optional[Tensor] = None

    def __post_init__(self) -> None:
        permuted = isinstance(self.blocks, BlockMap)
        if permuted != (self.q_perm is not None) or (self.q_perm is None) != (self.k_perm is None):
            raise ValueError("AttentionPlan: a BlockMap needs q_perm and k_perm; a BlockSparseLayout takes neither")

    @property
    def permuted(self) -> bool:
        return self.q_perm is not None

    @property
    def layouts(self) -> Tuple[BlockSparseLayout, ...]:
        """Host layouts: one per batch element for permuted plans, else the single shared layout."""
        return self.blocks.layouts if isinstance(self.blocks, BlockMap) else (self.blocks,)


@dataclass(frozen=True)
class AttentionCall:
    """One self-attention call of a video transformer, as the diffusers runtime describes it to a pattern.

    Attributes:
        frames, tokens_per_frame: the token grid; the video is ``frames * tokens_per_frame`` tokens, frame-major.
        step: 0-based denoising step. layer: 0-based attention layer of the transformer.
        branch: which transformer call of the step this is (CFG branch, expert, batch part); hashable.
        text_tokens: valid text tokens in the sequence; text_position: ``"after"`` or ``"before"`` the video.
        heads: ``(first, total)``: q's heads are global heads ``first..`` of ``total`` (Ulysses), None = all.
        leading_frames: conditioning latent frames the pipeline put before the video (count as first frames).
        causal_block: frames per block of a block-causal frame mask to intersect with (diffusion forcing),
            0 = none.
        backend: the backend the plan will run on (``"auto"`` or a registered name).
    """

    frames: int
    tokens_per_frame: int
    step: int
    layer: int = 0
    branch: Hashable = None
    text_tokens: int = 0
    text_position: str = "after"
    heads: Optional[Tuple[int, int]] = None
    leading_frames: int = 0
    causal_block: int = 0
    backend: str = "auto"


class VideoPattern(Protocol):
    """What the diffusers runtime needs of a pattern (`LVSAPattern` and `SVOOPattern` are ones).

    ``per_layer``: False when a plan depends only on the call's grid, step, text and masks (the runtime then
    plans once per step for every layer, ignoring q, k, layer and branch); True when it is planned per call
    from q and k. ``reset()`` starts a new generation (drops per-generation caches).
    ``plan_call(q, k, call)``: q ``[B, S, H, D]``, k ``[B, S, H_kv, D]`` (None for ``per_layer = False``) ->
    the `AttentionPlan` for `block_sparse_attn`. ``summary(plan)``: what ran and the plan's fields, for the
    runtime's log line. ``cached_densities()`` (``per_layer`` patterns): density per cached plan.
    """

    per_layer: bool

    def reset(self) -> None: ...

    def plan_call(self, q: Optional[Tensor], k: Optional[Tensor], call: AttentionCall) -> AttentionPlan: ...

    def summary(self, plan: AttentionPlan) -> Tuple[str, str]: ...


def permute_tokens(x: Tensor, perm: Tensor) -> Tensor:
    """x ``[B, S, H, D]`` reordered per (b, h): ``out[b, s, h] = x[b, perm[b, h, s], h]`` (perm int64 ``[B, H, S]``).

    Returns a ``[B, S, H, D]`` view of a ``[B, H, S, D]`` buffer (last dim contiguous).
    """
    B, S, H, D = x.shape
    if perm.shape != (B, H, S):
        raise ValueError(f"perm: expected shape {(B, H, S)} for x of shape {tuple(x.shape)}, got {tuple(perm.shape)}")
    rows = x.transpose(1, 2).reshape(B * H * S, D)
    base = torch.arange(B * H, device=x.device).unsqueeze(1) * S
    flat = (perm.to(x.device).reshape(B * H, S) + base).reshape(-1)
    return rows.index_select(0, flat).view(B, H, S, D).transpose(1, 2)


def inverse_permutation(perm: Tensor) -> Tensor:
    """``inv`` with ``inv[..., perm[..., s]] = s`` (perm int64 ``[..., S]``)."""
    return torch.empty_like(perm).scatter_(-1, perm, torch.arange(perm.shape[-1], device=perm.device)
                                           .expand_as(perm).contiguous())


def unpermute_tokens(y: Tensor, perm: Tensor) -> Tensor:
    """Inverse of `permute_tokens`: ``out[b, perm[b, h, s], h] = y[b, s, h]``."""
    return permute_tokens(y, inverse_permutation(perm))
