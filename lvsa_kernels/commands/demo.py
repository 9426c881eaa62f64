"""Main job demo: plan a model's LVSA layout at a long horizon (default Wan 2.1 1.3B, 121 latent frames =
6x its 21-frame training horizon, 1560 tokens/frame), print the frame map, kfi, density and ideal speedup,
then run every registered backend that can run on the device, check each against `reference_attention`
and time it against dense SDPA. Then the same for SVOO (co-clustering) on synthetic clustered q/k of Wan
2.1 1.3B at 480p x 81 frames (32,760 tokens): density, recall, and every SVOO path checked on sampled rows.

On CUDA the full geometry runs in bf16. On CPU a reduced geometry (same frames and pattern, few tokens per
frame, 2 heads x 64, fp32) keeps the run short; without CUDA the demo re-runs itself with TRITON_INTERPRET=1
so the Triton kernel runs in Triton's CPU interpreter (its CPU times measure the interpreter, not a kernel).
Exits 1 if any backend disagrees with the reference.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..api import block_sparse_attn
from ..backends import registered_backends
from ..models import MODELS, get_model
from ..reference import BlockSparseLayout, reference_attention
from ..timing import median_seconds

HELP = "plan Wan 2.1's LVSA layout at 6x horizon, run every backend that can, check and time them"

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_REL_TOL = {torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}
_CPU_GEOMETRY = {"tokens_per_frame": 16, "heads": 2, "head_dim": 64}
_TIME_BUDGET_S = 5.0  # per backend: fewer timed repeats when one call is slow


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=sorted(MODELS), default="wan", help="model preset (default wan)")
    parser.add_argument("--frames", type=int, default=121, help="latent frames (default 121 = 6x Wan's horizon)")
    parser.add_argument("--step", type=int, default=0, help="denoising step (rotation offset = step mod kfi)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--dtype", choices=["auto", *_DTYPES], default="auto",
                        help="auto: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--tokens-per-frame", type=int, help="default: the model's on CUDA, 16 on CPU")
    parser.add_argument("--heads", type=int, help="default: the model's on CUDA, 2 on CPU")
    parser.add_argument("--head-dim", type=int, help="default: the model's on CUDA, 64 on CPU")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, help="timed calls per backend, median reported (default 10 CUDA, 3 CPU)")
    parser.add_argument("--no-svoo", action="store_true", help="skip the SVOO part")


def _argv(args: argparse.Namespace) -> List[str]:
    """The demo's own command line, rebuilt from ``args``."""
    out = ["demo"]
    for name in ("model", "frames", "step", "device", "dtype", "tokens_per_frame", "heads", "head_dim", "batch",
                 "repeats"):
        value = getattr(args, name)
        if value is not None:
            out += [f"--{name.replace('_', '-')}", str(value)]
    return out + (["--no-svoo"] if args.no_svoo else [])


def _timed(fn: Callable[[], torch.Tensor], device: torch.device, repeats: int) -> Tuple[torch.Tensor, float]:
    """First result of ``fn`` (warm-up, also checked) and its median time over up to ``repeats`` calls."""
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    first = time.perf_counter() - t0
    if device.type == "cpu" and first > _TIME_BUDGET_S:
        return out, first  # nothing to warm up on CPU; one slow call is measurement enough
    n = max(1, min(repeats, int(_TIME_BUDGET_S / max(first, 1e-9))))
    return out, median_seconds(fn, device, n, warmup=0)


def _errors(out: torch.Tensor, ref: torch.Tensor) -> Tuple[float, float]:
    """(max abs error, relative Frobenius error) of ``out`` vs the float32 reference."""
    diff = out.float() - ref
    return diff.abs().max().item(), (diff.norm() / ref.norm().clamp_min(1e-30)).item()


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return torch.device(name)


def _reexec_under_interpreter(args: argparse.Namespace) -> None:
    """Without CUDA, re-run with TRITON_INTERPRET=1 (it must be set before Triton kernels are imported)."""
    if torch.cuda.is_available() or "TRITON_INTERPRET" in os.environ or importlib.util.find_spec("triton") is None:
        return
    print("no CUDA: re-running with TRITON_INTERPRET=1 so the Triton kernel runs in its CPU interpreter", flush=True)
    env = dict(os.environ, TRITON_INTERPRET="1")
    os.execve(sys.executable, [sys.executable, "-m", "lvsa_kernels", *_argv(args)], env)


def run(args: argparse.Namespace) -> int:
    device = _resolve_device(args.device)
    if device.type == "cpu":
        _reexec_under_interpreter(args)
    model = get_model(args.model)
    pattern = model.pattern()
    T = args.frames
    cpu = device.type == "cpu"
    dtype = _DTYPES[args.dtype] if args.dtype != "auto" else (torch.float32 if cpu else torch.bfloat16)
    text = model.text_tokens or 0
    position = model.plan_text_position

    full = pattern.plan(T, model.tokens_per_frame(), step=args.step, text_tokens=text, text_position=position)
    print(f"{model.title}: {T} latent frames ({T / model.reference_frames:.1f}x the {model.reference_frames}-frame "
          f"training horizon), {model.tokens_per_frame()} tokens/frame, {full.q_len} tokens")
    print(pattern.describe(T, args.step))
    print(full.describe())
    print(f"kfi={full.meta['kfi']}  density={full.density:.4f}  ideal speedup={1 / full.density:.2f}x\n")

    def pick(value: Optional[int], key: str, full_value: int) -> int:
        return value if value is not None else (_CPU_GEOMETRY[key] if cpu else full_value)

    P = pick(args.tokens_per_frame, "tokens_per_frame", model.tokens_per_frame())
    H = pick(args.heads, "heads", model.heads)
    D = pick(args.head_dim, "head_dim", model.head_dim)
    repeats = args.repeats or (3 if cpu else 10)
    layout = pattern.plan(T, P, step=args.step, text_tokens=text, text_position=position)
    status = _compare_backends(layout, args.batch, H, D, dtype, device, repeats)
    if not args.no_svoo:
        status |= _svoo(device, dtype, repeats)
    return status


