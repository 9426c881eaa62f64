"""Measure every method on one case, in one process: correctness, time, memory, throughput.

Per case: fresh ``torch.randn`` inputs, one float32 reference (`reference_attention` on upcast inputs,
optionally on a deterministic sample of query blocks), then per method: a checked run (poisoned output),
a median time (``triton.testing.do_bench`` on CUDA, ``perf_counter`` on CPU) and the peak extra memory.
A failing method is recorded with its error; the others still run.
"""
from __future__ import annotations

import gc
import time
import traceback
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from lvsa_kernels.reference import BlockSparseLayout, reference_attention
from lvsa_kernels.timing import bench_ms, interleaved_ms

from .baselines import Method, MethodSkipped, Prepared
from .shapes import BenchCase

__all__ = ["Settings", "TOLERANCE", "run_case", "layout_flops", "summarize", "make_inputs", "reference_output",
           "checked_run", "output_errors", "case_seed_offset"]

# Relative error ||out - ref|| / ||ref|| allowed per input dtype.
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 1e-3, torch.float32: 1e-5, torch.float64: 1e-10}
_MIB = float(1 << 20)


@dataclass(frozen=True)
class Settings:
    """Measurement settings. Times in milliseconds; ``ref_stride`` > 1 checks every n-th query block only."""

    device: str = "cuda"
    warmup_ms: float = 25.0
    rep_ms: float = 200.0
    min_iters: int = 5
    ref_stride: int = 1
    seed: int = 0
    interleave: Tuple[str, ...] = ()  # methods also timed alternately (`lvsa_kernels.timing.interleaved_ms`)
    interleave_rounds: int = 10
    interleave_burst: int = 3


