"""The public call: `block_sparse_attn`."""
from __future__ import annotations

import logging
import math
from typing import Optional, Set, Tuple, Union

import torch
from torch import Tensor

from .dispatch import has_work, run_on, select_backend
from .reference.args import ArgumentError, as_flag, as_real
from .reference.layout import BlockSparseLayout
from .reference.plan import AttentionPlan, BlockMap

__all__ = ["PRECISIONS", "SCALE_CAP", "block_sparse_attn", "check_inputs", "check_permuted_inputs", "check_precision",
           "effective_scale"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
PRECISIONS = ("exact", "fp8", "int8_qk")
SCALE_CAP = 2.0 ** 100  # bound on |scale * q.k| handed to a backend (float32 overflows at 2^128)
FLOAT32_MAX = torch.finfo(torch.float32).max  # lse is float32; kernels scale scores in float32
log = logging.getLogger("lvsa_kernels")
_copied: Set[str] = set()


def check_precision(precision: object) -> str:
    """Return ``precision`` if it is one of `PRECISIONS`, else raise naming the value."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {list(PRECISIONS)}, got {precision!r}")
    return precision


def _with_contiguous_head_dim(name: str, t: Tensor) -> Tensor:
    """``t``, or a contiguous copy (logged once per argument) when its head dim (last dim) is strided:
    every kernel reads head-dim rows, so q, k and v are treated alike on every backend."""
    if t.stride(-1) == 1:
        return t
    if name not in _copied:
        _copied.add(name)
        log.warning("lvsa_kernels: %s has a strided head dim (stride %d); copying it to a contiguous tensor "
                    "(pass tensors whose last dim is contiguous to avoid the copy)", name, t.stride(-1))
    return t.contiguous()


def _order_hint(t: Tensor, tokens: int) -> str:
    """The expected axis order for a sequence-length mismatch, naming the transpose when ``t`` is ``[B, H, S, D]``."""
    if t.shape[2] == tokens:
        return f"(expected [B, S, H, D]; shape {tuple(t.shape)} looks like [B, H, S, D]: pass .transpose(1, 2))"
    return f"(expected [B, S, H, D], sequence on dim 1; got shape {tuple(t.shape)})"


def check_inputs(q: Tensor, k: Tensor, v: Tensor, layout: BlockSparseLayout) -> None:
    """Raise ValueError/TypeError naming the offending argument when inputs do not fit together."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor [B, S, H, D], got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected 4 dims [B, S, H, D], got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name}: expected dtype float16, bfloat16, float32 or float64, got {t.dtype}")
    if not isinstance(layout, BlockSparseLayout):
        raise TypeError(f"layout: expected a BlockSparseLayout, got {type(layout).__name__}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v: dtypes must match, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v: must be on one device, got {q.device}, {k.device}, {v.device}")
    B, Sq, H, D = q.shape
    if D < 1:
        raise ValueError(f"q: head dim must be >= 1, got shape {tuple(q.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k, v: shapes must match [B, Skv, H_kv, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != B:
        raise ValueError(f"k: batch {k.shape[0]} does not match q's batch {B}")
    if k.shape[3] != D:
        raise ValueError(f"k: head dim {k.shape[3]} does not match q's head dim {D}")
    Hkv = k.shape[2]
    if Hkv < 1 or H % Hkv:
        raise ValueError(f"k: H_kv={Hkv} must divide the number of query heads H={H}")
    if layout.q_len != Sq:
        raise ValueError(f"layout: covers {layout.q_len} query tokens but q has S={Sq} "
                         f"{_order_hint(q, layout.q_len)}")
    if layout.kv_len != k.shape[1]:
        raise ValueError(f"layout: covers {layout.kv_len} key tokens but k has S={k.shape[1]} "
                         f"{_order_hint(k, layout.kv_len)}")
    if layout.num_heads not in (1, H):
        raise ValueError(f"layout: has {layout.num_heads} heads; expected 1 (shared) or H={H}")


def check_permuted_inputs(q: Tensor, k: Tensor, v: Tensor, plan: AttentionPlan) -> None:
    """Raise ValueError/TypeError when q, k, v ``[B, S, H, D]`` do not fit a permuted plan (self-attention shapes,
    permutations ``[B, H, S]``, a `BlockMap` of ``B * H`` groups)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4 or t.dtype not in _DTYPES:
            raise TypeError(f"{name}: expected a float torch.Tensor [B, S, H, D], got {getattr(t, 'shape', type(t))}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v: a permuted plan needs equal shapes [B, S, H, D], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise TypeError(f"q, k, v: dtypes and devices must match, got {q.dtype}/{q.device}, {k.dtype}/{k.device}, "
                        f"{v.dtype}/{v.device}")
    B, S, H, _ = q.shape
    for name, perm in (("q_perm", plan.q_perm), ("k_perm", plan.k_perm)):
        if tuple(perm.shape) != (B, H, S):
            raise ValueError(f"plan.{name}: expected shape {(B, H, S)} for q of shape {tuple(q.shape)}, "
                             f"got {tuple(perm.shape)}")
    if not isinstance(plan.blocks, BlockMap) or (plan.blocks.batch, plan.blocks.heads) != (B, H):
        raise ValueError(f"plan.blocks: expected a BlockMap of batch {B} x {H} heads for q of shape {tuple(q.shape)}")


def effective_scale(q: Tensor, k: Tensor, scale: float) -> Tuple[float, float]:
    """``(scale a backend runs with, factor for its lse)``: any finite ``scale`` gives the float64 answer.

    Scores ``scale * q.k`` are bounded by ``|scale| * max|q| * max|k|`` (row 2-norms). When that bound
    exceeds `SCALE_CAP` (checked only for ``|scale| > 1``, so ordinary calls cost nothing), the scale is
    lowered to ``sign(scale) * SCALE_CAP / bound``. Softmax is then already a hard maximum: scores that
    differ by at least ``2^-24 * bound`` (float32's resolution at the largest possible score) differ by
    ``>= 2^76`` after scaling, far beyond exp's range, so ``out`` keeps the float64 answer of the original
    scale and nothing overflows. lse is multiplied back by ``scale / capped``, exact
    when a row's maximum score is attained once (with t tied maxima it is off by ``(factor - 1) * log t``).
    Inputs holding inf/NaN (even outside the layout) and ``torch.compile`` tracing skip the cap. All-zero
    q or k (every score 0) run with scale 1 (same output and lse). A scale beyond float32's range on inputs
    whose scores stay below `SCALE_CAP` cannot be run in float32 and raises `ArgumentError` naming ``scale``.
    """
    if abs(scale) <= 1.0 or torch.compiler.is_compiling() or q.numel() == 0 or k.numel() == 0:
        return scale, 1.0
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    bound = float(torch.linalg.vector_norm(q.detach(), dim=-1, dtype=acc).amax()) * \
        float(torch.linalg.vector_norm(k.detach(), dim=-1, dtype=acc).amax())
    if bound == 0.0:
        return 1.0, 1.0
    if not math.isfinite(bound) or abs(scale) * bound <= SCALE_CAP:
        if abs(scale) > FLOAT32_MAX and math.isfinite(bound):
            raise ArgumentError(f"scale: {scale:g} exceeds float32's range ({FLOAT32_MAX:.4g}) while these inputs' "
                                f"scores are at most {bound:.4g} (no hard maximum to fall back on); expected "
                                f"|scale| <= {FLOAT32_MAX:.4g}")
        return scale, 1.0
    capped = math.copysign(SCALE_CAP / bound, scale)
    return capped, scale / capped


def _scaled_lse(lse: Tensor, factor: float, scale: float) -> Tensor:
    """``lse * factor`` (the lse of the original scale, see `effective_scale`); `ArgumentError` when it leaves
    float32's range on a row with keys (lse is float32; ``out`` would be exact, so the caller can drop lse)."""
    scaled = lse.double() * factor
    if bool(((scaled.abs() > FLOAT32_MAX) & torch.isfinite(lse)).any()):
        raise ArgumentError(f"scale: at {scale:g} the lse (scale times a row's largest score) exceeds float32's "
                            f"range ({FLOAT32_MAX:.4g}) on rows with keys; pass a smaller |scale|, or "
                            f"return_lse=False (out is exact)")
    return scaled.float()


def block_sparse_attn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: Union[BlockSparseLayout, AttentionPlan],
    *,
    backend: str = "auto",
    scale: Optional[float] = None,
    return_lse: bool = False,
    precision: str = "exact",
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Block-sparse attention ``softmax(q k^T * scale, masked by layout) v``.

    Args:
        q: ``[B, Sq, H, D]``; k, v: ``[B, Skv, H_kv, D]`` (``H % H_kv == 0``); fp16/bf16 (fp32 where the
            backend allows). Strided views are fine; a strided last (head) dim is copied once, with a WARNING.
        layout: `BlockSparseLayout` over ``Sq`` x ``Skv`` tokens, shared (1 head) or per head (H heads); or an
            `AttentionPlan` (what a pattern's ``plan`` returns). A plan with a token permutation (SVOO) needs
            q, k, v of one shape; the backend runs it on permuted tokens and the output is in token order.
        backend: ``"auto"`` (fastest eligible backend, measured once and cached; env
            ``LVSA_KERNELS_BACKEND`` overrides) or one of ``"triton"``, ``"flashinfer"``, ``"npu"``,
            ``"sdpa"``, ``"reference"``. An explicit backend that cannot run raises `BackendUnavailable`.
        scale: softmax scale, any finite real (0 and negative included), default ``1 / sqrt(D)``; see
            `effective_scale` for very large ones. Non-finite or non-numeric: ValueError.
        return_lse: also return lse ``[B, H, Sq]`` (float32, natural log; -inf for rows with no keys).
        precision: ``"exact"`` (default: MMAs in the input dtype), ``"fp8"`` (opt-in 8-bit: Q K^T in INT8
            with per-tile / per-128-key scales after smoothing K, P V in FP8 e4m3; fp16/bf16 inputs, the
            ``triton`` backend on CUDA sm_89+ or in Triton's CPU interpreter) or ``"int8_qk"`` (INT8 Q K^T,
            P V in the input dtype). See docs/fp8.md for accuracy. ``auto`` only picks backends that run
            the requested precision and never changes it; none available raises `BackendUnavailable`.

    Differentiable: when q, k or v require grad, ``out`` and ``lse`` carry gradients (Triton's block-sparse
    backward kernels, or autograd through ``sdpa`` / ``reference``); backends without a backward are not chosen
    (explicitly named, they raise `BackendUnavailable`); the 8-bit precisions have no backward.

    Returns:
        ``out [B, Sq, H, D]`` in q's dtype, or ``(out, lse)``. Without work (batch, sequence or heads of
        size 0, or a layout selecting no key) every backend gives zeros and lse -inf without running
        (an explicitly named backend is still checked, so the same inputs raise the same errors).
    """
    if isinstance(layout, AttentionPlan) and not layout.permuted:
        layout = layout.blocks
    if isinstance(layout, AttentionPlan):
        check_permuted_inputs(q, k, v, layout)
    else:
        check_inputs(q, k, v, layout)
    check_precision(precision)
    q, k, v = (_with_contiguous_head_dim(n, t) for n, t in (("q", q), ("k", k), ("v", v)))
    return_lse = as_flag("return_lse", return_lse)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else as_real("scale", scale)
    chosen = select_backend(backend, q, k, v, layout, scale, return_lse, precision)
    if not has_work(q, layout):
        out = q.new_zeros(q.shape)
        if q.requires_grad and torch.is_grad_enabled():  # zeros that backpropagate zeros (NaN-safe, unlike q * 0)
            out = torch.where(torch.zeros_like(q, dtype=torch.bool), q, out)
        lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), dtype=torch.float32, device=q.device)
    else:
        run_scale, lse_factor = effective_scale(q, k, scale)
        out, lse = run_on(chosen, q, k, v, layout, run_scale, return_lse, precision)
        if return_lse and lse_factor != 1.0:
            lse = _scaled_lse(lse, lse_factor, scale)
    return (out, lse) if return_lse else out
