"""The model table: attention geometry, LVSA defaults and diffusers class of every supported video DiT.

One row per model, read by the CLI (``lvsa_kernels/commands``), the diffusers shim (each adapter in
``lvsa_kernels/diffusers/`` names its row by ``ModelSpec.model``; the transformer class is looked up by
``diffusers_class``) and the benchmarks (``bench/shapes.py``). This module imports neither torch nor diffusers.
Frame counts are latent frames unless a name says ``video_frames``; sizes are in pixels and tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Optional

if TYPE_CHECKING:  # the planner (and torch) load on first use, so the CLI's --help stays light
    from .reference import LVSAPattern

__all__ = ["ModelPreset", "MODELS", "get_model"]


@dataclass(frozen=True)
class ModelPreset:
    """One model's self-attention geometry and LVSA defaults.

    Attributes:
        name: registry key (``wan``, ``hunyuan15``, ``cogvideox``, ...; `MODELS` lists them).
        title: human-readable model name.
        heads, head_dim: self-attention heads and head dimension.
        reference_frames: training horizon in latent frames (the LVSA ``ref``).
        spatial_factor: VAE spatial downsampling ``s``; ``patch``: transformer spatial patch ``p``.
        temporal_factor: VAE temporal downsampling (video frames -> latent frames).
        height, width: default resolution in pixels.
        text_position: where text tokens sit in the self-attention sequence: ``"none"`` (video only),
            ``"before"`` or ``"after"`` the video tokens.
        text_tokens: text tokens in the joint sequence when fixed by the model, else None (varies per prompt).
        diffusers_class: name of the diffusers transformer class (in the ``diffusers`` namespace).
        adapter: module of ``lvsa_kernels.diffusers`` holding the model's `ModelSpec` (default: ``name``).
        window, n_first: the model's LVSA defaults (local half-window and first frames, latent frames).
    """

    name: str
    title: str
    heads: int
    head_dim: int
    reference_frames: int
    spatial_factor: int
    patch: int
    height: int
    width: int
    text_position: str
    text_tokens: Optional[int]
    diffusers_class: str
    adapter: str = ""
    temporal_factor: int = 4
    window: int = 3
    n_first: int = 1

    def __post_init__(self) -> None:
        if self.text_position not in ("none", "before", "after"):
            raise ValueError(f"text_position: expected 'none', 'before' or 'after', got {self.text_position!r}")
        if not self.adapter:
            object.__setattr__(self, "adapter", self.name)

    def tokens_per_frame(self, height: Optional[int] = None, width: Optional[int] = None) -> int:
        """Tokens per latent frame ``(height // (s*p)) * (width // (s*p))``; defaults to the preset resolution."""
        h = self.height if height is None else height
        w = self.width if width is None else width
        cell = self.spatial_factor * self.patch
        if h < cell or w < cell:
            raise ValueError(f"height x width = {h}x{w} px is smaller than one {cell}x{cell} token cell")
        return (h // cell) * (w // cell)

    def latent_frames(self, video_frames: int) -> int:
        """Latent frames for ``video_frames`` video frames: ``(F - 1) // temporal_factor + 1``."""
        from .reference import latent_frames

        return latent_frames(video_frames, self.temporal_factor)

    @property
    def plan_text_position(self) -> str:
        """``text_position`` for `LVSAPattern.plan`: ``"before"`` or ``"after"`` (models without text: ``"after"``,
        unused with 0 text tokens)."""
        return "before" if self.text_position == "before" else "after"

    def pattern(self, **overrides) -> LVSAPattern:
        """The model's `LVSAPattern` (its window, first frames and reference horizon); keyword args override."""
        from .reference import LVSAPattern

        defaults = {"window": self.window, "n_first": self.n_first, "reference_frames": self.reference_frames}
        return LVSAPattern(**{**defaults, **overrides})


MODELS: Dict[str, ModelPreset] = {
    p.name: p
    for p in (
        ModelPreset("wan", "Wan 2.1/2.2 T2V 1.3B", heads=12, head_dim=128, reference_frames=21,
                    spatial_factor=8, patch=2, height=480, width=832, text_position="none", text_tokens=0,
                    diffusers_class="WanTransformer3DModel"),
        ModelPreset("hunyuan15", "HunyuanVideo 1.5", heads=16, head_dim=128, reference_frames=33,
                    spatial_factor=16, patch=1, height=480, width=832, text_position="after", text_tokens=None,
                    diffusers_class="HunyuanVideo15Transformer3DModel"),
        ModelPreset("cogvideox", "CogVideoX 5B", heads=48, head_dim=64, reference_frames=13,
                    spatial_factor=8, patch=2, height=480, width=720, text_position="before", text_tokens=226,
                    diffusers_class="CogVideoXTransformer3DModel"),
        ModelPreset("wan_vace", "Wan VACE 1.3B", heads=12, head_dim=128, reference_frames=21,
                    spatial_factor=8, patch=2, height=480, width=832, text_position="none", text_tokens=0,
                    diffusers_class="WanVACETransformer3DModel"),
        ModelPreset("skyreels_v2", "SkyReels-V2 1.3B 540P", heads=12, head_dim=128, reference_frames=25,
                    spatial_factor=8, patch=2, height=544, width=960, text_position="none", text_tokens=0,
                    diffusers_class="SkyReelsV2Transformer3DModel"),
        ModelPreset("hunyuan_video", "HunyuanVideo 1.0", heads=24, head_dim=128, reference_frames=33,
                    spatial_factor=8, patch=2, height=720, width=1280, text_position="after", text_tokens=None,
                    diffusers_class="HunyuanVideoTransformer3DModel"),
        ModelPreset("ltx_video", "LTX-Video 2B", heads=32, head_dim=64, reference_frames=21,
                    spatial_factor=32, patch=1, height=512, width=704, text_position="none", text_tokens=0,
                    diffusers_class="LTXVideoTransformer3DModel", adapter="ltx", temporal_factor=8),
        ModelPreset("ltx2", "LTX-2 (video stream)", heads=32, head_dim=128, reference_frames=16,
                    spatial_factor=32, patch=1, height=512, width=768, text_position="none", text_tokens=0,
                    diffusers_class="LTX2VideoTransformer3DModel", temporal_factor=8),
        ModelPreset("chronoedit", "ChronoEdit 14B", heads=40, head_dim=128, reference_frames=21,
                    spatial_factor=8, patch=2, height=480, width=832, text_position="none", text_tokens=0,
                    diffusers_class="ChronoEditTransformer3DModel"),
        ModelPreset("wan_animate", "Wan 2.2 Animate 14B", heads=40, head_dim=128, reference_frames=21,
                    spatial_factor=8, patch=2, height=720, width=1280, text_position="none", text_tokens=0,
                    diffusers_class="WanAnimateTransformer3DModel"),
        ModelPreset("consisid", "ConsisID", heads=48, head_dim=64, reference_frames=13,
                    spatial_factor=8, patch=2, height=480, width=720, text_position="before", text_tokens=226,
                    diffusers_class="ConsisIDTransformer3DModel"),
        ModelPreset("cosmos", "Cosmos 1.0 Diffusion 7B", heads=32, head_dim=128, reference_frames=16,
                    spatial_factor=8, patch=2, height=704, width=1280, text_position="none", text_tokens=0,
                    diffusers_class="CosmosTransformer3DModel", temporal_factor=8),
        ModelPreset("allegro", "Allegro", heads=24, head_dim=96, reference_frames=22,
                    spatial_factor=8, patch=2, height=720, width=1280, text_position="none", text_tokens=0,
                    diffusers_class="AllegroTransformer3DModel"),
        ModelPreset("mochi", "Mochi 1", heads=24, head_dim=128, reference_frames=28,
                    spatial_factor=8, patch=2, height=480, width=848, text_position="after", text_tokens=None,
                    diffusers_class="MochiTransformer3DModel", temporal_factor=6),
        ModelPreset("easyanimate", "EasyAnimate V5.1 12B", heads=48, head_dim=64, reference_frames=13,
                    spatial_factor=8, patch=2, height=512, width=512, text_position="before", text_tokens=None,
                    diffusers_class="EasyAnimateTransformer3DModel"),
        ModelPreset("motif_video", "Motif-Video 2B", heads=24, head_dim=128, reference_frames=31,
                    spatial_factor=8, patch=2, height=736, width=1280, text_position="after", text_tokens=None,
                    diffusers_class="MotifVideoTransformer3DModel"),
        ModelPreset("kandinsky5", "Kandinsky 5 Video Lite", heads=28, head_dim=64, reference_frames=31,
                    spatial_factor=8, patch=2, height=512, width=768, text_position="none", text_tokens=0,
                    diffusers_class="Kandinsky5Transformer3DModel"),
        ModelPreset("kandinsky6", "Kandinsky 6 (video stream)", heads=32, head_dim=128, reference_frames=31,
                    spatial_factor=8, patch=2, height=512, width=768, text_position="none", text_tokens=0,
                    diffusers_class="Kandinsky6Transformer3DModel"),
    )
}


def get_model(name: str) -> ModelPreset:
    """The preset called ``name``; raises ValueError listing the known names."""
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"model: unknown model {name!r}; known: {sorted(MODELS)}") from None
