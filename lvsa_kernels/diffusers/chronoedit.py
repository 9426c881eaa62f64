"""ChronoEdit (`ChronoEditTransformer3DModel`): LVSA on the video-only self-attention ``attn1``, as Wan.

ChronoEdit is a Wan 2.1 image-to-video transformer with its own copy of the Wan attention classes: ``attn1``
is the same frame-major self-attention over ``[B, C, T, H, W]`` latents (the input image is latent frame 0,
one of the LVSA first frames); text and image tokens reach only ``attn2``.
"""
from __future__ import annotations

from diffusers.models.transformers.transformer_chronoedit import WanAttnProcessor as ChronoEditAttnProcessor

from ..models import MODELS
from .runtime import ModelSpec
from .wan import WAN, LVSAWanAttnProcessor

__all__ = ["CHRONOEDIT"]

CHRONOEDIT = ModelSpec(
    name="ChronoEdit",
    model="chronoedit",
    processor_cls=LVSAWanAttnProcessor,
    original_processors=(ChronoEditAttnProcessor,),
    self_attention=WAN.self_attention,
    frame_dim=2,
    patch=WAN.patch,
    reference_frames=lambda config: (MODELS["chronoedit"].reference_frames, "ChronoEdit default (81 frames)"),
    svoo=True,
)
