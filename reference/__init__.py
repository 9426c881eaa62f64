"""Planner and reference (pure PyTorch): the block-sparse layout, the LVSA and SVOO planners and the exact
reference attention. Installed as ``lvsa_kernels.reference``."""
from .attention import reference_attention
from .fp8 import fp8_reference_attention
from .layout import BlockSparseLayout, LayoutError, Spans, TextBlock
from .plan import AttentionCall, AttentionPlan, BlockMap, VideoPattern
from .lvsa import LVSAPattern, auto_key_frame_interval, global_anchor_frames, latent_frames
from .svoo import SVOOPlan, SVOOPlanner, co_cluster
from .svoo_profile import ProfileError, SVOOProfile, keep_ratio_for_mass

__all__ = [
    "AttentionCall", "AttentionPlan", "BlockMap", "VideoPattern", "BlockSparseLayout", "LayoutError", "Spans", "TextBlock", "LVSAPattern", "auto_key_frame_interval",
    "global_anchor_frames", "latent_frames", "reference_attention", "fp8_reference_attention",
    "SVOOPlan", "SVOOPlanner", "SVOOProfile", "ProfileError", "co_cluster", "keep_ratio_for_mass",
]
