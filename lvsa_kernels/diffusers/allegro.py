"""Allegro (`AllegroTransformer3DModel`): LVSA on the video-only self-attention ``attn1``.

Patches are flattened frame-major; text reaches only ``attn2``. Allegro's 3-D RoPE comes from the pipeline as
per-axis ``(cos, sin)`` tables and integer positions. Calls with a video ``attention_mask`` (a 4-D pixel mask
given to the transformer) are rejected: LVSA attends every video token of the grid.
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

from diffusers.models.attention_processor import AllegroAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb_allegro
from torch import Tensor, nn

from .runtime import LVSAProcessorBase, ModelSpec

__all__ = ["LVSAAllegroAttnProcessor", "ALLEGRO"]


class LVSAAllegroAttnProcessor(LVSAProcessorBase):
    """Replaces `AllegroAttnProcessor2_0` on ``attn1``: projections, Allegro RoPE on ``[B, H, S, D]``, LVSA
    attention, output projection."""

    where = "Allegro attn1"

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None, temb: Optional[Tensor] = None,
                 image_rotary_emb: Optional[Tuple[Any, Tensor]] = None) -> Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(f"LVSA ({self.where}): self-attention without a video mask only; got "
                             "encoder_hidden_states or attention_mask (call disable_lvsa() to run dense)")
        if attn.spatial_norm is not None or attn.group_norm is not None or attn.residual_connection:
            raise ValueError(f"LVSA ({self.where}): attn1 with spatial_norm, group_norm or a residual connection is "
                             "not Allegro's")
        self._geometry(hidden_states.shape[1])
        query, key, value = (proj(hidden_states).unflatten(2, (attn.heads, -1)).transpose(1, 2)
                             for proj in (attn.to_q, attn.to_k, attn.to_v))
        if image_rotary_emb is not None:
            query = apply_rotary_emb_allegro(query, image_rotary_emb[0], image_rotary_emb[1])
            key = apply_rotary_emb_allegro(key, image_rotary_emb[0], image_rotary_emb[1])
        out = self.runtime.video_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                           self.layer)
        out = out.flatten(2, 3).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


def _self_attention(transformer: nn.Module) -> List[Tuple[str, nn.Module]]:
    return [(f"transformer_blocks.{i}.attn1", b.attn1) for i, b in enumerate(transformer.transformer_blocks)]


def _reference_frames(config: Any) -> Tuple[int, str]:
    # config sample_frames is in latent frames (22 for Allegro's 88 video frames)
    return -(-int(config["sample_frames"]) // int(config["patch_size_t"])), "config sample_frames"


ALLEGRO = ModelSpec(
    name="Allegro",
    model="allegro",
    processor_cls=LVSAAllegroAttnProcessor,
    original_processors=(AllegroAttnProcessor2_0,),
    self_attention=_self_attention,
    frame_dim=2,
    patch=lambda config: (int(config["patch_size_t"]), int(config["patch_size"]), int(config["patch_size"])),
    reference_frames=_reference_frames,
    svoo=True,
)
