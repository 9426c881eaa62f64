"""The benchmarked methods: dense SDPA, FlexAttention, FlashInfer (direct), and ours through `block_sparse_attn`.

Every method is a factory ``prepare(q, k, v, layout, case) -> Prepared``: set-up, planning and compilation
happen inside ``prepare``; the returned object is the timed call (``prepared()``). Inputs are ``[B, S, H, D]``.
A method that cannot run a case says why through ``skip_reason`` or by raising `MethodSkipped` from
``prepare``; the harness records the reason and goes on.
"""
from __future__ import annotations

import importlib.util
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lvsa_kernels import block_sparse_attn
from lvsa_kernels.backends import registered_backends
from lvsa_kernels.interop import to_flashinfer_bsr, to_flex_block_mask
from lvsa_kernels.reference import BlockSparseLayout

from .shapes import BenchCase

__all__ = ["Method", "MethodSkipped", "Prepared", "METHODS", "GPU_DEFAULT_METHODS", "CPU_SMOKE_METHODS",
           "DENSE_METHODS"]


class MethodSkipped(RuntimeError):
    """A method cannot run this case here; the message is the recorded reason."""


@dataclass
class Prepared:
    """A ready-to-time call.

    ``fn()`` returns the output; ``to_bshd`` views it as ``[B, S, H, D]``; ``out_buffer`` is the buffer ``fn``
    writes into when the method takes one (the harness poisons it before the checked run).
    """

    fn: Callable[[], Tensor]
    to_bshd: Callable[[Tensor], Tensor] = lambda o: o
    out_buffer: Optional[Tensor] = None
    info: Dict[str, Any] = field(default_factory=dict)

    def __call__(self) -> Tensor:
        return self.fn()


Factory = Callable[[Tensor, Tensor, Tensor, BlockSparseLayout, BenchCase], Prepared]
SkipCheck = Callable[[Tensor, Tensor, BlockSparseLayout, BenchCase], Optional[str]]


@dataclass(frozen=True)
class Method:
    """A benchmarked method. ``dense`` methods compute every (query, key) pair, whatever the layout."""

    name: str
    label: str
    prepare: Factory
    skip_reason: SkipCheck
    dense: bool = False
    tolerance: Optional[float] = None  # relative error allowed; None: the harness's per-dtype TOLERANCE


def _scale(q: Tensor) -> float:
    return 1.0 / math.sqrt(q.shape[-1])


def _bhsd(*ts: Tensor) -> Tuple[Tensor, ...]:
    return tuple(t.transpose(1, 2).contiguous() for t in ts)


def _bhsd_to_bshd(o: Tensor) -> Tensor:
    return o.transpose(1, 2)


# ----------------------------------------------------------------------------- dense SDPA
def _needs_cuda(q: Tensor, k: Tensor, layout: BlockSparseLayout, case: BenchCase) -> Optional[str]:
    return None if q.device.type == "cuda" else f"needs a CUDA device, inputs are on {q.device.type}"


def _always(q: Tensor, k: Tensor, layout: BlockSparseLayout, case: BenchCase) -> Optional[str]:
    return None


def _dense_factory(sdpa_backend: Optional[str]) -> Factory:
    """Dense SDPA over all tokens, restricted to one SDPA backend (None: PyTorch's default dispatch)."""

    def prepare(q: Tensor, k: Tensor, v: Tensor, layout: BlockSparseLayout, case: BenchCase) -> Prepared:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        qt, kt, vt = _bhsd(q, k, v)
        gqa = kt.shape[1] != qt.shape[1]
        scale = _scale(q)
        if sdpa_backend is None:
            def fn() -> Tensor:
                return F.scaled_dot_product_attention(qt, kt, vt, scale=scale, enable_gqa=gqa)
        else:
            backends = [getattr(SDPBackend, sdpa_backend)]

            def fn() -> Tensor:
                with sdpa_kernel(backends):
                    return F.scaled_dot_product_attention(qt, kt, vt, scale=scale, enable_gqa=gqa)
        return Prepared(fn, _bhsd_to_bshd, info={"sdpa_backend": sdpa_backend or "default"})

    return prepare


# ----------------------------------------------------------------------------- FlexAttention
FLEX_MASK_BUILDERS = ("create_block_mask", "layout")


