"""Wan VACE (`WanVACETransformer3DModel`): LVSA on ``blocks.*.attn1`` and ``vace_blocks.*.attn1``.

The VACE control stream is padded to the video's length and shares its token grid and RoPE, so both block
lists run the Wan processor on one frame grid (layers numbered ``blocks`` first, then ``vace_blocks``).
`WanVACEPipeline` puts one latent frame per reference image before the video: with a pipeline, those frames
are added to the LVSA first frames at each call (with a bare transformer, raise ``n_first`` yourself).
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

from diffusers.models.transformers.transformer_wan import WanAttnProcessor
from torch import nn

from .runtime import ModelSpec
from .wan import WAN, LVSAWanAttnProcessor

__all__ = ["WAN_VACE", "reference_image_frames"]


def _self_attention(transformer: nn.Module) -> List[Tuple[str, nn.Module]]:
    return ([(f"blocks.{i}.attn1", block.attn1) for i, block in enumerate(transformer.blocks)]
            + [(f"vace_blocks.{i}.attn1", block.attn1) for i, block in enumerate(transformer.vace_blocks)])


def reference_image_frames(kwargs: Dict[str, Any]) -> int:
    """Latent frames `WanVACEPipeline` prepends for the call's ``reference_images``: one per image of a batch
    element (an image, a list of images, or a list with one such list per batch element)."""
    refs = kwargs.get("reference_images")
    if refs is None:
        return 0
    if not isinstance(refs, (list, tuple)):
        return 1
    if refs and isinstance(refs[0], (list, tuple)):
        return len(refs[0])
    return len(refs)


WAN_VACE = ModelSpec(
    name="Wan VACE",
    model="wan_vace",
    processor_cls=LVSAWanAttnProcessor,
    original_processors=(WanAttnProcessor,),
    self_attention=_self_attention,
    frame_dim=2,
    patch=WAN.patch,
    reference_frames=WAN.reference_frames,
    rope=WAN.rope,
    leading_frames=reference_image_frames,
)
