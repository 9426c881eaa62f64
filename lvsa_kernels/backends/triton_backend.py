"""`triton` backend: the hand-written block-sparse kernel of `lvsa_kernels.triton_src`.

Runs on CUDA tensors (fp16/bf16/fp32), or on CPU tensors in Triton's interpreter when
``TRITON_INTERPRET=1`` (fp16/fp32 only: bf16 ``tl.dot`` is wrong in the interpreter, triton#11584).
Precisions ``"fp8"`` and ``"int8_qk"`` (8-bit, see docs/fp8.md) need fp16/bf16 inputs, head dim >= 32
and CUDA sm_89+ (or the interpreter). The launch config is tuned once per problem class (and precision)
on the real inputs and cached on disk
(`lvsa_kernels.triton_src.tuning`); ``LVSA_KERNELS_TRITON_AUTOTUNE=0`` uses the default config instead.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from typing import Optional

import torch
from torch import Tensor

from ..reference import BlockSparseLayout
from .base import Backend, Capabilities, register

log = logging.getLogger("lvsa_kernels")
AUTOTUNE_ENV = "LVSA_KERNELS_TRITON_AUTOTUNE"


_HAS_TRITON = importlib.util.find_spec("triton") is not None
if _HAS_TRITON:  # imported eagerly so the custom op exists before any torch.compile trace
    from ..triton_src import tuning
    from ..triton_src.launch import run_scheduled, tma_eligible
    from ..triton_src.schedule import build_schedule


class TritonBackend(Backend):
    name = "triton"
    caps = Capabilities(devices=frozenset({"cuda", "cpu"}),
                        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
                        head_dims=frozenset({16, 32, 64, 128}),
                        precisions=frozenset({"exact", "fp8", "int8_qk"}))

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        if not _HAS_TRITON:
            return "the 'triton' package is not installed"
        if device.type == "cpu" and not tuning.interpreting():
            return "CPU tensors run only in Triton's interpreter (set TRITON_INTERPRET=1 before importing lvsa_kernels)"
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
        reason = super().unsupported_reason(q, k, layout, return_lse)
        if reason:
            return reason
        if q.device.type == "cpu" and q.dtype == torch.bfloat16:
            return "bf16 tl.dot is wrong in the Triton interpreter (triton#11584); use fp16/fp32 on CPU"
        if q.stride(-1) != 1 or k.stride(-1) != 1:
            return "the head dim (last dim) of q, k and v must be contiguous"
        return None

    def run(self, q, k, v, layout, scale, return_lse, precision="exact"):
        if v.stride(-1) != 1:
            raise ValueError("v: the head dim (last dim) must be contiguous")
        cfg = config_for(q, k, v, layout, scale, precision)
        sched = build_schedule(layout, cfg.block_m, q.device)
        out, lse = run_scheduled(q, k, v, sched, layout.num_heads > 1, scale, cfg, precision=precision)
        return out, (lse if return_lse else None)


def config_for(q: Tensor, k: Tensor, v: Tensor, layout: BlockSparseLayout, scale: float, precision: str = "exact"):
    """The launch config for these inputs, memoised on the layout.

    Eager calls tune on first use (see `choose_config`). Under ``torch.compile`` nothing can be timed
    or built, so the config (and schedule) cached by an earlier eager call are reused; without one a
    clear error asks for an eager warm-up call.
    """
    tma_strides = _tma_strides_ok(k, v)
    key = ("triton_config", q.device.type, q.device.index, q.dtype, q.shape[-1], tma_strides, precision)
    if torch.compiler.is_compiling():
        cfg = layout.cached_or_none(key)
        if cfg is None:
            raise RuntimeError(
                "lvsa_kernels triton backend: no tuned config for this layout yet; call block_sparse_attn once "
                "outside torch.compile (a warm-up) so the kernel is tuned and its schedule is built")
        return cfg
    return layout.cached(key, lambda: choose_config(q, k, v, layout, scale, precision=precision))


def _tma_strides_ok(k: Tensor, v: Tensor) -> bool:
    e = k.element_size()
    return all((s * e) % 16 == 0 for t in (k, v) for s in t.stride()[:3])


def choose_config(q: Tensor, k: Tensor, v: Tensor, layout: BlockSparseLayout, scale: float, retune: bool = False,
                  precision: str = "exact"):
    """Tuned config from the disk cache, else tune now on these inputs (interpreter: fixed small config)."""
    if tuning.interpreting():
        return tuning.INTERPRETER_CONFIG
    key = tuning.tuning_key(q.device, q.dtype, q.shape[-1], layout.typical_q_block)
    if precision != "exact":
        key += f"|{precision}"
    cfg = None if retune else tuning.lookup(key)
    tma_ok = tma_eligible(q, k, v)
    if cfg is not None and (tma_ok or not cfg.use_tma):
        return cfg
    candidates = tuning.candidate_configs(q.shape[-1], tma_ok, q.dtype)
    if os.environ.get(AUTOTUNE_ENV, "1") == "0":
        return candidates[0]
    import triton.testing

    per_head = layout.num_heads > 1

    def bench(cfg) -> float:
        sched = build_schedule(layout, cfg.block_m, q.device)
        return triton.testing.do_bench(lambda: run_scheduled(q, k, v, sched, per_head, scale, cfg, precision=precision),
                                       warmup=50, rep=500, return_mode="median")

    log.info("lvsa_kernels triton: tuning %d configs for %s", len(candidates), key)
    best = tuning.tune(key if tma_ok else key + "|no-tma", candidates, bench)
    log.info("lvsa_kernels triton: chose %s for %s", best, key)
    return best


register(TritonBackend())
