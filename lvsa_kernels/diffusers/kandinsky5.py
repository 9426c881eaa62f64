"""Kandinsky 5 (`Kandinsky5Transformer3DModel`): LVSA on the visual self-attention of the decoder blocks.

The visual tokens come from ``[B, T, H, W, C]`` latents (channels last), patched and flattened frame-major;
their self-attention sees no text (text reaches the visual tokens through ``cross_attention``; the text encoder
blocks' own self-attention is untouched). Kandinsky's own NABLA sparse attention (``sparse_params``, configs with
``attention_type="nabla"``, which also reorder tokens within frames) is refused: LVSA replaces dense attention.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from diffusers.models.transformers.transformer_kandinsky import Kandinsky5AttnProcessor
from torch import Tensor, nn

from ..models import MODELS
from .geometry import VideoGeometry
from .runtime import LVSAProcessorBase, ModelSpec

__all__ = ["LVSAKandinsky5AttnProcessor", "KANDINSKY5"]


def kandinsky_rope(x: Tensor, rope: Tensor) -> Tensor:
    """Kandinsky 5's RoPE on ``x [B, S, H, D]`` with its ``[B, S, 1, D/2, 2, 2]`` rotation matrices (rounded through
    bfloat16, as diffusers does)."""
    pairs = x.reshape(*x.shape[:-1], -1, 1, 2).to(torch.float32)
    return (rope * pairs).sum(dim=-1).reshape(*x.shape).to(torch.bfloat16).type_as(x)


class LVSAKandinsky5AttnProcessor(LVSAProcessorBase):
    """Replaces `Kandinsky5AttnProcessor` on the visual ``self_attention``: projections, fp32 RMS QK-norm,
    RoPE, LVSA attention, output layer."""

    where = "Kandinsky 5 self_attention"

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                 rotary_emb: Optional[Tensor] = None, sparse_params: Optional[Dict[str, Any]] = None) -> Tensor:
        if encoder_hidden_states is not None:
            raise ValueError(f"LVSA ({self.where}): self-attention only; got encoder_hidden_states")
        if sparse_params is not None:
            raise ValueError(f"LVSA ({self.where}): sparse_params (Kandinsky's NABLA sparse attention) cannot be "
                             "combined with LVSA; use a config with attention_type='regular', or disable_lvsa()")
        self._geometry(hidden_states.shape[1])
        query, key, value = (proj(hidden_states).unflatten(2, (attn.num_heads, -1))
                             for proj in (attn.to_query, attn.to_key, attn.to_value))
        query = attn.query_norm(query.float()).type_as(query)
        key = attn.key_norm(key.float()).type_as(key)
        if rotary_emb is not None:
            query, key = kandinsky_rope(query, rotary_emb), kandinsky_rope(key, rotary_emb)
        out = self.runtime.video_attention(query, key, value, self.layer)
        return attn.out_layer(out.flatten(-2, -1))


def channels_last_grid(bound: Dict[str, Any], patch: Tuple[int, int, int]) -> VideoGeometry:
    """Token grid of ``hidden_states [B, T, H, W, C]`` (channels last) patched by ``patch`` ``(p_t, p_h, p_w)``."""
    latents = bound["hidden_states"]
    if not isinstance(latents, Tensor) or latents.dim() != 5:
        raise ValueError(f"LVSA (Kandinsky 5): hidden_states: expected [B, T, H, W, C] latents, got "
                         f"{tuple(getattr(latents, 'shape', ()))}")
    geo = VideoGeometry(*(int(n) // int(p) for n, p in zip(latents.shape[1:4], patch)))
    if min(geo.frames, geo.height, geo.width) < 1:
        raise ValueError(f"LVSA (Kandinsky 5): hidden_states: latent size {tuple(latents.shape[1:4])} is smaller than "
                         f"the patch {tuple(patch)}")
    return geo


def _self_attention(transformer: nn.Module) -> List[Tuple[str, nn.Module]]:
    return [(f"visual_transformer_blocks.{i}.self_attention", b.self_attention)
            for i, b in enumerate(transformer.visual_transformer_blocks)]


def _patch(config: Any) -> Tuple[int, int, int]:
    return tuple(int(p) for p in config["patch_size"])


KANDINSKY5 = ModelSpec(
    name="Kandinsky 5",
    model="kandinsky5",
    processor_cls=LVSAKandinsky5AttnProcessor,
    original_processors=(Kandinsky5AttnProcessor,),
    self_attention=_self_attention,
    frame_dim=1,
    patch=_patch,
    geometry=channels_last_grid,
    reference_frames=lambda config: (MODELS["kandinsky5"].reference_frames,
                                     "Kandinsky 5 Video Lite default (121 frames)"),
    svoo=True,
)
