"""LTX-2 (`LTX2VideoTransformer3DModel`): LVSA on the video self-attention ``attn1`` only.

Video tokens are packed ``[B, T*H*W, C]`` frame-major; the token grid is the call's ``num_frames`` x
``height`` x ``width`` (the pipeline's ``video_coords`` are the RoPE positions of exactly those tokens, and the
processor checks the sequence length against the grid). Audio self-attention (``audio_attn1``), the audio/video
cross-attentions and text cross-attention keep their processors. Calls with a video self-attention mask
(keyframe conditioning) and the STG variant (``perturbed_attn=True``) are not supported.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

from diffusers.models.transformers.transformer_ltx2 import (LTX2AudioVideoAttnProcessor, apply_interleaved_rotary_emb,
                                                            apply_split_rotary_emb)
from torch import Tensor, nn

from ..models import MODELS
from .ltx import call_grid
from .runtime import LVSAProcessorBase, ModelSpec

__all__ = ["LVSALTX2AttnProcessor", "LTX_2"]


class LVSALTX2AttnProcessor(LVSAProcessorBase):
    """Replaces `LTX2AudioVideoAttnProcessor` on the video ``attn1``: projections, RMS QK-norm, interleaved or
    split RoPE, LVSA attention, optional per-head output gates, output projection."""

    where = "LTX-2 attn1"

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None,
                 query_rotary_emb: Optional[Tuple[Tensor, Tensor]] = None,
                 key_rotary_emb: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
        if encoder_hidden_states is not None or key_rotary_emb is not None:
            raise ValueError(f"LVSA ({self.where}): self-attention only; got encoder_hidden_states or key_rotary_emb")
        if attention_mask is not None:
            raise ValueError(f"LVSA ({self.where}): video self-attention masks (keyframe conditioning) are not "
                             "supported; call disable_lvsa() to run dense")
        self._geometry(hidden_states.shape[1])
        query = attn.norm_q(attn.to_q(hidden_states))
        key = attn.norm_k(attn.to_k(hidden_states))
        value = attn.to_v(hidden_states)
        if query_rotary_emb is not None:
            if attn.rope_type not in ("interleaved", "split"):
                raise ValueError(f"LVSA ({self.where}): unknown rope_type {attn.rope_type!r}")
            rope = apply_interleaved_rotary_emb if attn.rope_type == "interleaved" else apply_split_rotary_emb
            query, key = rope(query, query_rotary_emb), rope(key, query_rotary_emb)
        query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
        out = self.runtime.video_attention(query, key, value, self.layer).to(query.dtype)
        if attn.to_gate_logits is not None:
            out = out * (2.0 * attn.to_gate_logits(hidden_states).sigmoid()).unsqueeze(-1)
        return attn.to_out[1](attn.to_out[0](out.flatten(2, 3)))


def _self_attention(transformer: nn.Module) -> List[Tuple[str, nn.Module]]:
    return [(f"transformer_blocks.{i}.attn1", b.attn1) for i, b in enumerate(transformer.transformer_blocks)]


LTX_2 = ModelSpec(
    name="LTX-2",
    model="ltx2",
    processor_cls=LVSALTX2AttnProcessor,
    original_processors=(LTX2AudioVideoAttnProcessor,),
    self_attention=_self_attention,
    frame_dim=1,
    patch=lambda config: (int(config["patch_size_t"]), int(config["patch_size"]), int(config["patch_size"])),
    reference_frames=lambda config: (MODELS["ltx2"].reference_frames,
                                     "LTX-2 default (121 video frames)"),
    geometry=lambda bound, patch: call_grid(bound, "LTX-2"),
    svoo=True,
)
