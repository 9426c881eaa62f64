"""SVOO profiling of a diffusers Wan transformer: dense attention with `keep_ratio_for_mass` recorded per
(step, layer, head) into an `SVOOProfile` (the table lives in `lvsa_kernels.reference.svoo_profile`)."""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..reference.svoo_profile import SVOOProfile, keep_ratio_for_mass
from .wan_qkv import wan_self_attention_qkv

__all__ = ["WanSelfAttnProcessor", "install_wan_processors", "profile_wan", "sdpa_bshd"]


Attend = Callable[[int, Tensor, Tensor, Tensor], Tensor]


class WanSelfAttnProcessor:
    """Processor for diffusers Wan self-attention (``attn1``) with a pluggable attention function.

    Computes q, k, v like diffusers' ``WanAttnProcessor`` (projections, RMSNorm across heads, head split,
    interleaved RoPE) and returns ``to_out(attend(layer, q, k, v))`` with q, k, v, out ``[B, S, H, D]``.
    Self-attention only: encoder states, masks and I2V image K/V raise ValueError.
    """

    def __init__(self, layer: int, attend: Attend) -> None:
        self.layer = layer
        self.attend = attend

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None, rotary_emb=None) -> Tensor:
        if encoder_hidden_states is not None or attention_mask is not None or attn.add_k_proj is not None:
            raise ValueError("WanSelfAttnProcessor: self-attention (attn1) only; got encoder states, a mask or image K/V")
        q, k, v = wan_self_attention_qkv(attn, hidden_states, rotary_emb)
        out = self.attend(self.layer, q, k, v).flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


def sdpa_bshd(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Dense attention on ``[B, S, H, D]`` tensors."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def install_wan_processors(model, attend: Attend) -> Dict[str, object]:
    """Put a `WanSelfAttnProcessor` on every ``blocks.<i>.attn1`` of a diffusers Wan transformer.

    Returns the previous processors (pass them to ``model.set_attn_processor`` to restore).
    """
    previous = dict(model.attn_processors)
    procs = {}
    for name, proc in previous.items():
        parts = name.split(".")
        procs[name] = WanSelfAttnProcessor(int(parts[1]), attend) if parts[2] == "attn1" else proc
    model.set_attn_processor(procs)
    return previous


@torch.no_grad()
def profile_wan(model, latents: Sequence[Tensor], prompt_embeds: Sequence[Tensor], num_steps: int,
                tau: float = 0.95, num_queries: Optional[int] = None) -> SVOOProfile:
    """Profile a diffusers ``WanTransformer3DModel`` with dense attention.

    For every calibration input (initial noise ``latents[i]`` ``[B, C, F, H, W]`` and ``prompt_embeds[i]``
    ``[B, L, text_dim]``) runs ``num_steps`` Euler flow-matching steps (sigma 1 -> 0, timestep = 1000 sigma;
    one conditional forward per step) and records `keep_ratio_for_mass` of every self-attention layer.
    Inputs merge by maximum. Returns the profile (CSV ``Step`` = step index + 1).
    """
    if len(latents) != len(prompt_embeds) or not latents:
        raise ValueError("latents, prompt_embeds: expected the same, non-zero number of calibration inputs")
    if num_steps < 1:
        raise ValueError(f"num_steps: expected >= 1, got {num_steps}")
    layers = len(model.blocks)
    table = torch.zeros(num_steps, layers, model.config.num_attention_heads)
    current = {"step": 0}

    def attend(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        ratios = keep_ratio_for_mass(q, k, tau, num_queries)
        row = table[current["step"], layer]
        torch.maximum(row, ratios, out=row)
        return sdpa_bshd(q, k, v)

    previous = install_wan_processors(model, attend)
    try:
        sigmas = torch.linspace(1.0, 0.0, num_steps + 1)
        for x, emb in zip(latents, prompt_embeds):
            for i in range(num_steps):
                current["step"] = i
                t = (sigmas[i] * 1000).expand(x.shape[0]).to(x.device)
                velocity = model(hidden_states=x, timestep=t, encoder_hidden_states=emb, return_dict=False)[0]
                x = x + (sigmas[i + 1] - sigmas[i]) * velocity
    finally:
        model.set_attn_processor(previous)
    return SVOOProfile(table)

