"""HunyuanVideo 1.5 (`HunyuanVideo15Transformer3DModel`): LVSA (or SVOO) on the joint attention of each block.

The joint sequence is ``[video (T*P); text (L)]`` with padded text. diffusers passes a ``[B, L]`` text
mask whose valid tokens come first; each batch element runs on its trimmed sequence
``[video; valid text]`` (a view, no ``S x S`` mask) with a layout planned for its valid text length, so
padded text keys are invisible and padded text rows output 0.
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15AttnProcessor2_0
from torch import Tensor, nn

from ..models import MODELS
from ..reference import latent_frames
from .geometry import VideoGeometry
from .heads_qkv import TEXT, heads_qkv
from .runtime import LVSAProcessorBase, ModelSpec

__all__ = ["LVSAHunyuanVideo15AttnProcessor", "HUNYUAN_VIDEO_15", "text_valid_lengths"]


def text_valid_lengths(mask: Optional[Tensor], batch: int, text_len: int) -> List[int]:
    """Valid text tokens per batch element from a ``[B, L]`` prefix mask (None = all valid).

    Raises ValueError when the mask has the wrong shape or its valid tokens are not a prefix.
    """
    if mask is None:
        return [text_len] * batch
    if mask.dim() != 2 or tuple(mask.shape) != (batch, text_len):
        raise ValueError(f"attention_mask: expected the [B, L] = [{batch}, {text_len}] text mask, "
                         f"got shape {tuple(mask.shape)}")
    valid = mask.bool()
    lengths = valid.sum(dim=1)
    prefix = torch.arange(text_len, device=mask.device)[None, :] < lengths[:, None]
    bad = (valid != prefix).any(dim=1)
    if bad.any():
        b = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"attention_mask: LVSA needs each batch element's valid text tokens first, then padding; batch "
            f"element {b} has mask {valid[b].int().tolist()}"
        )
    return [int(n) for n in lengths.tolist()]


class LVSAHunyuanVideo15AttnProcessor(LVSAProcessorBase):
    """Replaces `HunyuanVideo15AttnProcessor2_0`: video and text projections, RMS QK-norm, RoPE on video,
    the runtime's joint attention (LVSA or SVOO) over ``[video; valid text]`` per batch element, split output
    projections."""

    where = "HunyuanVideo 1.5 attn"

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None,
                 image_rotary_emb: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
        geo, text_len, lengths = self._joint_inputs(hidden_states, encoder_hidden_states, attention_mask)
        query, key, value = heads_qkv(attn, hidden_states)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        text_q, text_k, text_v = heads_qkv(attn, encoder_hidden_states, TEXT)
        query = torch.cat([query, text_q], dim=1)
        key = torch.cat([key, text_k], dim=1)
        value = torch.cat([value, text_v], dim=1)

        out = self._attend_trimmed(query, key, value, geo.video_tokens, lengths, text_len)
        out = out.flatten(2, 3).to(query.dtype)
        video, text = out[:, :-text_len], out[:, -text_len:]
        video = attn.to_out[1](attn.to_out[0](video))
        return video, attn.to_add_out(text)

    def _joint_inputs(self, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor],
                      attention_mask: Optional[Tensor]) -> Tuple[VideoGeometry, int, List[int]]:
        """(geometry, text length L, valid text tokens per batch element) of one joint-attention call."""
        if encoder_hidden_states is None:
            raise ValueError(f"LVSA ({self.where}): joint attention needs encoder_hidden_states (the text stream)")
        geo = self._geometry(hidden_states.shape[1])
        batch, text_len = encoder_hidden_states.shape[:2]
        return geo, text_len, self._valid_lengths(attention_mask, batch, text_len)

    def _valid_lengths(self, mask: Optional[Tensor], batch: int, text_len: int) -> List[int]:
        # every block of one forward gets the same mask tensor: check it and sync to host once
        cached = self.runtime.forward_cache.get("hv15_text_lengths")
        if cached is not None and cached[0] is mask and len(cached[1]) == batch:
            return cached[1]
        lengths = text_valid_lengths(self._text_mask(mask, text_len), batch, text_len)
        self.runtime.forward_cache["hv15_text_lengths"] = (mask, lengths)
        return lengths

    def _text_mask(self, mask: Optional[Tensor], text_len: int) -> Optional[Tensor]:
        """The ``[B, L]`` text mask from the mask the model passes (HunyuanVideo 1.5 passes it as is)."""
        return mask

    def _attend_trimmed(self, q: Tensor, k: Tensor, v: Tensor, n_video: int, lengths: List[int],
                        text_len: int) -> Tensor:
        """Attention over ``[video; valid text]`` per batch element; padded rows are 0. ``[B, S, H, D]``."""
        if len(set(lengths)) == 1:  # one call for the whole batch (CFG with equal lengths, no padding)
            groups = [(slice(None), lengths[0])]
        else:
            groups = [(slice(b, b + 1), n) for b, n in enumerate(lengths)]
        parts = []
        for part, (rows, n) in enumerate(groups):
            s = n_video + n
            o = self.runtime.joint_attention(q[rows, :s], k[rows, :s], v[rows, :s], self.layer, n,
                                             part=None if len(groups) == 1 else part)
            parts.append(o if n == text_len else F.pad(o, (0, 0, 0, 0, 0, text_len - n)))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def _self_attention(transformer: nn.Module) -> List[Tuple[str, nn.Module]]:
    return [(f"transformer_blocks.{i}.attn", block.attn) for i, block in enumerate(transformer.transformer_blocks)]


def _reference_frames(config: Any) -> Tuple[int, str]:
    if config.get("sample_n_frames"):
        frames = latent_frames(int(config["sample_n_frames"]))
        return -(-frames // int(config.get("patch_size_t", 1))), "config sample_n_frames"
    return MODELS["hunyuan15"].reference_frames, "HunyuanVideo 1.5 default"


HUNYUAN_VIDEO_15 = ModelSpec(
    name="HunyuanVideo 1.5",
    model="hunyuan15",
    processor_cls=LVSAHunyuanVideo15AttnProcessor,
    original_processors=(HunyuanVideo15AttnProcessor2_0,),
    self_attention=_self_attention,
    frame_dim=2,
    patch=lambda config: (int(config["patch_size_t"]), int(config["patch_size"]), int(config["patch_size"])),
    reference_frames=_reference_frames,
    rope=lambda transformer: (transformer.rope, int(transformer.rope.rope_dim[0])),
    svoo=True,
)
