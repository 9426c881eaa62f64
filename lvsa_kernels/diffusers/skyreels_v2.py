"""SkyReels-V2 (`SkyReelsV2Transformer3DModel`): LVSA on the video-only self-attention ``attn1``.

T2V / I2V run like Wan (image tokens only reach ``attn2``). In diffusion-forcing mode
(``num_frame_per_block > 1``) diffusers passes ``attn1`` a dense ``[1, 1, S, S]`` block-causal mask; the
processor never reads it: it attends with the step's LVSA frame mask intersected with the same block-causal
frame mask (`LVSAPattern.causal_plan`). Diffusion-forcing pipelines pass per-frame timesteps, so with a
pipeline the denoising step follows the pipeline's own iteration (``pipe._current_timestep``).
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from diffusers.models.transformers.transformer_skyreels_v2 import SkyReelsV2AttnProcessor
from torch import Tensor, nn

from ..models import MODELS
from .wan_qkv import wan_self_attention_qkv
from .runtime import LVSAProcessorBase, ModelSpec
from .wan import WAN

__all__ = ["LVSASkyReelsV2AttnProcessor", "SKYREELS_V2"]


class LVSASkyReelsV2AttnProcessor(LVSAProcessorBase):
    """Replaces `SkyReelsV2AttnProcessor` on ``attn1``: Wan's projections, RMS QK-norm and RoPE, then LVSA
    (intersected with the block-causal frame mask in diffusion-forcing mode)."""

    where = "SkyReels-V2 attn1"

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None,
                 rotary_emb: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
        if encoder_hidden_states is not None:
            raise ValueError(f"LVSA ({self.where}): self-attention only; got encoder_hidden_states")
        self._geometry(hidden_states.shape[1])
        query, key, value = wan_self_attention_qkv(attn, hidden_states, rotary_emb)
        if attention_mask is None:
            out = self.runtime.video_attention(query, key, value, self.layer)
        else:
            out = self.runtime.attention(query, key, value, self.layer,
                                         causal_block=self._frames_per_block(attention_mask))
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))

    def _frames_per_block(self, mask: Tensor) -> int:
        """Frames per causal block of diffusers' block-causal mask, read from its first query row only (the
        keys of block 0); every block of one forward gets the same mask tensor, so this runs once per call."""
        cached = self.runtime.forward_cache.get("skyreels_frames_per_block")
        if cached is not None and cached[0] is mask:
            return cached[1]
        geo = self.runtime.current_geometry(self.where)
        S = geo.video_tokens
        if mask.dtype != torch.bool or tuple(mask.shape[-2:]) != (S, S) or mask.numel() != S * S:
            raise ValueError(f"LVSA ({self.where}): attention_mask: expected diffusers' [1, 1, S, S] bool block-causal "
                             f"mask with S={S}, got {tuple(mask.shape)} {mask.dtype}")
        visible = int(mask.reshape(S, S)[0].sum())
        if visible % geo.tokens_per_frame or geo.frames % (visible // geo.tokens_per_frame):
            raise ValueError(f"LVSA ({self.where}): attention_mask is not a block-causal frame mask "
                             f"(first query sees {visible} keys, P={geo.tokens_per_frame}, T={geo.frames})")
        n = visible // geo.tokens_per_frame
        self.runtime.forward_cache["skyreels_frames_per_block"] = (mask, n)
        return n


def _reference_frames(config: Any) -> Tuple[int, str]:
    return MODELS["skyreels_v2"].reference_frames, "SkyReels-V2 default (97 video frames)"


def _current_timestep(pipeline: Any) -> Any:
    return getattr(pipeline, "_current_timestep", None)


SKYREELS_V2 = ModelSpec(
    name="SkyReels-V2",
    model="skyreels_v2",
    processor_cls=LVSASkyReelsV2AttnProcessor,
    original_processors=(SkyReelsV2AttnProcessor,),
    self_attention=WAN.self_attention,
    frame_dim=2,
    patch=WAN.patch,
    reference_frames=_reference_frames,
    rope=WAN.rope,
    step_marker=_current_timestep,
)
