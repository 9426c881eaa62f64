"""lvsa_kernels: block-sparse attention kernels for long-video diffusion transformers.

Public API:
    LVSAPattern, SVOOPattern, BlockSparseLayout  - plan a sparsity pattern into a block-index layout
    AttentionPlan                   - a layout plus an optional token permutation (what SVOO plans)
    block_sparse_attn               - run attention on a layout or plan (Triton / FlashInfer / NPU / SDPA / reference)
    reference_attention             - the exact reference every backend is checked against
"""
import os as _os

# Installed, the folders reference/, triton_src/, npu/ and bench/ live inside this package (setup.py's
# package_dir). Imported straight from a source checkout (e.g. `python -m pytest` run from the repo root
# puts the checkout first on sys.path), the same names resolve through the checkout's root folder.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "reference")) and _os.path.isfile(
        _os.path.join(_root, "setup.py")):
    __path__.append(_root)

from .reference import (
    AttentionPlan,
    BlockSparseLayout,
    LayoutError,
    LVSAPattern,
    SVOOProfile,
    auto_key_frame_interval,
    latent_frames,
    reference_attention,
)
from .backends import BackendUnavailable
from .api import block_sparse_attn
from .svoo_attention import SVOOPattern

__version__ = "0.1.0"

__all__ = [
    "AttentionPlan", "BlockSparseLayout", "LayoutError", "LVSAPattern", "SVOOPattern", "SVOOProfile", "auto_key_frame_interval",
    "latent_frames",
    "reference_attention", "block_sparse_attn", "BackendUnavailable", "__version__",
]