def _flex_mask_create(layout: BlockSparseLayout, device: torch.device):
    """``create_block_mask(_compile=True)`` over O(S) token->block tables and the small block mask."""
    from torch.nn.attention.flex_attention import create_block_mask

    qb = BlockSparseLayout.token_to_block(layout.q_offsets).to(device)    # [Ho, Sq]
    kb = BlockSparseLayout.token_to_block(layout.kv_offsets).to(device)   # [Ho, Skv]
    allowed = layout.to_block_mask().to(device)                           # [Hl, nQB, nKB]
    if layout.num_heads == 1:
        qb0, kb0, al0 = qb[0], kb[0], allowed[0]

        def mask_mod(b, h, q_idx, kv_idx):
            return al0[qb0[q_idx], kb0[kv_idx]]
    else:
        qbh = qb.expand(layout.num_heads, -1)
        kbh = kb.expand(layout.num_heads, -1)

        def mask_mod(b, h, q_idx, kv_idx):
            return allowed[h, qbh[h, q_idx], kbh[h, kv_idx]]
    return create_block_mask(mask_mod, 1, layout.num_heads, layout.q_len, layout.kv_len, device=str(device),
                             BLOCK_SIZE=128, _compile=True)


def _is_smem_oom(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}".lower()
    return "outofresources" in text.replace(" ", "") or "out of resource" in text or "shared memory" in text


def flex_factory(mask_builder: str = "create_block_mask") -> Factory:
    """FlexAttention with the layout's token mask in 128-token tiles, compiled with ``dynamic=False``.

    ``mask_builder``: ``"create_block_mask"`` (PyTorch's builder, ``_compile=True``) or ``"layout"``
    (`lvsa_kernels.interop.to_flex_block_mask`). On a shared-memory out-of-resources error the compile is
    retried once with ``mode="max-autotune-no-cudagraphs"``; ``info["compile_mode"]`` records which ran.
    """
    if mask_builder not in FLEX_MASK_BUILDERS:
        raise ValueError(f"mask_builder must be one of {FLEX_MASK_BUILDERS}, got {mask_builder!r}")

    def prepare(q: Tensor, k: Tensor, v: Tensor, layout: BlockSparseLayout, case: BenchCase) -> Prepared:
        from torch.nn.attention.flex_attention import flex_attention

        torch._dynamo.reset()  # each case has new static shapes; do not hit the recompile limit
        t0 = time.perf_counter()
        if mask_builder == "create_block_mask":
            block_mask = _flex_mask_create(layout, q.device)
        else:
            block_mask = to_flex_block_mask(layout, 128, device=q.device)
        _sync(q.device)
        mask_s = time.perf_counter() - t0
        qt, kt, vt = _bhsd(q, k, v)
        gqa = kt.shape[1] != qt.shape[1]
        scale = _scale(q)
        info: Dict[str, Any] = {"mask_builder": mask_builder, "mask_build_s": round(mask_s, 2),
                                "compile_mode": "default"}

        def compiled_call(mode: Optional[str]) -> Callable[[], Tensor]:
            flex = torch.compile(flex_attention, dynamic=False, **({"mode": mode} if mode else {}))
            return lambda: flex(qt, kt, vt, block_mask=block_mask, scale=scale, enable_gqa=gqa)

        t0 = time.perf_counter()
        fn = compiled_call(None)
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - only the shared-memory failure is retried
            if not _is_smem_oom(exc):
                raise
            info.update(compile_mode="max-autotune-no-cudagraphs", default_mode_error=str(exc)[:300])
            torch._dynamo.reset()
            fn = compiled_call("max-autotune-no-cudagraphs")
            fn()
        _sync(q.device)
        info["compile_s"] = round(time.perf_counter() - t0, 1)
        return Prepared(fn, _bhsd_to_bshd, info=info)

    return prepare


# ----------------------------------------------------------------------------- FlashInfer, direct
_FI_WORKSPACE_BYTES = 128 * 1024 * 1024
_fi_state: Dict[Any, Any] = {}
FLASHINFER_JIT_ENV = "LVSA_BENCH_FLASHINFER_JIT"


def _flashinfer_jit_policy() -> str:
    """Forbid FlashInfer JIT builds (minutes of device time) unless ``LVSA_BENCH_FLASHINFER_JIT=1``.

    Sets ``FLASHINFER_DISABLE_JIT=1``: a module that is not prebuilt then fails fast with FlashInfer's
    ``MissingJITCacheError`` (recorded as the method's error) instead of compiling.
    """
    if os.environ.get(FLASHINFER_JIT_ENV) == "1":
        return "allowed"
    os.environ["FLASHINFER_DISABLE_JIT"] = "1"
    return "disabled (prebuilt modules only)"


