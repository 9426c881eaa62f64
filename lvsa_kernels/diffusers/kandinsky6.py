"""Kandinsky 6 (`Kandinsky6Transformer3DModel`, text/image to video+audio): LVSA on the video self-attention
``visual_transformer_blocks.*.video_dec_block.self_attention``.

The video tokens come from ``[B, T, H, W, C]`` latents (channels last), patched and flattened frame-major, as in
Kandinsky 5; their self-attention sees neither text nor audio. The audio self-attention, the text
cross-attentions and the audio<->video cross-attentions keep their processors. Image-conditioned calls are
refused: `Kandinsky6TI2VAPipeline` appends the reference image as an extra last frame that reuses temporal
position 0, which the LVSA layout would treat as the video's last frame (only its neighbours would see it).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from diffusers.models.transformers.transformer_kandinsky6 import Kandinsky6AttnProcessor, apply_rotary
from torch import Tensor, nn

from ..models import MODELS
from .geometry import VideoGeometry
from .kandinsky5 import channels_last_grid
from .runtime import LVSAProcessorBase, ModelSpec

__all__ = ["LVSAKandinsky6AttnProcessor", "KANDINSKY6"]


class LVSAKandinsky6AttnProcessor(LVSAProcessorBase):
    """Replaces `Kandinsky6AttnProcessor` on the video ``self_attention``: projections, RMS QK-norm, fp32 RoPE,
    LVSA attention, output layer."""

    where = "Kandinsky 6 video self_attention"

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                 rotary_emb: Optional[Tensor] = None, rotary_emb_kv: Optional[Tensor] = None,
                 attn_mask: Optional[Tensor] = None) -> Tensor:
        if encoder_hidden_states is not None or attn_mask is not None:
            raise ValueError(f"LVSA ({self.where}): self-attention only; got encoder_hidden_states or attn_mask")
        self._geometry(hidden_states.shape[1])
        query, key, value = (proj(hidden_states).unflatten(2, (attn.num_heads, -1))
                             for proj in (attn.to_query, attn.to_key, attn.to_value))
        query, key = attn.query_norm(query), attn.key_norm(key)
        if rotary_emb is not None:
            query = apply_rotary(query, rotary_emb).to(dtype=query.dtype)
        if rotary_emb_kv is not None:
            key = apply_rotary(key, rotary_emb_kv).to(dtype=key.dtype)
        out = self.runtime.video_attention(query, key, value, self.layer)
        return attn.out_layer(out.flatten(-2, -1))


def _geometry(bound: Dict[str, Any], patch: Tuple[int, int, int]) -> VideoGeometry:
    geo = channels_last_grid(bound, patch)
    rope_pos = bound.get("visual_rope_pos")
    if rope_pos is not None and not torch.equal(rope_pos[0].cpu(), torch.arange(geo.frames)):
        raise ValueError("LVSA (Kandinsky 6): visual_rope_pos has temporal positions "
                         f"{rope_pos[0].tolist()}, not 0..{geo.frames - 1}: image-conditioned calls (a reference frame "
                         "appended after the video) are not supported; call disable_lvsa() to run dense")
    return geo


def _self_attention(transformer: nn.Module) -> List[Tuple[str, nn.Module]]:
    return [(f"visual_transformer_blocks.{i}.video_dec_block.self_attention", b.video_dec_block.self_attention)
            for i, b in enumerate(transformer.visual_transformer_blocks)]


KANDINSKY6 = ModelSpec(
    name="Kandinsky 6",
    model="kandinsky6",
    processor_cls=LVSAKandinsky6AttnProcessor,
    original_processors=(Kandinsky6AttnProcessor,),
    self_attention=_self_attention,
    frame_dim=1,
    patch=lambda config: tuple(int(p) for p in config["patch_size"]),
    geometry=_geometry,
    reference_frames=lambda config: (MODELS["kandinsky6"].reference_frames, "Kandinsky 6 default (121 frames)"),
    svoo=True,
)
