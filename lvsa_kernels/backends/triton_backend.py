"""`triton` backend: the hand-written block-sparse kernels of `lvsa_kernels.triton_src`.

Layouts run on the block-sparse kernel; permuted plans (SVOO) run on the cluster kernel, which reads queries
and writes outputs through the permutation (`run_permuted`).

Runs on CUDA tensors (fp16/bf16/fp32), or on CPU tensors in Triton's interpreter when
``TRITON_INTERPRET=1`` (fp16/fp32 only: bf16 ``tl.dot`` is wrong in the interpreter, triton#11584).
Precisions ``"fp8"`` and ``"int8_qk"`` (8-bit, see docs/fp8.md) need fp16/bf16 inputs, head dim >= 32
and CUDA sm_89+ (or the interpreter). The launch config is tuned once per problem class (and precision)
on the real inputs and cached on disk
(`lvsa_kernels.triton_src.tuning`); ``LVSA_KERNELS_TRITON_AUTOTUNE=0`` uses the default config instead.

Inputs that require grad run the differentiable path (`triton_src.backward_launch`): the tuned forward kernel
(portable or Hopper) and the portable block-sparse backward kernels (precision ``"exact"``; permuted plans
through per-batch host layouts).
"""
from __future__ import annotations

import importlib.util
import logging
import os
from typing import Optional

import torch
from torch import Tensor

from ..reference.layout import BlockSparseLayout, LayoutMemo
from ..triton_src import tuning  # no Triton import: kernels are imported on the first call (always eager, see config_for)
from .base import Backend, Capabilities, needs_grad, register

log = logging.getLogger("lvsa_kernels")
AUTOTUNE_ENV = "LVSA_KERNELS_TRITON_AUTOTUNE"
_CONFIGS = LayoutMemo()   # per layout: the launch config of each device/dtype/head-dim class


_HAS_TRITON = importlib.util.find_spec("triton") is not None


class TritonBackend(Backend):
    name = "triton"
    caps = Capabilities(devices=frozenset({"cuda", "cpu"}),
                        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
                        head_dims=frozenset({16, 32, 64, 128}),
                        precisions=frozenset({"exact", "fp8", "int8_qk"}), backward=True)

    @property
    def notes(self) -> str:
        return kernel_note()

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        if not _HAS_TRITON:
            return "the 'triton' package is not installed"
        if device.type == "cpu" and not tuning.interpreting():
            return ("CPU tensors run only in Triton's interpreter (set TRITON_INTERPRET=1 before importing lvsa_kernels; "
                    "`python -m lvsa_kernels demo` sets it itself when there is no CUDA, so demo runs Triton on CPU)")
        if device.type == "cuda" and tuning.interpreting():
            return "TRITON_INTERPRET=1 is set: the interpreter runs on CPU tensors only"
        return None

    def precision_reason(self, precision: str, q: Tensor) -> Optional[str]:
        reason = super().precision_reason(precision, q)
        if reason or precision == "exact":
            return reason
        if q.dtype not in (torch.float16, torch.bfloat16):
            return f"precision={precision!r} quantizes float16/bfloat16 inputs, got {q.dtype}"
        if q.shape[-1] < 32:
            return f"precision={precision!r} needs head dim >= 32 (8-bit MMAs reduce over 32), got {q.shape[-1]}"
        if q.device.type == "cuda" and torch.cuda.get_device_capability(q.device) < (8, 9):
            cap = torch.cuda.get_device_capability(q.device)
            return (f"precision={precision!r} needs FP8 tensor cores (CUDA sm_89+: Ada, Hopper or newer); "
                    f"{torch.cuda.get_device_name(q.device)} is sm_{cap[0]}{cap[1]}")
        return None

    def unsupported_reason(self, q: Tensor, k: Tensor, layout: BlockSparseLayout, return_lse: bool) -> Optional[str]:
        return super().unsupported_reason(q, k, layout, return_lse) or _tensor_reason(q, k)

    def unsupported_permuted_reason(self, q: Tensor, k: Tensor, return_lse: bool) -> Optional[str]:
        return super().unsupported_permuted_reason(q, k, return_lse) or _tensor_reason(q, k)

    def run(self, q, k, v, layout, scale, return_lse, precision="exact"):
        if v.stride(-1) != 1:
            raise ValueError("v: the head dim (last dim) must be contiguous")
        if needs_grad(q, k, v):
            return _run_trainable(q, k, v, layout, scale, precision, return_lse)
        cfg = config_for(q, k, v, layout, scale, precision)
        out, lse = _run(q, k, v, layout, scale, cfg, precision)
        return out, (lse if return_lse else None)

    def run_permuted(self, q, k, v, plan, scale, return_lse, precision="exact"):
        """The cluster path: keys and values permuted once, the schedule planned on the device from the plan's
        block map, queries read and outputs written through the query permutation by the packed cluster kernel
        (no host synchronisation, no host layouts). The cluster kernel is exact only: an 8-bit precision runs
        the per-batch host layouts on permuted tokens (`Backend.run_permuted`)."""
        if precision != "exact" or needs_grad(q, k, v):  # the cluster kernel has no backward either
            return super().run_permuted(q, k, v, plan, scale, return_lse, precision=precision)
        if v.stride(-1) != 1:
            raise ValueError("v: the head dim (last dim) must be contiguous")
        from ..triton_src import cluster_path

        B, S, H, _ = q.shape
        blocks = plan.blocks
        kp, vp = cluster_path.permute_keys(k, v, plan.k_perm.reshape(B * H, S))
        out, lse = cluster_path.attend(q, kp, vp, blocks.q_sizes, blocks.k_sizes, plan.q_perm.reshape(B * H, S),
                                       blocks.mask, scale)
        return out, (lse if return_lse else None)