def _flashinfer_skip(q: Tensor, k: Tensor, layout: BlockSparseLayout, case: BenchCase) -> Optional[str]:
    if q.device.type != "cuda":
        return f"needs a CUDA device, inputs are on {q.device.type}"
    if importlib.util.find_spec("flashinfer") is None:
        return "flashinfer is not installed (carry the wheels of shared/recipes/flashinfer in .whl/)"
    if case.text_tokens:
        return (f"case has {case.text_tokens} text tokens: no uniform BSR grid; "
                "see method 'ours_flashinfer' (our backend's BSR + text side call)")
    if q.shape[0] != 1:
        return f"the direct baseline runs batch 1 (BSR has no batch dim), got B={q.shape[0]}"
    try:
        to_flashinfer_bsr(layout)
    except ValueError as exc:
        return str(exc)
    return None


def _flashinfer_module(dtype: torch.dtype, head_dim: int, device: torch.device) -> Dict[str, Any]:
    """Import FlashInfer and load its batch-prefill module the way shared/recipes/flashinfer does.

    The prebuilt sm_90a module of the ``fiprep_extras`` wheel is used by pointing
    ``flashinfer.jit.env.FLASHINFER_AOT_DIR`` at it. Without a matching prebuilt module the case is
    skipped unless ``LVSA_BENCH_FLASHINFER_JIT=1`` allows a JIT build (minutes of device time).
    """
    jit = _flashinfer_jit_policy()
    key = (dtype, head_dim, str(device))
    if key in _fi_state:
        return _fi_state[key]
    base = os.environ.setdefault("FLASHINFER_WORKSPACE_BASE", os.path.join(os.getcwd(), ".fiws"))
    os.environ.setdefault("FLASHINFER_CUDA_ARCH_LIST", "9.0a")
    os.environ.setdefault("TVM_FFI_DISABLE_TORCH_C_DLPACK", "1")
    os.environ.setdefault("TVM_FFI_CACHE_DIR", os.path.join(base, "tvm-ffi-cache"))
    import flashinfer
    from flashinfer.jit import env as jit_env
    from flashinfer.jit.attention.modules import gen_batch_prefill_module
    from flashinfer.prefill import get_batch_prefill_module
    from flashinfer.utils import PosEncodingMode, determine_attention_backend

    backend = determine_attention_backend(device, PosEncodingMode.NONE.value, False, False, dtype, dtype)
    args = (dtype, dtype, dtype, torch.int32, head_dim, head_dim, 0, False, False, False)
    spec = gen_batch_prefill_module(backend, *args)
    info: Dict[str, Any] = {"flashinfer": flashinfer.__version__, "fi_backend": backend, "module": spec.name,
                            "jit": jit}
    extras = importlib.util.find_spec("fiprep_extras")
    pre_dir = os.path.join(os.path.dirname(extras.origin), "aot") if extras and extras.origin else None
    so = os.path.join(pre_dir, spec.name, spec.name + ".so") if pre_dir else None
    prebuilt_ok = so is not None and os.path.exists(so)
    if prebuilt_ok:
        import fiprep_extras

        prebuilt_ok = getattr(fiprep_extras, "FLASHINFER_VERSION", None) == flashinfer.__version__
    t0 = time.perf_counter()
    if prebuilt_ok:
        jit_env.FLASHINFER_AOT_DIR = type(jit_env.FLASHINFER_AOT_DIR)(pre_dir)
        info["module_source"] = "prebuilt"
    elif jit == "allowed":
        info["module_source"] = "jit"
    else:
        raise MethodSkipped(f"no prebuilt FlashInfer module {spec.name} for flashinfer {flashinfer.__version__} "
                            "(set LVSA_BENCH_FLASHINFER_JIT=1 to JIT-build it: minutes of device time)")
    get_batch_prefill_module(backend, *args)
    info["module_load_s"] = round(time.perf_counter() - t0, 1)
    _fi_state[key] = info
    return info


