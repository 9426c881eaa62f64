"""EasyAnimate V5 / V5.1 (`EasyAnimateTransformer3DModel`): LVSA on the joint attention ``attn1`` of each block.

The joint sequence is ``[text (L); video (T*P)]``, text first, no mask. MMDiT blocks project text separately
(``add_q_proj``); the other blocks project the concatenation. RoPE is applied to the video part only.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_easyanimate import EasyAnimateAttnProcessor2_0
from torch import Tensor, nn

from ..models import MODELS
from .heads_qkv import TEXT, heads_qkv
from .runtime import LVSAProcessorBase, ModelSpec

__all__ = ["LVSAEasyAnimateAttnProcessor", "EASYANIMATE"]


class LVSAEasyAnimateAttnProcessor(LVSAProcessorBase):
    """Replaces `EasyAnimateAttnProcessor2_0`: projections (separate for text in MMDiT blocks), per-head
    LayerNorm QK-norm, RoPE on video, LVSA attention over ``[text; video]``, split output projections."""

    where = "EasyAnimate attn1"

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor,
                 attention_mask: Optional[Tensor] = None,
                 image_rotary_emb: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
        if encoder_hidden_states is None or attention_mask is not None:
            raise ValueError(f"LVSA ({self.where}): joint attention needs encoder_hidden_states and no attention_mask")
        geo = self._geometry(hidden_states.shape[1])
        text_len = encoder_hidden_states.shape[1]
        mmdit = attn.add_q_proj is not None
        x = hidden_states if mmdit else torch.cat([encoder_hidden_states, hidden_states], dim=1)
        query, key, value = heads_qkv(attn, x)
        if mmdit:
            text_q, text_k, text_v = heads_qkv(attn, encoder_hidden_states, TEXT)
            query, key, value = (torch.cat(p, dim=1) for p in ((text_q, query), (text_k, key), (text_v, value)))
        if image_rotary_emb is not None:
            query = torch.cat([query[:, :text_len],
                               apply_rotary_emb(query[:, text_len:], image_rotary_emb, sequence_dim=1)], dim=1)
            key = torch.cat([key[:, :text_len],
                             apply_rotary_emb(key[:, text_len:], image_rotary_emb, sequence_dim=1)], dim=1)
        out = self.runtime.attention(query, key, value, self.layer, text_len, "before").flatten(2, 3).to(query.dtype)
        text, video = out.split([text_len, geo.video_tokens], dim=1)
        if getattr(attn, "to_out", None) is not None:
            video = attn.to_out[1](attn.to_out[0](video))
        if getattr(attn, "to_add_out", None) is not None:
            text = attn.to_add_out(text)
        return video, text


def _self_attention(transformer: nn.Module) -> List[Tuple[str, nn.Module]]:
    return [(f"transformer_blocks.{i}.attn1", b.attn1) for i, b in enumerate(transformer.transformer_blocks)]


EASYANIMATE = ModelSpec(
    name="EasyAnimate",
    model="easyanimate",
    processor_cls=LVSAEasyAnimateAttnProcessor,
    original_processors=(EasyAnimateAttnProcessor2_0,),
    self_attention=_self_attention,
    frame_dim=2,
    patch=lambda config: (1, int(config["patch_size"]), int(config["patch_size"])),
    reference_frames=lambda config: (MODELS["easyanimate"].reference_frames, "EasyAnimate default (49 frames)"),
)
