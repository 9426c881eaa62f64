"""lvsa_kernels: block-sparse attention kernels for long-video diffusion transformers.

Public API:
    LVSAPattern, BlockSparseLayout  - plan a sparsity pattern into a block-index layout
    block_sparse_attn               - run attention on a layout (Triton / FlashInfer / NPU / SDPA / reference)
    reference_attention             - the exact reference every backend is checked against
"""
from .reference import (
    BlockSparseLayout,
    LayoutError,
    LVSAPattern,
    auto_key_frame_interval,
    latent_frames,
    reference_attention,
)
from .backends import BackendUnavailable
from .api import block_sparse_attn

__version__ = "0.1.0"

__all__ = [
    "BlockSparseLayout", "LayoutError", "LVSAPattern", "auto_key_frame_interval", "latent_frames",
    "reference_attention", "block_sparse_attn", "BackendUnavailable", "__version__",
]
