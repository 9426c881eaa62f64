"""HunyuanVideo 1.0 (`HunyuanVideoTransformer3DModel`): LVSA on the joint attention of the dual-stream
``transformer_blocks.*.attn`` and the single-stream ``single_transformer_blocks.*.attn``.

Both see ``[video (T*P); text (L)]`` with the padded text after the video, as HunyuanVideo 1.5. diffusers passes
a ``[B, 1, 1, S]`` key mask (video and the valid text prefix True); it is read as the text's valid lengths and
each batch element runs on its trimmed ``[video; valid text]`` (no ``S x S`` mask). Padded text rows output 0
instead of diffusers' attention over the valid keys: those rows only ever reach later layers as masked keys,
so the video output is unchanged. The text token refiner keeps its own processor.
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0
from torch import Tensor, nn

from ..models import MODELS
from .heads_qkv import TEXT, heads_qkv
from .hunyuan15 import LVSAHunyuanVideo15AttnProcessor
from .runtime import ModelSpec

__all__ = ["LVSAHunyuanVideoAttnProcessor", "HUNYUAN_VIDEO"]


class LVSAHunyuanVideoAttnProcessor(LVSAHunyuanVideo15AttnProcessor):
    """Replaces `HunyuanVideoAttnProcessor2_0` on the dual-stream (separate text projections, output
    projections) and single-stream (shared projections, no output projection) blocks."""

    where = "HunyuanVideo attn"

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None,
                 image_rotary_emb: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
        geo, text_len, lengths = self._joint_inputs(hidden_states, encoder_hidden_states, attention_mask)
        dual = attn.add_q_proj is not None
        x = hidden_states if dual else torch.cat([hidden_states, encoder_hidden_states], dim=1)
        query, key, value = heads_qkv(attn, x)
        if image_rotary_emb is not None:
            n = geo.video_tokens
            query = torch.cat([apply_rotary_emb(query[:, :n], image_rotary_emb, sequence_dim=1), query[:, n:]], dim=1)
            key = torch.cat([apply_rotary_emb(key[:, :n], image_rotary_emb, sequence_dim=1), key[:, n:]], dim=1)
        if dual:
            text_q, text_k, text_v = heads_qkv(attn, encoder_hidden_states, TEXT)
            query, key, value = (torch.cat(p, dim=1) for p in ((query, text_q), (key, text_k), (value, text_v)))

        out = self._attend_trimmed(query, key, value, geo.video_tokens, lengths, text_len)
        out = out.flatten(2, 3).to(query.dtype)
        video, text = out[:, :-text_len], out[:, -text_len:]
        if getattr(attn, "to_out", None) is not None:
            video = attn.to_out[1](attn.to_out[0](video))
        if getattr(attn, "to_add_out", None) is not None:
            text = attn.to_add_out(text)
        return video, text

    def _text_mask(self, mask: Optional[Tensor], text_len: int) -> Optional[Tensor]:
        """``[B, L]`` text mask from diffusers' ``[B, 1, 1, S]`` key mask (its video part must be all True)."""
        if mask is None:
            return None
        if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1 or mask.shape[3] <= text_len:
            raise ValueError(f"LVSA ({self.where}): attention_mask: expected diffusers' [B, 1, 1, S] key mask, "
                             f"got shape {tuple(mask.shape)}")
        keys = mask[:, 0, 0].bool()
        if not keys[:, :-text_len].all():
            raise ValueError(f"LVSA ({self.where}): attention_mask masks video keys; LVSA supports text padding only")
        return keys[:, -text_len:]


def _self_attention(transformer: nn.Module) -> List[Tuple[str, nn.Module]]:
    return ([(f"transformer_blocks.{i}.attn", b.attn) for i, b in enumerate(transformer.transformer_blocks)]
            + [(f"single_transformer_blocks.{i}.attn", b.attn)
               for i, b in enumerate(transformer.single_transformer_blocks)])


def _reference_frames(config: Any) -> Tuple[int, str]:
    frames = MODELS["hunyuan_video"].reference_frames  # latent frames of its 129-frame training length
    return -(-frames // int(config.get("patch_size_t", 1))), "HunyuanVideo default (129 video frames)"


HUNYUAN_VIDEO = ModelSpec(
    name="HunyuanVideo",
    model="hunyuan_video",
    processor_cls=LVSAHunyuanVideoAttnProcessor,
    original_processors=(HunyuanVideoAttnProcessor2_0,),
    self_attention=_self_attention,
    frame_dim=2,
    patch=lambda config: (int(config["patch_size_t"]), int(config["patch_size"]), int(config["patch_size"])),
    reference_frames=_reference_frames,
    rope=lambda transformer: (transformer.rope, int(transformer.rope.rope_dim[0])),
    svoo=True,
)