def kernel_note() -> str:
    """Which of the two kernels CUDA inputs get on this machine: the Gluon Hopper kernel (sm_90, a Triton release
    it is tested with) or the portable one, and why not the Hopper kernel when it cannot run."""
    if not _HAS_TRITON:
        return ""
    import triton

    from ..triton_src.gluon_compat import GPU_VERIFIED_TRITON, TESTED_TRITON, hopper_triton_refusal
    from ..triton_src.launch import hopper_device_refusal

    tested = (f"Triton {triton.__version__} (Hopper kernel offered on {', '.join(TESTED_TRITON)}, compiled by CI "
              f"against each; GPU-tested on {', '.join(GPU_VERIFIED_TRITON)})")
    conditions = ("bf16/fp16 inputs with head dim 64 or 128 and 16-byte aligned rows; the portable kernel runs "
                  "everything else")
    if not torch.cuda.is_available():
        refusal = hopper_triton_refusal()
        return (f"{tested}. Hopper kernel: needs an sm_90 GPU (none here)"
                + ("" if refusal is None else f"; and here: {refusal}"))
    refusal = hopper_device_refusal(torch.device("cuda"))
    if refusal is None:
        return f"{tested}. Hopper kernel ON for {conditions}"
    return f"{tested}. Hopper kernel OFF ({refusal}): the portable kernel runs every CUDA call"


def _log_hopper_refusal_once(reason: str) -> None:
    """One INFO line per process when CUDA inputs get the portable kernel because of the GPU or the Triton
    release (`launch.hopper_device_refusal`)."""
    global _hopper_refusal_logged
    if not _hopper_refusal_logged:
        _hopper_refusal_logged = True
        log.info("lvsa_kernels triton: Hopper kernel not used: %s", reason)


_hopper_refusal_logged = False


def _tensor_reason(q: Tensor, k: Tensor) -> Optional[str]:
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        return "bf16 tl.dot is wrong in the Triton interpreter (triton#11584); use fp16/fp32 on CPU"
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        return "the head dim (last dim) of q, k and v must be contiguous"
    return None


def _run(q: Tensor, k: Tensor, v: Tensor, layout: BlockSparseLayout, scale: float, cfg, precision: str = "exact"):
    from ..triton_src.launch import run_scheduled
    from ..triton_src.schedule import build_key_tiles, build_schedule

    sched = build_schedule(layout, cfg.block_m, q.device)
    key_tiles = build_key_tiles(layout, cfg.block_n, q.device, precision) if cfg.kernel == "hopper" else None
    return run_scheduled(q, k, v, sched, layout.num_heads > 1, scale, cfg, precision=precision, key_tiles=key_tiles)


def _run_trainable(q: Tensor, k: Tensor, v: Tensor, layout: BlockSparseLayout, scale: float, precision: str,
                   return_lse: bool):
    """The differentiable path (`triton_src.backward_launch`): the forward kernel (portable or Hopper) at the
    tuned config, then the portable backward kernels."""
    from ..triton_src.backward_launch import backward_config, run_trainable

    if precision != "exact":
        raise ValueError(f"precision={precision!r} has no backward (q, k or v requires grad); use precision='exact'")
    with torch.no_grad():  # tuning times the inference forward
        cfg = config_for(q, k, v, layout, scale, precision)
    out, lse = run_trainable(q, k, v, layout, scale, cfg, backward_config(q.dtype, q.shape[-1], q.device))
    return out, (lse if return_lse else None)


