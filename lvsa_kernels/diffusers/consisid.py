"""ConsisID (`ConsisIDTransformer3DModel`): LVSA on the joint attention ``attn1``, as CogVideoX.

ConsisID is CogVideoX with identity conditioning: its blocks keep CogVideoX's ``attn1`` (processor
`CogVideoXAttnProcessor2_0`) over ``[text (L); video (T*P)]``, text first; the face features reach the video
through separate perceiver cross-attention modules, which keep their own code. No temporal patch.
"""
from __future__ import annotations

from typing import Any, Tuple

from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0

from ..reference import latent_frames
from .cogvideox import COGVIDEOX, LVSACogVideoXAttnProcessor
from .runtime import ModelSpec

__all__ = ["CONSISID"]


def _reference_frames(config: Any) -> Tuple[int, str]:
    # config sample_frames is in video frames (49 -> 13 latent frames)
    return latent_frames(int(config["sample_frames"]), int(config["temporal_compression_ratio"])), \
        "config sample_frames"


CONSISID = ModelSpec(
    name="ConsisID",
    model="consisid",
    processor_cls=LVSACogVideoXAttnProcessor,
    original_processors=(CogVideoXAttnProcessor2_0,),
    self_attention=COGVIDEOX.self_attention,
    frame_dim=1,
    patch=lambda config: (1, int(config["patch_size"]), int(config["patch_size"])),
    reference_frames=_reference_frames,
)
