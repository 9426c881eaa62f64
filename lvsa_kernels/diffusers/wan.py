"""Wan 2.1 / 2.2 (`WanTransformer3DModel`): LVSA on the video-only self-attention ``attn1``.

Cross-attention ``attn2`` (text, I2V image tokens) keeps its diffusers processor. Under diffusers'
context parallelism (``enable_parallelism``: Ulysses, ring or both) ``attn1`` runs through the runtime's
all-to-all and layout-aware ring (`lvsa_kernels.diffusers.parallel`).
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

from diffusers.models.transformers.transformer_wan import WanAttnProcessor
from torch import Tensor, nn

from ..models import MODELS
from ..reference import latent_frames
from .wan_qkv import wan_self_attention_qkv
from .runtime import LVSAProcessorBase, ModelSpec

__all__ = ["LVSAWanAttnProcessor", "WAN"]

_WAN22_5B_REFERENCE = 31  # Wan2.2-TI2V-5B: 121 video frames
_WAN22_5B_CHANNELS = 48   # its latent channels (Wan 2.2 VAE); every other Wan transformer has 16 (or 36 for I2V)


class LVSAWanAttnProcessor(LVSAProcessorBase):
    """Replaces `WanAttnProcessor` on ``attn1``: projections, RMS QK-norm, RoPE, the runtime's sparse
    attention (LVSA or SVOO), output."""

    where = "Wan attn1"

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None,
                 rotary_emb: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(f"LVSA ({self.where}): self-attention only; got encoder_hidden_states or attention_mask")
        self._geometry(hidden_states.shape[1])
        query, key, value = wan_self_attention_qkv(attn, hidden_states, rotary_emb)
        out = self.runtime.video_attention(query, key, value, self.layer)
        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def _self_attention(transformer: nn.Module) -> List[Tuple[str, nn.Module]]:
    return [(f"blocks.{i}.attn1", block.attn1) for i, block in enumerate(transformer.blocks)]


def _reference_frames(config: Any) -> Tuple[int, str]:
    if config.get("sample_frames"):
        return latent_frames(int(config["sample_frames"])), "config sample_frames"
    if config.get("in_channels") == _WAN22_5B_CHANNELS:
        return _WAN22_5B_REFERENCE, "Wan2.2-TI2V-5B default (48 latent channels)"
    return MODELS["wan"].reference_frames, "Wan default"


WAN = ModelSpec(
    name="Wan",
    model="wan",
    processor_cls=LVSAWanAttnProcessor,
    original_processors=(WanAttnProcessor,),
    self_attention=_self_attention,
    frame_dim=2,
    patch=lambda config: tuple(int(p) for p in config["patch_size"]),
    reference_frames=_reference_frames,
    context_parallel=True,
    rope=lambda transformer: (transformer.rope, transformer.rope.t_dim),
    svoo=True,
)
