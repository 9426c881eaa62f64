"""q, k, v of one token stream of a diffusers ``Attention`` module, as the joint-attention processors compute
them: the stream's projections, split into heads, then its QK-norms when the module has them."""
from __future__ import annotations

from typing import Tuple

from torch import Tensor, nn

__all__ = ["heads_qkv", "VIDEO", "TEXT"]

VIDEO = (("to_q", "to_k", "to_v"), ("norm_q", "norm_k"))
TEXT = (("add_q_proj", "add_k_proj", "add_v_proj"), ("norm_added_q", "norm_added_k"))


def heads_qkv(attn: nn.Module, x: Tensor, stream: Tuple[Tuple[str, str, str], Tuple[str, str]] = VIDEO
              ) -> Tuple[Tensor, Tensor, Tensor]:
    """``x [B, S, C]`` -> q, k, v ``[B, S, H, D]`` through ``stream``'s projections (`VIDEO`: ``to_q/k/v``,
    `TEXT`: ``add_q/k/v_proj``) and per-head QK-norms (skipped where the module has None)."""
    (to_q, to_k, to_v), (norm_q, norm_k) = stream
    q, k, v = (getattr(attn, name)(x).unflatten(2, (attn.heads, -1)) for name in (to_q, to_k, to_v))
    if getattr(attn, norm_q) is not None:
        q = getattr(attn, norm_q)(q)
    if getattr(attn, norm_k) is not None:
        k = getattr(attn, norm_k)(k)
    return q, k, v
