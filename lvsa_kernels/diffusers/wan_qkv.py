"""Wan self-attention inputs exactly as diffusers' ``WanAttnProcessor`` computes them (pure PyTorch on the
attention module's own layers): used by the LVSA/SVOO processors and by the SVOO profiler."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

__all__ = ["interleaved_rope", "wan_self_attention_qkv"]


def interleaved_rope(x: Tensor, freqs_cos: Tensor, freqs_sin: Tensor) -> Tensor:
    """Wan RoPE on interleaved pairs of ``x [B, S, H, D]``; freqs ``[1, S, 1, D]``."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def wan_self_attention_qkv(attn: nn.Module, hidden_states: Tensor,
                           rotary_emb: Optional[Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tensor, Tensor]:
    """q, k, v ``[B, S, H, D]`` of a Wan ``attn1``: projections (fused or not), RMS norm across heads, head
    split, interleaved RoPE on q and k."""
    if getattr(attn, "fused_projections", False):
        q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    q = attn.norm_q(q).unflatten(2, (attn.heads, -1))
    k = attn.norm_k(k).unflatten(2, (attn.heads, -1))
    v = v.unflatten(2, (attn.heads, -1))
    if rotary_emb is not None:
        q, k = interleaved_rope(q, *rotary_emb), interleaved_rope(k, *rotary_emb)
    return q, k, v