def _flashinfer_workspace(device: torch.device) -> Tensor:
    key = ("workspace", str(device))
    if key not in _fi_state:
        _fi_state[key] = torch.empty(_FI_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    return _fi_state[key]


def _prepare_flashinfer(q: Tensor, k: Tensor, v: Tensor, layout: BlockSparseLayout, case: BenchCase) -> Prepared:
    """``BlockSparseAttentionWrapper`` with one block per frame (R = C = tokens per frame), planned once."""
    info = dict(_flashinfer_module(q.dtype, q.shape[-1], q.device))
    from flashinfer import BlockSparseAttentionWrapper

    bsr = to_flashinfer_bsr(layout)
    wrapper = BlockSparseAttentionWrapper(_flashinfer_workspace(q.device), backend="auto")
    t0 = time.perf_counter()
    wrapper.plan(bsr["indptr"].to(q.device, torch.int32), bsr["indices"].to(q.device, torch.int32),
                 bsr["M"], bsr["N"], bsr["R"], bsr["C"], q.shape[2], k.shape[2], q.shape[3],
                 sm_scale=_scale(q), q_data_type=q.dtype, kv_data_type=k.dtype, o_data_type=q.dtype)
    _sync(q.device)
    info.update(plan_ms=round((time.perf_counter() - t0) * 1e3, 2), R=bsr["R"], C=bsr["C"],
                wrapper_backend=getattr(wrapper, "_backend", None), workspace_mib=_FI_WORKSPACE_BYTES >> 20)
    q0, k0, v0 = q[0], k[0], v[0]          # NHD, batch 1
    out = torch.empty_like(q0)

    def fn() -> Tensor:
        return wrapper.run(q0, k0, v0, out=out)

    return Prepared(fn, lambda o: o.unsqueeze(0), out_buffer=out, info=info)


# ----------------------------------------------------------------------------- ours
def _ours_skip(backend: str, precision: str = "exact") -> SkipCheck:
    def skip(q: Tensor, k: Tensor, layout: BlockSparseLayout, case: BenchCase) -> Optional[str]:
        b = registered_backends().get(backend)
        if b is None:
            return f"backend {backend!r} is not registered in this build"
        return b.precision_reason(precision, q) or b.unsupported_reason(q, k, layout, False)

    return skip


def _ours_factory(backend: str, precision: str = "exact") -> Factory:
    """``lvsa_kernels.block_sparse_attn(q, k, v, layout, backend=backend, precision=precision)`` (autotuning
    runs in warm-up; the 8-bit precisions include their K/V quantization pre-pass in the timed call).

    For ``backend="flashinfer"`` FlashInfer JIT builds are forbidden unless allowed (`_flashinfer_jit_policy`).
    """

    def prepare(q: Tensor, k: Tensor, v: Tensor, layout: BlockSparseLayout, case: BenchCase) -> Prepared:
        info: Dict[str, Any] = {"backend": backend, "precision": precision}
        if backend == "flashinfer":
            info["flashinfer_jit"] = _flashinfer_jit_policy()
        if backend == "triton":  # tune now (outside the timed region) and record the launch config
            from lvsa_kernels.backends.triton_backend import config_for

            info["config"] = str(config_for(q, k, v, layout, q.shape[-1] ** -0.5, precision))

        def fn() -> Tensor:
            return block_sparse_attn(q, k, v, layout, backend=backend, precision=precision)

        return Prepared(fn, info=info)

    return prepare


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_methods(flex_mask_builder: str = "create_block_mask") -> Dict[str, Method]:
    """All methods by name; ``flex_mask_builder`` picks FlexAttention's mask builder."""
    ms = [
        Method("dense_cudnn", "dense SDPA (cuDNN)", _dense_factory("CUDNN_ATTENTION"), _needs_cuda, dense=True),
        Method("dense_flash", "dense SDPA (flash)", _dense_factory("FLASH_ATTENTION"), _needs_cuda, dense=True),
        Method("dense_sdpa", "dense SDPA (default dispatch)", _dense_factory(None), _always, dense=True),
        Method("flex", "FlexAttention", flex_factory(flex_mask_builder), _always),
        Method("flashinfer", "FlashInfer BSR (direct)", _prepare_flashinfer, _flashinfer_skip),
        Method("triton", "ours (triton)", _ours_factory("triton"), _ours_skip("triton")),
        # 8-bit (docs/fp8.md): INT8 Q K^T + e4m3 P V, and INT8 Q K^T + 16-bit P V; tolerances = tests/test_fp8.py
        Method("fp8", "ours (triton, fp8)", _ours_factory("triton", "fp8"), _ours_skip("triton", "fp8"),
               tolerance=4.5e-2),
        Method("int8_qk", "ours (triton, int8 QK)", _ours_factory("triton", "int8_qk"),
               _ours_skip("triton", "int8_qk"), tolerance=3e-2),
        Method("ours_flashinfer", "ours (flashinfer backend)", _ours_factory("flashinfer"), _ours_skip("flashinfer")),
        Method("reference", "ours (reference backend)", _ours_factory("reference"), _ours_skip("reference")),
    ]
    return {m.name: m for m in ms}


METHODS: Dict[str, Method] = build_methods()
DENSE_METHODS = tuple(n for n, m in METHODS.items() if m.dense)
GPU_DEFAULT_METHODS = ("dense_cudnn", "dense_flash", "flex", "flashinfer", "triton", "ours_flashinfer", "fp8",
                       "int8_qk")
CPU_SMOKE_METHODS = ("dense_sdpa", "reference", "triton")
