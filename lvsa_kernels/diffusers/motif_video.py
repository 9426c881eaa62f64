"""Motif-Video (`MotifVideoTransformer3DModel`): LVSA on the joint attention of the dual-stream
``transformer_blocks.*.attn`` and the encoder single-stream ``single_transformer_blocks.*.attn``.

Its attention is HunyuanVideo 1.0's: ``[video (T*P); text (L)]`` with padded text after the video and a
``[B, 1, 1, S]`` key mask, so the HunyuanVideo processor runs it (each batch element on its trimmed
``[video; valid text]``; image-embedding tokens of image-to-video lead the text and are always valid). The last
``num_decoder_layers`` single-stream blocks attend from a second copy of the video to the encoder's video
(``[video; video]``, no text): they keep their processor, as do the text cross-attentions.
"""
from __future__ import annotations

from typing import List, Tuple

from diffusers.models.transformers.transformer_motif_video import MotifVideoAttnProcessor2_0
from torch import nn

from ..models import MODELS
from .hunyuan_video import HUNYUAN_VIDEO, LVSAHunyuanVideoAttnProcessor
from .runtime import ModelSpec

__all__ = ["LVSAMotifVideoAttnProcessor", "MOTIF_VIDEO"]


class LVSAMotifVideoAttnProcessor(LVSAHunyuanVideoAttnProcessor):
    """Replaces `MotifVideoAttnProcessor2_0` on the dual-stream and encoder single-stream blocks."""

    where = "Motif-Video attn"


def _self_attention(transformer: nn.Module) -> List[Tuple[str, nn.Module]]:
    encoder_single = len(transformer.single_transformer_blocks) - int(transformer.config["num_decoder_layers"])
    return ([(f"transformer_blocks.{i}.attn", b.attn) for i, b in enumerate(transformer.transformer_blocks)]
            + [(f"single_transformer_blocks.{i}.attn", b.attn)
               for i, b in enumerate(transformer.single_transformer_blocks[:encoder_single])])


MOTIF_VIDEO = ModelSpec(
    name="Motif-Video",
    model="motif_video",
    processor_cls=LVSAMotifVideoAttnProcessor,
    original_processors=(MotifVideoAttnProcessor2_0,),
    self_attention=_self_attention,
    frame_dim=2,
    patch=HUNYUAN_VIDEO.patch,
    reference_frames=lambda config: (MODELS["motif_video"].reference_frames, "Motif-Video default (121 frames)"),
    svoo=True,
)
