"""LTX-Video (`LTXVideoTransformer3DModel`): LVSA on the video-only self-attention ``attn1``.

The transformer takes packed ``[B, T*H*W, C]`` tokens in frame-major order; the token grid is the call's
``num_frames`` x ``height`` x ``width`` (the RoPE grid). Text reaches only ``attn2``. Calls with
``video_coords`` (conditioning tokens of `LTXConditionPipeline` appended to the video) are rejected.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from diffusers.models.transformers.transformer_ltx import LTXVideoAttnProcessor, apply_rotary_emb
from torch import Tensor, nn

from ..models import MODELS
from .geometry import VideoGeometry
from .runtime import LVSAProcessorBase, ModelSpec

__all__ = ["LVSALTXVideoAttnProcessor", "LTX_VIDEO", "call_grid"]


class LVSALTXVideoAttnProcessor(LVSAProcessorBase):
    """Replaces `LTXVideoAttnProcessor` on ``attn1``: projections, RMS QK-norm across heads, LTX RoPE,
    LVSA attention, output projection."""

    where = "LTX-Video attn1"

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None,
                 image_rotary_emb: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(f"LVSA ({self.where}): self-attention only; got encoder_hidden_states or attention_mask")
        self._geometry(hidden_states.shape[1])
        query = attn.norm_q(attn.to_q(hidden_states))
        key = attn.norm_k(attn.to_k(hidden_states))
        value = attn.to_v(hidden_states)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb)
            key = apply_rotary_emb(key, image_rotary_emb)
        query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
        out = self.runtime.video_attention(query, key, value, self.layer).flatten(2, 3).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out))


def call_grid(bound: Dict[str, Any], model: str) -> VideoGeometry:
    """Token grid of a packed-token transformer call from its ``num_frames``, ``height``, ``width`` arguments
    (already in tokens: the patch does not apply)."""
    sizes = [bound.get(name) for name in ("num_frames", "height", "width")]
    if any(not isinstance(n, int) or n < 1 for n in sizes):
        raise ValueError(f"LVSA ({model}): the transformer call needs num_frames, height and width (token grid) "
                         f"as positive ints; got {sizes}")
    return VideoGeometry(*sizes)


def _geometry(bound: Dict[str, Any], patch: Tuple[int, int, int]) -> VideoGeometry:
    if bound.get("video_coords") is not None:
        raise ValueError("LVSA (LTX-Video): calls with video_coords (conditioning tokens appended to the video, "
                         "LTXConditionPipeline) are not supported; call disable_lvsa() to run dense")
    return call_grid(bound, "LTX-Video")


def _self_attention(transformer: nn.Module) -> List[Tuple[str, nn.Module]]:
    return [(f"transformer_blocks.{i}.attn1", b.attn1) for i, b in enumerate(transformer.transformer_blocks)]


LTX_VIDEO = ModelSpec(
    name="LTX-Video",
    model="ltx_video",
    processor_cls=LVSALTXVideoAttnProcessor,
    original_processors=(LTXVideoAttnProcessor,),
    self_attention=_self_attention,
    frame_dim=1,
    patch=lambda config: (int(config["patch_size_t"]), int(config["patch_size"]), int(config["patch_size"])),
    reference_frames=lambda config: (MODELS["ltx_video"].reference_frames, "LTX-Video default (161 video frames)"),
    geometry=_geometry,
    svoo=True,
)