def layout_flops(layout: BlockSparseLayout, batch: int, heads: int, head_dim: int) -> float:
    """Forward FLOPs of the computed (selected) pairs: ``4 * B * D * pairs`` over all H heads.

    `BlockSparseLayout.computed_pairs` sums over layout heads, so a shared layout is multiplied by H.
    """
    per_head_factor = heads if layout.num_heads == 1 else 1
    return 4.0 * batch * head_dim * layout.computed_pairs * per_head_factor


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_inputs(case: BenchCase, device: torch.device, seed: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Fresh ``torch.randn`` q ``[B, S, H, D]`` and k, v ``[B, S, H_kv, D]`` in the case's dtype."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    S, D = case.seq_len, case.head_dim

    def randn(h: int) -> Tensor:
        return torch.randn(case.batch, S, h, D, dtype=case.dtype, device=device, generator=gen)

    return randn(case.heads), randn(case.num_kv_heads), randn(case.num_kv_heads)


def reference_output(q: Tensor, k: Tensor, v: Tensor, layout: BlockSparseLayout,
               stride: int) -> Tuple[Tensor, Optional[Tensor], Dict[str, Any]]:
    """float32 reference; with ``stride > 1`` only query blocks 0, stride, 2*stride, ... and text blocks.

    Returns ``(ref [B, n, H, D] float32, token index of the n checked rows or None for all, info)``.
    """
    t0 = time.perf_counter()
    kf, vf = k.float(), v.float()
    if stride <= 1:
        ref = reference_attention(q.float(), kf, vf, layout)
        _sync(q.device)
        return ref, None, {"mode": "full", "seconds": round(time.perf_counter() - t0, 2)}
    if layout.q_offsets.shape[0] != 1:
        raise ValueError("ref_stride > 1 needs query blocks shared by all heads")
    nqb = layout.num_q_blocks
    rows = sorted(set(range(0, nqb, stride)) | ({layout.text.q_block} if layout.text else set()) | {nqb - 1})
    q_sizes = layout.block_sizes()[0][:, rows]
    k_sizes = layout.block_sizes()[1]
    sub = BlockSparseLayout.from_block_mask(layout.to_block_mask()[:, rows], q_sizes, k_sizes)
    off = layout.q_offsets[0].long()
    idx = torch.cat([torch.arange(int(off[r]), int(off[r + 1])) for r in rows]).to(q.device)
    ref = reference_attention(q[:, idx].float(), kf, vf, sub)
    _sync(q.device)
    return ref, idx, {"mode": f"sampled query blocks 0, {stride}, {2 * stride}, ... + text + last ({len(rows)} of {nqb})",
                      "seconds": round(time.perf_counter() - t0, 2)}


def _poison_allocator(q: Tensor) -> None:
    """Leave a NaN-filled free block of the output's size in the CUDA caching allocator (best effort)."""
    block = torch.full((q.numel(),), float("nan"), dtype=q.dtype, device=q.device)
    del block


def checked_run(p: Prepared, q: Tensor) -> Tuple[Tensor, str]:
    """Run once with a poisoned output; returns the ``[B, S, H, D]`` output and how it was poisoned."""
    if p.out_buffer is not None:
        p.out_buffer.fill_(float("nan"))
        poison = "output buffer filled with NaN"
    elif q.device.type == "cuda":
        _poison_allocator(q)
        poison = "NaN block freed into the caching allocator (best effort); NaN/Inf checked"
    else:
        poison = "none (CPU); NaN/Inf checked"
    out = p()
    _sync(q.device)
    return p.to_bshd(out), poison


def output_errors(out: Tensor, ref: Tensor, idx: Optional[Tensor]) -> Dict[str, float]:
    o = (out if idx is None else out[:, idx]).float()
    diff = o - ref
    ref_norm = float(torch.linalg.vector_norm(ref))
    return {"max_abs_err": float(diff.abs().max()),
            "rel_err": float(torch.linalg.vector_norm(diff)) / max(ref_norm, 1e-30)}


def _time_ms(fn: Callable[[], Any], s: Settings, device: torch.device) -> Dict[str, float]:
    """Median milliseconds per call; repeats at least ``min_iters`` times (`lvsa_kernels.timing.bench_ms`)."""
    return bench_ms(fn, device, s.warmup_ms, s.rep_ms, s.min_iters)


def _peak_extra_mib(p: Prepared, q: Tensor) -> Optional[float]:
    """Peak memory allocated during one call beyond what existed before it, minus a new output's size."""
    if q.device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize(q.device)
    before = torch.cuda.memory_allocated(q.device)
    torch.cuda.reset_peak_memory_stats(q.device)
    out = p()
    torch.cuda.synchronize(q.device)
    peak = torch.cuda.max_memory_allocated(q.device)
    out_bytes = 0 if p.out_buffer is not None else out.numel() * out.element_size()
    del out
    return round((peak - before - out_bytes) / _MIB, 2)


def _run_method(m: Method, q: Tensor, k: Tensor, v: Tensor, layout: BlockSparseLayout, case: BenchCase,
                ref: Tensor, idx: Optional[Tensor], s: Settings, flops: float, dense_flops: float) -> Dict[str, Any]:
    t_start = time.perf_counter()
    rec: Dict[str, Any] = {"label": m.label}
    reason = m.skip_reason(q, k, layout, case)
    if reason:
        return {**rec, "status": "skipped", "reason": reason}
    p: Optional[Prepared] = None
    try:
        t0 = time.perf_counter()
        p = m.prepare(q, k, v, layout, case)
        rec["prepare_s"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        out, rec["poison"] = checked_run(p, q)
        rec["first_call_s"] = round(time.perf_counter() - t0, 2)
        rec["nonfinite"] = int((~torch.isfinite(out)).sum())
        checked = layout.is_dense or not m.dense
        if checked:
            rec.update(output_errors(out, ref, idx))
        else:
            rec["check"] = "not compared: dense method on a sparse layout (computes a different function)"
        del out
        tol = m.tolerance or TOLERANCE[q.dtype]
        rec["tolerance"] = tol
        rec["correct"] = rec["nonfinite"] == 0 and (not checked or rec["rel_err"] <= tol)
        rec.update(_time_ms(p, s, q.device))
        rec["peak_extra_mib"] = _peak_extra_mib(p, q)
        work = dense_flops if m.dense else flops
        rec["tflops"] = work / (rec["ms"] * 1e-3) / 1e12
        rec["dense_equiv_tflops"] = dense_flops / (rec["ms"] * 1e-3) / 1e12
        rec["info"] = p.info
        rec["status"] = "ok" if rec["correct"] else "wrong"
    except MethodSkipped as exc:
        rec.update(status="skipped", reason=str(exc))
    except Exception as exc:  # noqa: BLE001 - one failing method must not stop the others
        rec.update(status="error", error=f"{type(exc).__name__}: {exc}"[:2000],
                   traceback=traceback.format_exc()[-3000:])
        if p is not None:
            rec["info"] = p.info
    finally:
        del p
        gc.collect()
        if q.device.type == "cuda":
            torch.cuda.empty_cache()
    rec["wall_s"] = round(time.perf_counter() - t_start, 1)
    return rec


def summarize(result: Dict[str, Any]) -> Dict[str, Any]:
    """Best dense time, speedups vs it, and ours (triton) vs FlashInfer / Flex, from ``result["methods"]``."""
    ms = {n: r["ms"] for n, r in result["methods"].items() if r.get("status") in ("ok", "wrong")}
    dense = {n: t for n, t in ms.items() if result["methods"][n].get("dense")}
    out: Dict[str, Any] = {}
    if dense:
        best = min(dense, key=dense.get)
        out.update(dense_best=best, dense_best_ms=dense[best])
        for n, t in ms.items():
            result["methods"][n]["speedup_vs_dense"] = dense[best] / t
    if "triton" in ms:
        fi = next((n for n in ("flashinfer", "ours_flashinfer") if n in ms), None)
        if fi:
            out.update(flashinfer_method=fi, triton_time_over_flashinfer=ms["triton"] / ms[fi])
        if "flex" in ms:
            out["triton_speedup_vs_flex"] = ms["flex"] / ms["triton"]
    inter = {n: r["ms"] for n, r in result.get("interleaved", {}).items()}
    fi_inter = next((n for n in ("flashinfer", "ours_flashinfer") if n in inter), None)
    if "triton" in inter and fi_inter:
        out["triton_time_over_flashinfer_interleaved"] = inter["triton"] / inter[fi_inter]
    fi = next((n for n in ("flashinfer", "ours_flashinfer") if n in ms), None)
    for eight_bit in ("fp8", "int8_qk"):
        if eight_bit in ms and fi:
            out.update({"flashinfer_method": fi, f"{eight_bit}_time_over_flashinfer": ms[eight_bit] / ms[fi]})
    return out


def run_case(case: BenchCase, methods: Sequence[Method], s: Settings,
             log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Measure ``methods`` on ``case``; returns a JSON-ready record (see module docstring)."""
    device = torch.device(s.device)
    t_case = time.perf_counter()
    layout = case.layout()
    flops = layout_flops(layout, case.batch, case.heads, case.head_dim)
    dense_flops = 4.0 * case.batch * case.heads * case.head_dim * layout.q_len * layout.kv_len
    result: Dict[str, Any] = {
        "case": case.describe(),
        "layout": {"density": layout.density, "is_dense": layout.is_dense, "computed_pairs": layout.computed_pairs,
                   "layout_heads": layout.num_heads, "q_blocks": layout.num_q_blocks, "nnz_blocks": layout.nnz,
                   "spans": int(layout.spans.start.numel()), "kfi": layout.meta.get("kfi"),
                   "ideal_speedup": 1.0 / layout.density},
        "flops": flops, "dense_flops": dense_flops, "methods": {},
    }
    q, k, v = make_inputs(case, device, s.seed + case_seed_offset(case.name))
    ref, idx, result["reference"] = reference_output(q, k, v, layout, s.ref_stride)
    log(f"[{case.name}] S={case.seq_len} density={layout.density:.4f} reference {result['reference']['mode']} "
        f"in {result['reference']['seconds']} s")
    for m in methods:
        rec = _run_method(m, q, k, v, layout, case, ref, idx, s, flops, dense_flops)
        rec["dense"] = m.dense
        result["methods"][m.name] = rec
        log(f"[{case.name}] {m.name:16s} {_line(rec)}")
    if s.interleave and device.type == "cuda":
        result["interleaved"] = _interleaved(case, methods, q, k, v, layout, s, result["methods"])
        if result["interleaved"]:
            log(f"[{case.name}] interleaved: " + ", ".join(f"{n} {r['ms']:.3f} ms" + (f" ({r['sm_mhz']} MHz, "
                f"{r['power_w']} W)" if "sm_mhz" in r else "") for n, r in result["interleaved"].items()))
    del q, k, v, ref
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    result["summary"] = summarize(result)
    result["wall_s"] = round(time.perf_counter() - t_case, 1)
    return result


def _interleaved(case: BenchCase, methods: Sequence[Method], q: Tensor, k: Tensor, v: Tensor,
                 layout: BlockSparseLayout, s: Settings, records: Dict[str, Any]) -> Dict[str, Any]:
    """The methods of ``s.interleave`` that ran correctly, prepared together and timed alternately in bursts
    (`lvsa_kernels.timing.interleaved_ms`); ``{}`` when fewer than two qualify."""
    chosen = [m for m in methods if m.name in s.interleave and records.get(m.name, {}).get("status") == "ok"]
    if len(chosen) < 2:
        return {}
    prepared = {m.name: m.prepare(q, k, v, layout, case) for m in chosen}
    try:
        return interleaved_ms(prepared, q.device, s.interleave_rounds, s.interleave_burst)
    finally:
        del prepared
        gc.collect()
        torch.cuda.empty_cache()


def _line(rec: Dict[str, Any]) -> str:
    st = rec["status"]
    if st == "skipped":
        return f"skipped: {rec['reason']}"
    if st == "error":
        return f"ERROR: {rec['error'][:300]}"
    err = f" rel_err={rec['rel_err']:.2e}" if "rel_err" in rec else ""
    mem = f" extra={rec['peak_extra_mib']} MiB" if rec.get("peak_extra_mib") is not None else ""
    return f"{st}: {rec['ms']:.3f} ms {rec['tflops']:.1f} TFLOP/s{err}{mem} nonfinite={rec['nonfinite']}"


def case_seed_offset(name: str) -> int:
    """A stable per-case seed offset (Python's hash() is salted per process)."""
    return zlib.crc32(name.encode()) % 100_000
