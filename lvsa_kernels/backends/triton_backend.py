"""`triton` backend: the hand-written block-sparse kernels of `lvsa_kernels.triton_src`.

Layouts run on the block-sparse kernel; permuted plans (SVOO) run on the cluster kernel, which reads queries
and writes outputs through the permutation (`run_permuted`).

Runs on CUDA tensors (fp16/bf16/fp32), or on CPU tensors in Triton's interpreter when
``TRITON_INTERPRET=1`` (fp16/fp32 only: bf16 ``tl.dot`` is wrong in the interpreter, triton#11584).
The launch config is tuned once per problem class on the real inputs and cached on disk
(`lvsa_kernels.triton_src.tuning`); ``LVSA_KERNELS_TRITON_AUTOTUNE=0`` uses the default config instead.
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
from .base import Backend, Capabilities, register

log = logging.getLogger("lvsa_kernels")
AUTOTUNE_ENV = "LVSA_KERNELS_TRITON_AUTOTUNE"
_CONFIGS = LayoutMemo()   # per layout: the launch config of each device/dtype/head-dim class


_HAS_TRITON = importlib.util.find_spec("triton") is not None


class TritonBackend(Backend):
    name = "triton"
    caps = Capabilities(devices=frozenset({"cuda", "cpu"}),
                        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
                        head_dims=frozenset({16, 32, 64, 128}))

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        if not _HAS_TRITON:
            return "the 'triton' package is not installed"
        if device.type == "cpu" and not tuning.interpreting():
            return "CPU tensors run only in Triton's interpreter (set TRITON_INTERPRET=1 before importing lvsa_kernels)"
        if device.type == "cuda" and tuning.interpreting():
            return "TRITON_INTERPRET=1 is set: the interpreter runs on CPU tensors only"
        return None

    def unsupported_reason(self, q: Tensor, k: Tensor, layout: BlockSparseLayout, return_lse: bool) -> Optional[str]:
        return super().unsupported_reason(q, k, layout, return_lse) or _tensor_reason(q, k)

    def unsupported_permuted_reason(self, q: Tensor, k: Tensor, return_lse: bool) -> Optional[str]:
        return super().unsupported_permuted_reason(q, k, return_lse) or _tensor_reason(q, k)

    def run(self, q, k, v, layout, scale, return_lse):
        if v.stride(-1) != 1:
            raise ValueError("v: the head dim (last dim) must be contiguous")
        cfg = config_for(q, k, v, layout, scale)
        out, lse = _run(q, k, v, layout, scale, cfg)
        return out, (lse if return_lse else None)

    def run_permuted(self, q, k, v, plan, scale, return_lse):
        """The cluster path: keys and values permuted once, the schedule planned on the device from the plan's
        block map, queries read and outputs written through the query permutation by the packed cluster kernel
        (no host synchronisation, no host layouts)."""
        if v.stride(-1) != 1:
            raise ValueError("v: the head dim (last dim) must be contiguous")
        from ..triton_src import cluster_path

        B, S, H, _ = q.shape
        blocks = plan.blocks
        kp, vp = cluster_path.permute_keys(k, v, plan.k_perm.reshape(B * H, S))
        out, lse = cluster_path.attend(q, kp, vp, blocks.q_sizes, blocks.k_sizes, plan.q_perm.reshape(B * H, S),
                                       blocks.mask, scale)
        return out, (lse if return_lse else None)


def _tensor_reason(q: Tensor, k: Tensor) -> Optional[str]:
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        return "bf16 tl.dot is wrong in the Triton interpreter (triton#11584); use fp16/fp32 on CPU"
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        return "the head dim (last dim) of q, k and v must be contiguous"
    return None


def _run(q: Tensor, k: Tensor, v: Tensor, layout: BlockSparseLayout, scale: float, cfg):
    from ..triton_src.launch import run_scheduled
    from ..triton_src.schedule import build_key_tiles, build_schedule

    sched = build_schedule(layout, cfg.block_m, q.device)
    key_tiles = build_key_tiles(layout, cfg.block_n, q.device) if cfg.kernel == "hopper" else None
    return run_scheduled(q, k, v, sched, layout.num_heads > 1, scale, cfg, key_tiles=key_tiles)


def config_for(q: Tensor, k: Tensor, v: Tensor, layout: BlockSparseLayout, scale: float):
    """The launch config for these inputs, memoised on the layout.

    Eager calls tune on first use (see `choose_config`). Under ``torch.compile`` nothing can be timed
    or built, so the config (and schedule) cached by an earlier eager call are reused; without one a
    clear error asks for an eager warm-up call.
    """
    tma_strides = _tma_strides_ok(q, k, v)
    key = ("triton_config", q.device.type, q.device.index, q.dtype, q.shape[-1], tma_strides)
    if torch.compiler.is_compiling():
        cfg = _CONFIGS.peek(layout, key)
        if cfg is None:
            raise RuntimeError(
                "lvsa_kernels triton backend: no tuned config for this layout yet; call block_sparse_attn once "
                "outside torch.compile (a warm-up) so the kernel is tuned and its schedule is built")
        return cfg
    return _CONFIGS.get(layout, key, lambda: choose_config(q, k, v, layout, scale))


def _tma_strides_ok(q: Tensor, k: Tensor, v: Tensor) -> bool:
    e = k.element_size()
    return all((s * e) % 16 == 0 for t in (q, k, v) for s in t.stride()[:3])


def config_key(q: Tensor, k: Tensor, v: Tensor, layout: BlockSparseLayout) -> str:
    """The tuning-cache key of these inputs: the problem class plus the kernels that may compete for it
    (so a config tuned where the Hopper kernel could not run is not reused where it can)."""
    from ..triton_src.launch import hopper_eligible, tma_eligible

    kernels = "|hopper" if hopper_eligible(q, k, v) else "|tma" if tma_eligible(q, k, v) else "|no-tma"
    return tuning.tuning_key(q.device, q.dtype, q.shape[-1], layout.typical_q_block) + kernels


def choose_config(q: Tensor, k: Tensor, v: Tensor, layout: BlockSparseLayout, scale: float, retune: bool = False):
    """Tuned config from the disk cache, else tune now on these inputs (interpreter: fixed small config)."""
    if tuning.interpreting():
        return tuning.INTERPRETER_CONFIG
    from ..triton_src.launch import hopper_eligible, tma_eligible

    tma_ok = tma_eligible(q, k, v)
    hopper_ok = hopper_eligible(q, k, v)
    key = config_key(q, k, v, layout)
    cfg = None if retune else tuning.lookup(key)
    if cfg is not None:
        return cfg
    candidates = tuning.candidate_configs(q.shape[-1], tma_ok, q.dtype, hopper_ok)
    if os.environ.get(AUTOTUNE_ENV, "1") == "0":
        return candidates[0]
    import triton.testing

    def bench(cfg) -> float:
        return triton.testing.do_bench(lambda: _run(q, k, v, layout, scale, cfg),
                                       warmup=50, rep=500, return_mode="median")

    log.info("lvsa_kernels triton: tuning %d configs for %s", len(candidates), key)
    best = tuning.tune(key, candidates, bench)
    log.info("lvsa_kernels triton: chose %s for %s", best, key)
    return best


register(TritonBackend())
