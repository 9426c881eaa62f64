"""RIFLEx (arXiv 2502.15894): lower the intrinsic temporal RoPE frequency when generating past the training length.

Each temporal RoPE component ``j`` rotates by ``theta_j`` radians per token frame (period ``2*pi / theta_j``
frames). The intrinsic component ``k`` is the one whose period is closest to the training length ``L``
(the reference frames); past ``L`` it starts to repeat content. For ``T > L`` frames RIFLEx sets
``theta_k' = 2*pi / T`` so one period covers the whole video; every other component and every call with
``T <= L`` keep the model's RoPE.

Installed as a forward hook on the transformer's RoPE module that rewrites the temporal channels of
component ``k`` in its ``(cos, sin)`` output; removing the hook restores the original RoPE exactly.
"""
from __future__ import annotations

import math
from typing import Any, Tuple

import torch
from torch import Tensor, nn

__all__ = ["intrinsic_component", "riflex_theta", "install_riflex"]


def intrinsic_component(thetas: Tensor, reference_frames: int) -> int:
    """Index ``k`` of the temporal frequency (radians per frame, ``[n]``) whose period ``2*pi / theta`` is
    closest to ``reference_frames``."""
    periods = 2 * math.pi / thetas.double().clamp_min(1e-30)
    return int((periods - reference_frames).abs().argmin())


def riflex_theta(theta_k: float, frames: int) -> float:
    """The lowered intrinsic frequency for ``frames`` token frames: ``min(theta_k, 2*pi / frames)``."""
    return min(float(theta_k), 2 * math.pi / frames)


def _temporal_thetas(cos: Tensor, sin: Tensor, tokens_per_frame: int, temporal_channels: int) -> Tensor:
    """Per-frame rotation of each temporal component read from the RoPE output at frame 1 (channel pairs
    ``2j, 2j+1`` hold component ``j``); ``[temporal_channels // 2]`` radians."""
    c = cos[tokens_per_frame, 0:temporal_channels:2].double()
    s = sin[tokens_per_frame, 0:temporal_channels:2].double()
    return torch.atan2(s, c)


def install_riflex(rope: nn.Module, temporal_channels: int, patch: Tuple[int, int, int], reference_frames: int) -> Any:
    """Register the RIFLEx forward hook on ``rope``; returns the hook handle (``.remove()`` undoes it).

    Args:
        rope: the RoPE module; called with the latent video ``[B, C, T_lat, H, W]`` (or its first argument
            a tensor of that shape) and returning ``(cos, sin)`` over the ``T*P`` tokens in frame-major
            order, channels last, temporal channels first as repeated pairs (Wan, HunyuanVideo).
        temporal_channels: channels of the temporal axis (Wan ``t_dim``, HunyuanVideo ``rope_axes_dim[0]``).
        patch: ``(p_t, p_h, p_w)`` of the transformer's patch embedding.
        reference_frames: the training length ``L`` in token frames.
    """
    if temporal_channels < 2 or temporal_channels % 2:
        raise ValueError(f"RIFLEx: temporal_channels must be an even number >= 2, got {temporal_channels}")

    def hook(module: nn.Module, args: Tuple[Any, ...], output: Tuple[Tensor, Tensor]) -> Tuple[Tensor, Tensor]:
        latents = args[0]
        frames = latents.shape[2] // patch[0]
        if frames <= reference_frames:
            return output
        tokens_per_frame = (latents.shape[3] // patch[1]) * (latents.shape[4] // patch[2])
        cos, sin = output
        shape, dim = cos.shape, cos.shape[-1]
        cos, sin = cos.reshape(-1, dim), sin.reshape(-1, dim)
        if cos.shape[0] != frames * tokens_per_frame:
            raise ValueError(
                f"RIFLEx: the RoPE output holds {cos.shape[0]} positions, expected T*P = {frames}*{tokens_per_frame} "
                "(RoPE split by context parallelism is not supported); enable_lvsa(..., riflex=False)")
        thetas = _temporal_thetas(cos, sin, tokens_per_frame, temporal_channels)
        k = intrinsic_component(thetas, reference_frames)
        theta = riflex_theta(float(thetas[k]), frames)
        t = torch.arange(frames, device=cos.device, dtype=torch.float64).repeat_interleave(tokens_per_frame)
        angle = (t * theta)[:, None]
        cos, sin = cos.clone(), sin.clone()
        cos[:, 2 * k:2 * k + 2] = torch.cos(angle).to(cos.dtype)
        sin[:, 2 * k:2 * k + 2] = torch.sin(angle).to(sin.dtype)
        return cos.reshape(shape), sin.reshape(shape)

    return rope.register_forward_hook(hook)
