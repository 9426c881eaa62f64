"""Mochi 1 (`MochiTransformer3DModel`): LVSA on the joint attention ``attn1`` of each block.

The joint sequence is ``[video (T*P); text (L)]`` with padded text and separate (asymmetric) text projections.
diffusers passes the ``[B, L]`` text mask and attends, per batch element, over ``[video; valid text]`` with
padded rows set to 0; LVSA does the same on each element's trimmed sequence (valid text first in the mask, as
the T5 tokenizer pads), planned for its valid text length.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from diffusers.models.attention_processor import MochiAttnProcessor2_0
from torch import Tensor, nn

from ..models import MODELS
from .heads_qkv import TEXT, heads_qkv
from .hunyuan15 import LVSAHunyuanVideo15AttnProcessor
from .runtime import ModelSpec

__all__ = ["LVSAMochiAttnProcessor", "MOCHI"]


def mochi_rope(x: Tensor, freqs_cos: Tensor, freqs_sin: Tensor) -> Tensor:
    """Mochi's RoPE on interleaved pairs of ``x [B, S, H, D]`` (computed in fp32, as diffusers does)."""
    even, odd = x[..., 0::2].float(), x[..., 1::2].float()
    cos = (even * freqs_cos - odd * freqs_sin).to(x.dtype)
    sin = (even * freqs_sin + odd * freqs_cos).to(x.dtype)
    return torch.stack([cos, sin], dim=-1).flatten(-2)


class LVSAMochiAttnProcessor(LVSAHunyuanVideo15AttnProcessor):
    """Replaces `MochiAttnProcessor2_0`: video and text projections, RMS QK-norms, RoPE on video, LVSA joint
    attention over ``[video; valid text]`` per batch element, split output projections (the last block has no
    text output projection)."""

    where = "Mochi attn1"

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor,
                 attention_mask: Tensor, image_rotary_emb: Optional[Tuple[Tensor, Tensor]] = None
                 ) -> Tuple[Tensor, Tensor]:
        geo, text_len, lengths = self._joint_inputs(hidden_states, encoder_hidden_states, attention_mask)
        query, key, value = heads_qkv(attn, hidden_states)
        text_q, text_k, text_v = heads_qkv(attn, encoder_hidden_states, TEXT)
        if image_rotary_emb is not None:
            query, key = mochi_rope(query, *image_rotary_emb), mochi_rope(key, *image_rotary_emb)
        query, key, value = (torch.cat(p, dim=1) for p in ((query, text_q), (key, text_k), (value, text_v)))

        out = self._attend_trimmed(query, key, value, geo.video_tokens, lengths, text_len).flatten(2, 3)
        video, text = out.split_with_sizes((geo.video_tokens, text_len), dim=1)
        video = attn.to_out[1](attn.to_out[0](video))
        if hasattr(attn, "to_add_out"):
            text = attn.to_add_out(text)
        return video, text


def _self_attention(transformer: nn.Module) -> List[Tuple[str, nn.Module]]:
    return [(f"transformer_blocks.{i}.attn1", b.attn1) for i, b in enumerate(transformer.transformer_blocks)]


MOCHI = ModelSpec(
    name="Mochi",
    model="mochi",
    processor_cls=LVSAMochiAttnProcessor,
    original_processors=(MochiAttnProcessor2_0,),
    self_attention=_self_attention,
    frame_dim=2,
    patch=lambda config: (1, int(config["patch_size"]), int(config["patch_size"])),
    reference_frames=lambda config: (MODELS["mochi"].reference_frames, "Mochi 1 default (163 frames, 6x temporal)"),
    svoo=True,
)
