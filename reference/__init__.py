"""Planner and reference (pure PyTorch): the block-sparse layout, the LVSA pattern and the exact
reference attention. Installed as ``lvsa_kernels.reference``."""
from .attention import reference_attention
from .layout import BlockSparseLayout, LayoutError, Spans
from .lvsa import LVSAPattern, auto_key_frame_interval, global_anchor_frames, latent_frames

__all__ = [
    "BlockSparseLayout", "LayoutError", "Spans", "LVSAPattern", "auto_key_frame_interval",
    "global_anchor_frames", "latent_frames", "reference_attention",
]