def _compare_backends(layout: BlockSparseLayout, B: int, H: int, D: int, dtype: torch.dtype,
                      device: torch.device, repeats: int) -> int:
    """Run every registered backend that can run these inputs; print the table; 1 if any disagrees."""
    S = layout.q_len
    print(f"run geometry: B={B} S={S} ({layout.num_q_blocks} blocks) H={H} D={D} {str(dtype)[6:]} on {device}, "
          f"layout density {layout.density:.4f}")
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, S, H, D, generator=g, device=device, dtype=dtype) for _ in range(3))
    ref = reference_attention(q.float(), k.float(), v.float(), layout)

    dense, dense_t = _timed(lambda: F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2), device, repeats)
    rows = [("dense SDPA (no mask)", dense_t, None, None, "baseline")]
    skipped, failed = [], False
    for name, backend in registered_backends().items():
        reason = backend.unsupported_reason(q, k, layout, False)
        if reason:
            skipped.append((name, reason))
            continue
        out, t = _timed(lambda: block_sparse_attn(q, k, v, layout, backend=name), device, repeats)
        err, rel = _errors(out, ref)
        ok = bool(torch.isfinite(out).all()) and rel <= _REL_TOL[dtype]
        failed |= not ok
        rows.append((name, t, err, rel, "ok" if ok else f"MISMATCH (rel tol {_REL_TOL[dtype]:g})"))

    print(f"\n{'backend':<22}{'time ms':>12}{'vs dense':>10}{'max err':>11}{'rel err':>11}  check")
    for name, t, err, rel, status in rows:
        e = "" if err is None else f"{err:.2e}"
        r = "" if rel is None else f"{rel:.2e}"
        print(f"{name:<22}{t * 1e3:>12.3f}{dense_t / t:>9.2f}x{e:>11}{r:>11}  {status}")
    for name, reason in skipped:
        print(f"skipped {name}: {reason}")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("note: CPU times of 'triton' measure Triton's interpreter, not a compiled kernel")
    if failed:
        print("FAILED: a backend disagrees with reference_attention")
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------- SVOO
_SVOO_CUDA = dict(frames=21, tokens_per_frame=30 * 52, heads=12, head_dim=128, q_clusters=256, k_clusters=1024,
                  centres=64)
_SVOO_CPU = dict(frames=6, tokens_per_frame=64, heads=2, head_dim=16, q_clusters=8, k_clusters=24, centres=6)
_SVOO_SAMPLED_ROWS = 64  # query rows per head checked against the float32 reference


def _svoo(device: torch.device, dtype: torch.dtype, repeats: int) -> int:
    """SVOO on clustered q/k: plan, run every path that can, check sampled rows; 1 if a path disagrees."""
    from ..backends import BackendUnavailable
    from ..svoo_attention import SVOOPattern
    from ..svoo_eval import clustered_qkv, sampled_rows, selected_attention

    geo = _SVOO_CPU if device.type == "cpu" else _SVOO_CUDA
    S, H, D = geo["frames"] * geo["tokens_per_frame"], geo["heads"], geo["head_dim"]
    q, k, v = clustered_qkv(S, H, D, geo["centres"], device, dtype)
    pattern = SVOOPattern(top_p=0.9, q_clusters=geo["q_clusters"], k_clusters=geo["k_clusters"], warmup_steps=0)
    plan = pattern.plan(q, k, step=0, layer=0)  # clusters (cached: the calls below reuse them) + host layouts
    mask, cl = plan.layouts[0].to_block_mask(), plan.clustering
    rows = sampled_rows(S, _SVOO_SAMPLED_ROWS, device)
    ref, recall = selected_attention(q, k, v, cl, mask, rows)
    print(f"\nSVOO: {S} tokens (synthetic clustered q/k), H={H} D={D} {str(dtype)[6:]} on {device}, "
          f"{geo['q_clusters']} query / {geo['k_clusters']} key clusters, top_p 0.9: density "
          f"{plan.layouts[0].density:.3f}, recall {recall:.3f} (softmax mass of the selected blocks, sampled rows)")

    _, dense_t = _timed(lambda: F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2), device, repeats)
    table, failed = [("dense SDPA (no mask)", dense_t, None, "baseline")], False
    for name in ("triton", "flashinfer", "reference"):
        try:
            out, t = _timed(lambda: pattern.attention(q, k, v, step=0, layer=0, backend=name), device, repeats)
        except BackendUnavailable as exc:
            print(f"skipped SVOO {name}: {str(exc).splitlines()[0]}")
            continue
        _, rel = _errors(out[0, rows], ref)
        ok = bool(torch.isfinite(out).all()) and rel <= _REL_TOL[dtype]
        failed |= not ok
        what = "cluster kernel, device plan" if name == "triton" else "host layouts"
        table.append((f"{name} ({what})", t, rel, "ok" if ok else f"MISMATCH (rel tol {_REL_TOL[dtype]:g})"))
    print(f"{'SVOO path':<34}{'time ms':>12}{'vs dense':>10}{'rel err':>11}  check")
    for name, t, rel, status in table:
        print(f"{name:<34}{t * 1e3:>12.3f}{dense_t / t:>9.2f}x{'' if rel is None else f'{rel:.2e}':>11}  {status}")
    print("(one reuse-step call: centroid refresh, block selection, planning, attention)")
    if failed:
        print("FAILED: an SVOO path disagrees with the float32 reference on the sampled rows")
    return 1 if failed else 0
