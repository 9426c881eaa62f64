"""CogVideoX (`CogVideoXTransformer3DModel`): LVSA on the joint attention ``attn1`` of each block.

The joint sequence is ``[text (L); video (T*P)]``: text first (``text_position="before"``), no padding
mask. CogVideoX 1.5 patches time too (``patch_size_t``), so T counts token frames.
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0, FusedCogVideoXAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb
from torch import Tensor, nn

from ..reference import latent_frames
from .runtime import LVSAProcessorBase, ModelSpec

__all__ = ["LVSACogVideoXAttnProcessor", "COGVIDEOX"]


class LVSACogVideoXAttnProcessor(LVSAProcessorBase):
    """Replaces `CogVideoXAttnProcessor2_0` (and its fused-QKV variant): shared projections over
    ``[text; video]``, per-head LayerNorm QK-norm, RoPE on video, LVSA attention, split output."""

    where = "CogVideoX attn1"

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor,
                 attention_mask: Optional[Tensor] = None,
                 image_rotary_emb: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
        if attention_mask is not None:
            raise ValueError(f"LVSA ({self.where}): CogVideoX joint attention has no mask; got attention_mask")
        self._geometry(hidden_states.shape[1])
        text_len = encoder_hidden_states.shape[1]
        x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(x).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query = torch.cat([query[:, :text_len],
                               apply_rotary_emb(query[:, text_len:], image_rotary_emb, sequence_dim=1)], dim=1)
            key = torch.cat([key[:, :text_len],
                             apply_rotary_emb(key[:, text_len:], image_rotary_emb, sequence_dim=1)], dim=1)
        out = self.runtime.attention(query, key, value, self.layer, text_len, "before").flatten(2, 3)
        out = attn.to_out[1](attn.to_out[0](out))
        text, video = out.split([text_len, out.shape[1] - text_len], dim=1)
        return video, text


def _self_attention(transformer: nn.Module) -> List[Tuple[str, nn.Module]]:
    return [(f"transformer_blocks.{i}.attn1", block.attn1) for i, block in enumerate(transformer.transformer_blocks)]


def _patch(config: Any) -> Tuple[int, int, int]:
    return int(config["patch_size_t"] or 1), int(config["patch_size"]), int(config["patch_size"])


def _reference_frames(config: Any) -> Tuple[int, str]:
    # config sample_frames is in video frames (49 for CogVideoX 5B -> 13 latent frames)
    latent = latent_frames(int(config["sample_frames"]), int(config["temporal_compression_ratio"]))
    return -(-latent // _patch(config)[0]), "config sample_frames"


COGVIDEOX = ModelSpec(
    name="CogVideoX",
    model="cogvideox",
    processor_cls=LVSACogVideoXAttnProcessor,
    original_processors=(CogVideoXAttnProcessor2_0, FusedCogVideoXAttnProcessor2_0),
    self_attention=_self_attention,
    frame_dim=1,
    patch=_patch,
    reference_frames=_reference_frames,
)