def config_for(q: Tensor, k: Tensor, v: Tensor, layout: BlockSparseLayout, scale: float, precision: str = "exact"):
    """The launch config for these inputs, memoised on the layout.

    Eager calls tune on first use (see `choose_config`). Under ``torch.compile`` nothing can be timed
    or built, so the config (and schedule) cached by an earlier eager call are reused; without one a
    clear error asks for an eager warm-up call.
    """
    tma_strides = _tma_strides_ok(q, k, v)
    # addresses too: a TMA config chosen for aligned tensors must not run on a misaligned view of the same layout
    aligned = torch.compiler.is_compiling() or all(t.data_ptr() % 16 == 0 for t in (q, k, v))
    key = ("triton_config", q.device.type, q.device.index, q.dtype, q.shape[-1], tma_strides, aligned, precision)
    if torch.compiler.is_compiling():
        cfg = _CONFIGS.peek(layout, key)
        if cfg is None:
            raise RuntimeError(
                "lvsa_kernels triton backend: no tuned config for this layout yet; call block_sparse_attn once "
                "outside torch.compile (a warm-up) so the kernel is tuned and its schedule is built")
        return cfg
    return _CONFIGS.get(layout, key, lambda: choose_config(q, k, v, layout, scale, precision=precision))


def _tma_strides_ok(q: Tensor, k: Tensor, v: Tensor) -> bool:
    e = k.element_size()
    return all((s * e) % 16 == 0 for t in (q, k, v) for s in t.stride()[:3])


def _config_can_run(cfg, hopper_ok: bool, tma_ok: bool, precision: str) -> bool:
    """Whether a cached config fits these inputs (a hand-edited or stale cache entry is tuned again)."""
    if cfg.kernel == "hopper":
        return hopper_ok and (precision == "fp8" or not cfg.fp8_only)
    return not cfg.use_tma or (tma_ok and precision != "fp8")


def config_key(q: Tensor, k: Tensor, v: Tensor, layout: BlockSparseLayout, precision: str = "exact") -> str:
    """The tuning-cache key of these inputs: the problem class, the precision, and the kernels that may compete
    for it (so a config tuned where the Hopper kernel could not run is not reused where it can)."""
    from ..triton_src.launch import descriptors_allowed, hopper_supports

    tma_ok = descriptors_allowed(k, v) and precision != "fp8"  # the portable fp8 mode reads without TMA, see below
    kernels = "|hopper" if hopper_supports(q, k, v) else "|tma" if tma_ok else "|no-tma"
    if precision != "exact":
        kernels = f"|{precision}" + kernels
    return tuning.tuning_key(q.device, q.dtype, q.shape[-1], layout.typical_q_block) + kernels


def choose_config(q: Tensor, k: Tensor, v: Tensor, layout: BlockSparseLayout, scale: float, retune: bool = False,
                  precision: str = "exact"):
    """Tuned config from the disk cache, else tune now on these inputs (interpreter: fixed small config)."""
    if tuning.interpreting():
        return tuning.INTERPRETER_CONFIG
    from ..triton_src.launch import descriptors_allowed, hopper_device_refusal, hopper_supports

    tma_ok = descriptors_allowed(k, v)
    hopper_ok = hopper_supports(q, k, v)
    device_refusal = hopper_device_refusal(q.device)
    if device_refusal is not None:
        _log_hopper_refusal_once(device_refusal)
    key = config_key(q, k, v, layout, precision)
    cfg = None if retune else tuning.lookup(key)
    if cfg is not None and _config_can_run(cfg, hopper_ok, tma_ok, precision):
        return cfg
    # FP8 P V reads V^T column blocks; through a tensor descriptor (TMA) a block starting at a token offset
    # that is not a multiple of 16 is an illegal instruction on an H200 (Triton 3.6; bench/results/
    # h200_fp8_align_run2.log). The portable fp8 mode therefore reads K and V^T with pointer loads; the
    # Hopper kernel loads aligned blocks and masks (`block_sparse_hopper._tile_origin`).
    candidates = tuning.candidate_configs(q.shape[-1], tma_ok and precision != "fp8", q.dtype, hopper_ok, precision)
    if os.environ.get(AUTOTUNE_ENV, "1") == "0":
        return candidates[0]
    import triton.testing

    def bench(cfg) -> float:
        return triton.testing.do_bench(lambda: _run(q, k, v, layout, scale, cfg, precision),
                                       warmup=50, rep=500, return_mode="median")

    log.info("lvsa_kernels triton: tuning %d configs for %s", len(candidates), key)
    best = tuning.tune(key, candidates, bench)
    log.info("lvsa_kernels triton: chose %s for %s", best, key)
    return best


register(TritonBackend())
