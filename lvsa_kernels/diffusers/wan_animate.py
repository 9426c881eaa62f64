"""Wan 2.2 Animate (`WanAnimateTransformer3DModel`): LVSA on the video-only self-attention ``attn1``, as Wan.

Its own copy of the Wan attention classes; ``attn1`` runs over the ``[B, C, T, H, W]`` latents whose frame 0 is
the reference character image (pose latents are added to frames 1..T-1), so the reference is an LVSA first
frame. Text, CLIP image tokens (``attn2``) and the face adapter's motion cross-attention keep their processors.
"""
from __future__ import annotations

from diffusers.models.transformers.transformer_wan_animate import WanAttnProcessor as WanAnimateAttnProcessor

from ..models import MODELS
from .runtime import ModelSpec
from .wan import WAN, LVSAWanAttnProcessor

__all__ = ["WAN_ANIMATE"]

WAN_ANIMATE = ModelSpec(
    name="Wan Animate",
    model="wan_animate",
    processor_cls=LVSAWanAttnProcessor,
    original_processors=(WanAnimateAttnProcessor,),
    self_attention=WAN.self_attention,
    frame_dim=2,
    patch=WAN.patch,
    reference_frames=lambda config: (MODELS["wan_animate"].reference_frames,
                                     "Wan Animate default (77-frame segment + reference frame)"),
    svoo=True,
)
