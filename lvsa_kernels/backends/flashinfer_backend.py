"""`flashinfer` backend: FlashInfer's block-sparse wrappers (CUDA, fp16/bf16).

A layout is converted once into one of three plans, chosen in this order:

* ``bsr`` - a shared layout with uniform blocks (`interop.to_flashinfer_bsr`) runs on
  ``BlockSparseAttentionWrapper`` (BSR: R-token query rows, C-token key blocks);
* ``text`` - a shared LVSA layout with one leading or trailing text block (``layout.text``): the video queries run as BSR over the video keys, plus a dense side call
  over the text keys (a one-block BSR plan on the same prebuilt module), merged by log-sum-exp; the text
  queries run dense over all keys;
* ``variable`` - anything else (per-head layouts, non-uniform blocks) runs on
  ``VariableBlockSparseAttentionWrapper`` (one block map per KV head, HND layout).

Plans are built once per layout and reused across calls and layers (a `LayoutMemo` of this module, keyed
by device, dtype, heads, head dim, scale and batch size); all wrappers on a device share one 128 MB
workspace. Indices are int32 and the output dtype equals the input dtype, which is what FlashInfer's
prebuilt modules cover; a dtype/head dim without a prebuilt or JIT-cached module is JIT-compiled on first
use (minutes; one WARNING before, see `build_needed`; ``auto`` never times such a candidate). FlashInfer's
lse is base 2 and is converted to the natural log. When the ``fiprep_extras`` package (prebuilt
modules for one FlashInfer version) is installed, FlashInfer is pointed at it (`use_prebuilt_modules`).

Batch: ``bsr`` folds the batch into one block-diagonal BSR over ``B * Sq`` tokens (q/k/v reshaped as
views, no Python loop) when every query block is full (``Sq % R == 0``); otherwise, and for ``text``
and ``variable`` (whose per-sequence views cannot be flattened without copies), it loops over the batch.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import math
from dataclasses import dataclass
from types import ModuleType
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Set, Tuple

import torch
from torch import Tensor

from ..interop import to_flashinfer_bsr
from ..reference.layout import BlockSparseLayout, LayoutMemo
from .base import Backend, BackendUnavailable, Capabilities, register

__all__ = [
    "FlashInferBackend", "TextSplit", "block_diagonal_bsr", "layout_plan_kind", "merge_states_base2",
    "text_split", "use_prebuilt_modules", "variable_block_args",
]

log = logging.getLogger("lvsa_kernels")
LN2 = math.log(2.0)
WORKSPACE_BYTES = 128 * 1024 * 1024
PREBUILT_HEAD_DIMS = frozenset({64, 128})
_workspaces: Dict[str, Tensor] = {}
_ready: Set[Tuple[torch.dtype, int]] = set()   # (dtype, head dim) that ran in this process
_jit_warned: Set[Tuple[torch.dtype, int]] = set()
_DTYPE_TAGS = {torch.float16: "f16", torch.bfloat16: "bf16"}
_PLANS = LayoutMemo()   # per layout: plan kind, empty rows, runners (FlashInfer wrappers)


# ---------------------------------------------------------------------------------------- import
def use_prebuilt_modules(fi: ModuleType) -> Optional[str]:
    """Point FlashInfer's AOT folder at the ``fiprep_extras`` package's prebuilt modules.

    Done only when ``fiprep_extras`` is importable, was built for this FlashInfer version
    (``fiprep_extras.FLASHINFER_VERSION == flashinfer.__version__``) and no ``flashinfer-jit-cache``
    is installed (that package is FlashInfer's own AOT folder). Modules found there are loaded instead of
    being JIT-compiled; others still JIT-compile. Returns the folder used, or None.
    """
    if importlib.util.find_spec("fiprep_extras") is None or importlib.util.find_spec("flashinfer_jit_cache"):
        return None
    import fiprep_extras
    from flashinfer.jit import env as jit_env

    built_for = getattr(fiprep_extras, "FLASHINFER_VERSION", None)
    if built_for != fi.__version__:
        log.warning("lvsa_kernels flashinfer: fiprep_extras holds modules for FlashInfer %s, not %s; not using them",
                    built_for, fi.__version__)
        return None
    jit_env.FLASHINFER_AOT_DIR = type(jit_env.FLASHINFER_AOT_DIR)(fiprep_extras.AOT_DIR)
    log.info("lvsa_kernels flashinfer: prebuilt modules from %s", fiprep_extras.AOT_DIR)
    return fiprep_extras.AOT_DIR


@functools.lru_cache(maxsize=None)
def _load() -> Tuple[Optional[ModuleType], Optional[str]]:
    if importlib.util.find_spec("flashinfer") is None:
        return None, "the 'flashinfer-python' package is not installed (pip install 'lvsa_kernels[flashinfer]')"
    try:
        import flashinfer
    except (ImportError, OSError, RuntimeError) as exc:
        return None, f"'import flashinfer' failed: {exc!r}"
    use_prebuilt_modules(flashinfer)
    return flashinfer, None


def _flashinfer() -> ModuleType:
    """The imported ``flashinfer`` module (raises `BackendUnavailable` with the reason when it is missing)."""
    module, reason = _load()
    if module is None:
        raise BackendUnavailable(f"backend 'flashinfer': {reason}")
    return module


def _workspace(device: torch.device) -> Tensor:
    key = str(device)
    if key not in _workspaces:
        _workspaces[key] = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    return _workspaces[key]


# ---------------------------------------------------------------------------------------- conversions
@dataclass(frozen=True)
class TextSplit:
    """A shared layout split into video blocks (uniform BSR) and one text block, in token ranges."""

    q_video: slice
    q_text: slice
    kv_video: slice
    kv_text: slice
    video_bsr: Dict[str, Any]   # `interop.to_flashinfer_bsr` of the video-only layout (video queries x video keys)


def _text_block_range(offsets: Tensor, block: int) -> Tuple[slice, slice]:
    n = offsets.numel() - 1
    if block not in (0, n - 1):
        raise ValueError(f"text block {block} is neither the first nor the last of {n} blocks")
    lo, hi, end = int(offsets[block]), int(offsets[block + 1]), int(offsets[-1])
    return (slice(hi, end), slice(lo, hi)) if block == 0 else (slice(0, lo), slice(lo, hi))


def text_split(layout: BlockSparseLayout) -> Optional[TextSplit]:
    """`TextSplit` of a shared layout with a text block (``layout.text``).

    Returns None when the layout has no text blocks. Raises ValueError when it has them but they cannot be
    split off exactly: every video query block must attend the text key block, the text query block
    must attend every key block, and the video blocks must form a uniform BSR.
    """
    if layout.text is None:
        return None
    if layout.num_heads != 1:
        raise ValueError("text split needs a layout shared by all heads")
    tq, tk = layout.text.q_block, layout.text.kv_block
    q_video, q_text = _text_block_range(layout.q_offsets[0], tq)
    kv_video, kv_text = _text_block_range(layout.kv_offsets[0], tk)
    bm = layout.to_block_mask()[0]
    vq = [r for r in range(layout.num_q_blocks) if r != tq]
    vk = [c for c in range(layout.num_kv_blocks) if c != tk]
    if not bool(bm[vq, tk].all()):
        raise ValueError("text split needs every video query block to attend the text key block")
    if not bool(bm[tq].all()):
        raise ValueError("text split needs the text query block to attend every key block")
    qs, ks = layout.block_sizes()
    video = BlockSparseLayout.from_block_mask(bm[vq][:, vk], qs[0, vq], ks[0, vk])
    return TextSplit(q_video, q_text, kv_video, kv_text, to_flashinfer_bsr(video))


def block_diagonal_bsr(bsr: Dict[str, Any], batch: int) -> Dict[str, Any]:
    """Fold ``batch`` copies of a BSR (`interop.to_flashinfer_bsr` dict, M a multiple of R) into one block-diagonal
    BSR over ``batch * M`` query and ``batch * N`` key tokens (sequence b's blocks are offset by b)."""
    M, N, R, C = bsr["M"], bsr["N"], bsr["R"], bsr["C"]
    if M % R:
        raise ValueError(f"block_diagonal_bsr: M={M} is not a multiple of R={R}")
    indptr, indices = bsr["indptr"].long(), bsr["indices"].long()
    nnz, nb = int(indptr[-1]), N // C
    rows = [indptr[:-1] + b * nnz for b in range(batch)] + [torch.tensor([batch * nnz])]
    return {
        "indptr": torch.cat(rows).to(torch.int32),
        "indices": torch.cat([indices + b * nb for b in range(batch)]).to(torch.int32),
        "M": batch * M, "N": batch * N, "R": R, "C": C,
    }


def variable_block_args(layout: BlockSparseLayout, num_qo_heads: int, num_kv_heads: int) -> Dict[str, Tensor]:
    """Arguments of ``VariableBlockSparseAttentionWrapper.plan``: ``block_mask_map`` bool ``[H_kv, MB, NB]``,
    ``block_row_sz`` int32 ``[H_kv, MB]``, ``block_col_sz`` int32 ``[H_kv, NB]`` (CPU tensors).

    FlashInfer keeps one pattern per KV head: a per-query-head layout must agree within each GQA group.
    Raises ValueError naming the first disagreement, or an empty block (FlashInfer needs sizes >= 1).
    """
    mask = layout.to_block_mask()
    qs, ks = layout.block_sizes()
    if layout.num_heads == 1:
        mask, qs, ks = (t.expand(num_kv_heads, *t.shape[1:]) for t in (mask, qs, ks))
    else:
        qs, ks = qs.expand(layout.num_heads, -1), ks.expand(layout.num_heads, -1)
        group = num_qo_heads // num_kv_heads
        for name, t in (("block mask", mask), ("query block sizes", qs), ("key block sizes", ks)):
            grouped = t.reshape(num_kv_heads, group, *t.shape[1:])
            bad = (grouped != grouped[:, :1]).flatten(1).any(dim=1).nonzero()
            if bad.numel():
                j = int(bad[0])
                raise ValueError(f"per-head layout: the {name} differs within GQA group {j} (query heads "
                                 f"{j * group}..{(j + 1) * group - 1}); FlashInfer keeps one pattern per KV head")
        mask, qs, ks = mask[::group], qs[::group], ks[::group]
    if bool((qs <= 0).any()) or bool((ks <= 0).any()):
        raise ValueError("layout has empty (0-token) blocks; FlashInfer's variable-block wrapper needs sizes >= 1")
    return {"block_mask_map": mask.contiguous(), "block_row_sz": qs.to(torch.int32).contiguous(),
            "block_col_sz": ks.to(torch.int32).contiguous()}


def layout_plan_kind(layout: BlockSparseLayout, num_qo_heads: int, num_kv_heads: int) -> str:
    """``"bsr"``, ``"text"`` or ``"variable"`` (see the module docstring); ValueError with the reason when
    FlashInfer cannot express the layout. Cached on the layout."""
    def build() -> Tuple[Optional[str], Optional[str]]:
        errors = []
        if layout.num_heads == 1:
            try:
                to_flashinfer_bsr(layout)
                return "bsr", None
            except ValueError as exc:
                errors.append(str(exc))
            try:
                if text_split(layout) is not None:
                    return "text", None
            except ValueError as exc:
                errors.append(str(exc))
        try:
            variable_block_args(layout, num_qo_heads, num_kv_heads)
            return "variable", None
        except ValueError as exc:
            errors.append(str(exc))
        return None, "; ".join(errors)

    kind, reason = _PLANS.get(layout, ("kind", num_qo_heads, num_kv_heads), build)
    if kind is None:
        raise ValueError(reason)
    return kind


def merge_states_base2(o1: Tensor, lse1: Tensor, o2: Tensor, lse2: Tensor) -> Tuple[Tensor, Tensor]:
    """Merge two partial attention results over disjoint key sets, FlashInfer style (lse in base 2).

    ``o*`` ``[n, H, D]``, ``lse*`` ``[n, H]`` float32 base 2. Returns ``(o [n, H, D] in o1.dtype,
    lse [n, H] float32 base 2)``; computed in float32. Rows empty on both sides give 0 and -inf.
    """
    m = torch.maximum(lse1, lse2)
    m = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
    w1, w2 = torch.exp2(lse1 - m), torch.exp2(lse2 - m)
    total = w1 + w2
    o = (o1.float() * w1[..., None] + o2.float() * w2[..., None]) / total.clamp_min(1e-38)[..., None]
    return o.to(o1.dtype), m + torch.log2(total)


# ---------------------------------------------------------------------------------------- plans
def _natural_lse(lse_base2: Tensor) -> Tensor:
    """FlashInfer lse ``[..., n, H]`` base 2 -> ``[..., H, n]`` natural log (float32)."""
    return (lse_base2.float() * LN2).transpose(-1, -2)


def _plan_bsr(fi: ModuleType, bsr: Dict[str, Any], q: Tensor, k: Tensor, scale: float):
    wrapper = fi.BlockSparseAttentionWrapper(_workspace(q.device))
    wrapper.plan(bsr["indptr"].to(q.device), bsr["indices"].to(q.device), bsr["M"], bsr["N"], bsr["R"], bsr["C"],
                 q.shape[2], k.shape[2], q.shape[3], sm_scale=scale,
                 q_data_type=q.dtype, kv_data_type=k.dtype, o_data_type=q.dtype)
    return wrapper


def _bsr_runner(fi: ModuleType, layout: BlockSparseLayout, q: Tensor, k: Tensor, scale: float) -> Callable:
    bsr = to_flashinfer_bsr(layout)
    B, Sq, H, D = q.shape
    if B > 1 and Sq % bsr["R"] == 0:
        wrapper = _plan_bsr(fi, block_diagonal_bsr(bsr, B), q, k, scale)

        def run_folded(q, k, v, return_lse):
            res = wrapper.run(q.reshape(B * Sq, H, D), k.reshape(-1, *k.shape[2:]), v.reshape(-1, *v.shape[2:]),
                              return_lse=return_lse)
            o, lse = res if return_lse else (res, None)
            return o.view(B, Sq, H, D), None if lse is None else _natural_lse(lse.view(B, Sq, H))
        return run_folded
    wrapper = _plan_bsr(fi, bsr, q, k, scale)

    def run_looped(q, k, v, return_lse):
        results = [wrapper.run(q[b], k[b], v[b], return_lse=return_lse) for b in range(B)]
        if not return_lse:
            return torch.stack(results), None
        return torch.stack([o for o, _ in results]), _natural_lse(torch.stack([l for _, l in results]))
    return run_looped


def _one_block_bsr(fi: ModuleType, q_len: int, kv_len: int, q: Tensor, k: Tensor, scale: float):
    """Dense ``q_len x kv_len`` attention as a BSR plan with a single block: it runs on the same (prebuilt)
    block-sparse module as the video part, so text needs no JIT build of FlashInfer's single-prefill module."""
    one = {"indptr": torch.tensor([0, 1], dtype=torch.int32), "indices": torch.tensor([0], dtype=torch.int32),
           "M": q_len, "N": kv_len, "R": q_len, "C": kv_len}
    return _plan_bsr(fi, one, q, k, scale)


def _text_runner(fi: ModuleType, layout: BlockSparseLayout, q: Tensor, k: Tensor, scale: float) -> Callable:
    split = text_split(layout)
    wrapper = _plan_bsr(fi, split.video_bsr, q, k, scale)
    n_qv, n_qt = (split.q_video.stop - split.q_video.start), (split.q_text.stop - split.q_text.start)
    video_to_text = _one_block_bsr(fi, n_qv, split.kv_text.stop - split.kv_text.start, q, k, scale)
    text_to_all = _one_block_bsr(fi, n_qt, k.shape[1], q, k, scale)

    def dense(plan, qq, kk, vv):
        return plan.run(qq, kk, vv, return_lse=True)

    def run_text(q, k, v, return_lse):
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32, device=q.device)
        for b in range(q.shape[0]):
            qv = q[b, split.q_video]
            o_vid, l_vid = wrapper.run(qv, k[b, split.kv_video], v[b, split.kv_video], return_lse=True)
            o_txt, l_txt = dense(video_to_text, qv, k[b, split.kv_text], v[b, split.kv_text])
            o, l = merge_states_base2(o_vid, l_vid, o_txt, l_txt)
            out[b, split.q_video] = o
            lse[b, :, split.q_video] = _natural_lse(l)
            o, l = dense(text_to_all, q[b, split.q_text], k[b], v[b])
            out[b, split.q_text] = o
            lse[b, :, split.q_text] = _natural_lse(l)
        return out, (lse if return_lse else None)
    return run_text


def _variable_runner(fi: ModuleType, layout: BlockSparseLayout, q: Tensor, k: Tensor, scale: float) -> Callable:
    args = variable_block_args(layout, q.shape[2], k.shape[2])
    wrapper = fi.VariableBlockSparseAttentionWrapper(_workspace(q.device))
    wrapper.plan(args["block_mask_map"].to(q.device), args["block_row_sz"].to(q.device),
                 args["block_col_sz"].to(q.device), q.shape[2], k.shape[2], q.shape[3], sm_scale=scale,
                 q_data_type=q.dtype, kv_data_type=k.dtype)

    def run_variable(q, k, v, return_lse):
        # HND views; FlashInfer makes the one layout copy it needs
        results = [wrapper.run(q[b].transpose(0, 1), k[b].transpose(0, 1), v[b].transpose(0, 1),
                               return_lse=return_lse) for b in range(q.shape[0])]
        outs = [r[0] if return_lse else r for r in results]
        out = torch.stack(outs).transpose(1, 2)
        if not return_lse:
            return out, None
        return out, torch.stack([r[1] for r in results]).float() * LN2   # [B, H, Sq] already
    return run_variable


_RUNNERS = {"bsr": _bsr_runner, "text": _text_runner, "variable": _variable_runner}


def _empty_rows(layout: BlockSparseLayout) -> Optional[Tensor]:
    """bool ``[Hl, Sq]``: query tokens whose block attends no keys, or None when there are none."""
    def build():
        empty = layout.keys_per_block() == 0
        if not bool(empty.any()):
            return None
        q_off = layout.q_offsets.expand(layout.num_heads, -1)
        return torch.gather(empty, 1, BlockSparseLayout.token_to_block(q_off))
    return _PLANS.get(layout, "empty_rows", build)


# ---------------------------------------------------------------------------------------- JIT builds
def _has_prebuilt(fi: ModuleType) -> bool:
    """Whether prebuilt modules are installed: FlashInfer's ``flashinfer-jit-cache`` or a matching ``fiprep_extras``."""
    if importlib.util.find_spec("flashinfer_jit_cache") is not None:
        return True
    return importlib.util.find_spec("fiprep_extras") is not None and \
        getattr(importlib.import_module("fiprep_extras"), "FLASHINFER_VERSION", None) == getattr(fi, "__version__", None)


def _in_jit_cache(fi: ModuleType, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether FlashInfer's JIT folder already holds a built prefill module for ``dtype`` and ``head_dim``
    (a module folder named with ``dtype_q_<tag>_`` and ``head_dim_qk_<d>_`` that contains a ``.so``)."""
    folder = getattr(getattr(getattr(fi, "jit", None), "env", None), "FLASHINFER_JIT_DIR", None)
    if folder is None or not Path(folder).is_dir():
        return False
    tags = (f"dtype_q_{_DTYPE_TAGS.get(dtype, '?')}_", f"head_dim_qk_{head_dim}_")
    return any(all(t in d.name for t in tags) and any(d.glob("*.so")) for d in Path(folder).iterdir() if d.is_dir())


def build_needed(fi: ModuleType, dtype: torch.dtype, head_dim: int) -> Optional[str]:
    """None when FlashInfer can run ``dtype``/``head_dim`` without compiling, else what it would JIT-build."""
    if (dtype, head_dim) in _ready:
        return None
    if (head_dim in PREBUILT_HEAD_DIMS and _has_prebuilt(fi)) or _in_jit_cache(fi, dtype, head_dim):
        _ready.add((dtype, head_dim))  # found once: later calls (every auto call) skip the file-system checks
        return None
    return (f"a FlashInfer prefill module for {str(dtype).replace('torch.', '')}, head dim {head_dim} "
            f"(no prebuilt or JIT-cached one)")


def _warn_before_build(what: str, key: Tuple[torch.dtype, int]) -> None:
    if key not in _jit_warned:
        _jit_warned.add(key)
        log.warning("lvsa_kernels flashinfer: JIT-building %s now. This compiles CUDA code with nvcc once per "
                    "dtype and head dim and takes minutes (73 s measured on an H200 for head dim 64); the module "
                    "is then cached in ~/.cache/flashinfer. To pre-build, run one block_sparse_attn(..., "
                    "backend='flashinfer') call with these shapes in a setup step, or install FlashInfer's "
                    "flashinfer-jit-cache wheel (prebuilt head dims 64/128/256).", what)


# ---------------------------------------------------------------------------------------- backend
class FlashInferBackend(Backend):
    name = "flashinfer"
    caps = Capabilities(devices=frozenset({"cuda"}), dtypes=frozenset({torch.float16, torch.bfloat16}),
                        head_dims=None)

    @property
    def notes(self) -> str:
        fi, _ = _load()
        ready = sorted(f"{str(d).replace('torch.', '')}/d{h}" for d in _DTYPE_TAGS for h in (64, 128, 256)
                       if fi is not None and build_needed(fi, d, h) is None)
        return ("a dtype/head dim without a prebuilt or JIT-cached FlashInfer module is built on first use "
                "(minutes; auto never times it, it measures ready backends only); ready now: "
                + (", ".join(ready) if ready else "none"))

    def build_needed(self, q: Tensor, layout: BlockSparseLayout) -> Optional[str]:
        fi, _ = _load()
        return None if fi is None else build_needed(fi, q.dtype, q.shape[-1])

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        _, reason = _load()
        if reason:
            return reason
        if not torch.cuda.is_available():
            return "no CUDA device (FlashInfer runs on CUDA only)"
        return None

    def unsupported_reason(self, q: Tensor, k: Tensor, layout: BlockSparseLayout, return_lse: bool) -> Optional[str]:
        reason = super().unsupported_reason(q, k, layout, return_lse)
        if reason:
            return reason
        if q.stride(-1) != 1 or k.stride(-1) != 1:
            return "the head dim (last dim) of q, k and v must be contiguous"
        try:
            layout_plan_kind(layout, q.shape[2], k.shape[2])
        except ValueError as exc:
            return f"layout cannot be expressed for FlashInfer: {exc}"
        return None

    def run(self, q, k, v, layout, scale, return_lse):
        fi = _flashinfer()
        B, Sq, H, D = q.shape
        what = build_needed(fi, q.dtype, D)
        if what:
            _warn_before_build(what, (q.dtype, D))
        if layout.nnz == 0:
            return (torch.zeros_like(q),
                    torch.full((B, H, Sq), float("-inf"), dtype=torch.float32, device=q.device) if return_lse else None)
        kind = layout_plan_kind(layout, H, k.shape[2])
        key = ("flashinfer", kind, id(fi), str(q.device), q.dtype, H, k.shape[2], D, float(scale), B)
        runner = _PLANS.get(layout, key, lambda: _RUNNERS[kind](fi, layout, q, k, float(scale)))
        out, lse = runner(q, k, v, return_lse)
        _ready.add((q.dtype, D))
        empty = _empty_rows(layout)
        if empty is not None:
            _zero_rows(out, lse, empty.to(q.device))
        return out, lse


def _zero_rows(out: Tensor, lse: Optional[Tensor], empty: Tensor) -> None:
    """Rows without keys: output 0 and lse -inf (``empty`` bool ``[Hl, Sq]``, Hl = 1 or H)."""
    out.masked_fill_(empty.transpose(0, 1)[None, :, :, None], 0)   # [1, Sq, Hl, 1] broadcasts
    if lse is not None:
        lse.masked_fill_(empty[None], float("-inf"))


register(FlashInferBackend())
