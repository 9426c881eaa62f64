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

import importlib as _importlib

__version__ = "0.1.0"

# name -> module that defines it; imported on first access (PEP 562), so `import lvsa_kernels` and the
# command line's --help load neither torch nor the kernels
_EXPORTS = {
    "AttentionPlan": ".reference", "BlockSparseLayout": ".reference", "LayoutError": ".reference",
    "LVSAPattern": ".reference", "SVOOProfile": ".reference", "auto_key_frame_interval": ".reference",
    "latent_frames": ".reference", "reference_attention": ".reference",
    "BackendUnavailable": ".backends", "block_sparse_attn": ".api", "SVOOPattern": ".svoo_attention",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lvsa_kernels' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
