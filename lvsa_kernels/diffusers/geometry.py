"""Video token geometry of one transformer call, read from the transformer's input and patch size."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from torch import Tensor

__all__ = ["VideoGeometry", "geometry_from_latents", "check_video_tokens"]


@dataclass(frozen=True)
class VideoGeometry:
    """Token grid of the video part of a self-attention sequence.

    Attributes:
        frames: T, token frames (latent frames // temporal patch).
        height, width: token rows and columns per frame (latent size // spatial patch).
    """

    frames: int
    height: int
    width: int

    @property
    def tokens_per_frame(self) -> int:
        """P = height * width."""
        return self.height * self.width

    @property
    def video_tokens(self) -> int:
        """T * P."""
        return self.frames * self.tokens_per_frame


def geometry_from_latents(latents: Tensor, frame_dim: int, patch: Sequence[int]) -> VideoGeometry:
    """Geometry of a latent video after patch embedding.

    Args:
        latents: 5-D latent video, ``[B, C, T_lat, H_lat, W_lat]`` (``frame_dim=2``, Wan and
            HunyuanVideo 1.5) or ``[B, T_lat, C, H_lat, W_lat]`` (``frame_dim=1``, CogVideoX).
        patch: ``(p_t, p_h, p_w)``; the patch embedding floors each latent size by its patch.
    """
    if not isinstance(latents, Tensor) or latents.dim() != 5:
        shape = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
        raise ValueError(f"hidden_states: expected a 5-D latent video tensor, got {shape}")
    if frame_dim not in (1, 2):
        raise ValueError(f"frame_dim must be 1 or 2, got {frame_dim}")
    p_t, p_h, p_w = (int(p) for p in patch)
    t_lat, h_lat, w_lat = latents.shape[frame_dim], latents.shape[3], latents.shape[4]
    geo = VideoGeometry(t_lat // p_t, h_lat // p_h, w_lat // p_w)
    if min(geo.frames, geo.height, geo.width) < 1:
        raise ValueError(
            f"hidden_states: latent size (T, H, W) = ({t_lat}, {h_lat}, {w_lat}) is smaller than the patch "
            f"{(p_t, p_h, p_w)}"
        )
    return geo


def check_video_tokens(geometry: VideoGeometry, video_tokens: int, where: str, shards: int = 1, rank: int = 0) -> None:
    """Raise ValueError when a self-attention call's ``video_tokens`` are not piece ``rank`` of ``T * P`` split
    over ``shards`` ranks as diffusers splits it (``torch.tensor_split`` order: equal pieces when divisible)."""
    expected = geometry.video_tokens // shards + (rank < geometry.video_tokens % shards)
    if video_tokens != expected:
        held = f"{video_tokens} video tokens" + (
            f" on rank {rank} of {shards} (its piece of T*P would be {expected})" if shards > 1 else "")
        raise ValueError(
            f"LVSA ({where}): the self-attention sequence holds {held}, but the transformer input gives "
            f"T={geometry.frames} frames x P={geometry.tokens_per_frame} tokens per frame = "
            f"{geometry.video_tokens}. Custom patch embeddings and context-parallel plans other than "
            "diffusers' sequence split are not supported; call disable_lvsa() to run dense."
        )
