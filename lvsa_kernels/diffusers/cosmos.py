"""Cosmos 1.0 / Predict 2 / 2.5 (`CosmosTransformer3DModel`): LVSA on the video-only self-attention ``attn1``.

Patches are embedded as ``[B, T, H, W, C]`` and flattened frame-major; ``attn1`` sees only those tokens (text
and, in 2.5, image context reach ``attn2``, which keeps its processor). Channels appended by the pipeline
(condition and padding masks) do not change the grid.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_cosmos import CosmosAttnProcessor2_0
from torch import Tensor, nn

from ..models import MODELS
from .runtime import LVSAProcessorBase, ModelSpec

__all__ = ["LVSACosmosAttnProcessor", "COSMOS"]


class LVSACosmosAttnProcessor(LVSAProcessorBase):
    """Replaces `CosmosAttnProcessor2_0` on ``attn1``: projections, per-head RMS QK-norm, RoPE (real, on
    ``[B, H, S, D]``), LVSA attention, output projection."""

    where = "Cosmos attn1"

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None, image_rotary_emb: Optional[Tensor] = None) -> Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(f"LVSA ({self.where}): self-attention only; got encoder_hidden_states or attention_mask")
        self._geometry(hidden_states.shape[1])
        query, key, value = (proj(hidden_states).unflatten(2, (attn.heads, -1)).transpose(1, 2)
                             for proj in (attn.to_q, attn.to_k, attn.to_v))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, use_real=True, use_real_unbind_dim=-2)
            key = apply_rotary_emb(key, image_rotary_emb, use_real=True, use_real_unbind_dim=-2)
        out = self.runtime.video_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                           self.layer)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def _self_attention(transformer: nn.Module) -> List[Tuple[str, nn.Module]]:
    return [(f"transformer_blocks.{i}.attn1", b.attn1) for i, b in enumerate(transformer.transformer_blocks)]


COSMOS = ModelSpec(
    name="Cosmos",
    model="cosmos",
    processor_cls=LVSACosmosAttnProcessor,
    original_processors=(CosmosAttnProcessor2_0,),
    self_attention=_self_attention,
    frame_dim=2,
    patch=lambda config: tuple(int(p) for p in config["patch_size"]),
    reference_frames=lambda config: (MODELS["cosmos"].reference_frames,
                                     "Cosmos 1.0 default (121 frames, 8x temporal)"),
    svoo=True,
)
