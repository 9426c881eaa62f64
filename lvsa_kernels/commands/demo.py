"""Plan a model's LVSA layout at a long horizon (default Wan 2.1 1.3B, 121 latent frames = 5.8x its
21-frame training horizon, 1560 tokens/frame) and print a short summary: pattern, density, ideal speedup.
Then run every registered backend that can run here, check each against `reference_attention` and print
one table row per backend. Then the same for SVOO (co-clustering) on synthetic clustered q/k.

On CUDA the full geometry runs in bf16 and each backend is timed against dense SDPA. On CPU the table is a
correctness check on a reduced geometry (at most 41 latent frames, 16 tokens/frame, text scaled alike,
1 head x 64, fp32): the Triton kernel runs in Triton's CPU interpreter, whose wall times say nothing about
kernel speed, so no speed is shown. Exits 1 if any backend disagrees with the reference.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from typing import TYPE_CHECKING, Callable, List, Optional, Tuple

from ..models import MODELS, get_model
from ._args import NON_NEGATIVE, POSITIVE, UsageError

if TYPE_CHECKING:
    import torch

    from ..reference import BlockSparseLayout

HELP = ("plan Wan 2.1's LVSA layout at 121 latent frames (5.8x its 21-frame horizon), run every backend that can, "
        "check (and on CUDA time) them")

_DTYPES = ("float16", "bfloat16", "float32")
_REL_TOL = {"float16": 1e-3, "bfloat16": 1e-2, "float32": 1e-5}
_CPU_GEOMETRY = {"run_frames": 41, "tokens_per_frame": 16, "heads": 1, "head_dim": 64}
_TIME_BUDGET_S = 5.0  # CUDA: fewer timed repeats when one call is slow
_WHAT = {"reference": "exact masked softmax (PyTorch)", "triton": "Triton block-sparse kernel",
         "flashinfer": "FlashInfer block-sparse (BSR)", "npu": "Ascend torch_npu", "sdpa": "dense SDPA"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=sorted(MODELS), default="wan", help="model preset (default wan)")
    parser.add_argument("--frames", type=POSITIVE, default=121,
                        help="latent frames of the planned layout (default 121 = 5.8x Wan's horizon)")
    parser.add_argument("--step", type=NON_NEGATIVE, default=0,
                        help="0-based denoising step (rotation offset = step mod kfi)")
    parser.add_argument("--show-map", action="store_true", help="also print the planned layout's frame map")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--dtype", choices=["auto", *_DTYPES], default="auto",
                        help="auto: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--run-frames", type=POSITIVE,
                        help="latent frames of the checked run (default: --frames on CUDA, at most 41 on CPU)")
    parser.add_argument("--tokens-per-frame", type=POSITIVE, help="default: the model's on CUDA, 16 on CPU")
    parser.add_argument("--heads", type=POSITIVE, help="default: the model's on CUDA, 1 on CPU")
    parser.add_argument("--head-dim", type=POSITIVE, help="default: the model's on CUDA, 64 on CPU")
    parser.add_argument("--batch", type=POSITIVE, default=1)
    parser.add_argument("--repeats", type=POSITIVE,
                        help="CUDA: timed calls per backend, median reported (default 10); CPU runs each once")
    parser.add_argument("--no-svoo", action="store_true", help="skip the SVOO part")


def _argv(args: argparse.Namespace) -> List[str]:
    """The demo's own command line, rebuilt from ``args``."""
    out = ["demo"]
    for name in ("model", "frames", "step", "device", "dtype", "run_frames", "tokens_per_frame", "heads",
                 "head_dim", "batch", "repeats"):
        value = getattr(args, name)
        if value is not None:
            out += [f"--{name.replace('_', '-')}", str(value)]
    return out + [flag for flag, on in (("--show-map", args.show_map), ("--no-svoo", args.no_svoo)) if on]


def _use_interpreter(args: argparse.Namespace) -> None:
    """Without CUDA, run the Triton kernels in Triton's CPU interpreter. TRITON_INTERPRET must be set before
    a kernel module is imported: set it here if none is yet, else re-run the command with it set."""
    if "TRITON_INTERPRET" in os.environ or importlib.util.find_spec("triton") is None:
        return
    os.environ["TRITON_INTERPRET"] = "1"
    if any(name.startswith("lvsa_kernels.triton_src.") for name in sys.modules):
        print("no CUDA: re-running with TRITON_INTERPRET=1 so the Triton kernel runs in its CPU interpreter",
              flush=True)
        os.execv(sys.executable, [sys.executable, "-m", "lvsa_kernels", *_argv(args)])


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def run(args: argparse.Namespace) -> int:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("argument --device: no CUDA device is available, got 'cuda'")
    cpu = args.device == "cpu" or not torch.cuda.is_available()
    if cpu:
        _use_interpreter(args)
    device = torch.device("cpu" if cpu else "cuda")
    dtype_name = args.dtype if args.dtype != "auto" else ("float32" if cpu else "bfloat16")
    model = get_model(args.model)
    pattern = model.pattern()
    text = model.text_tokens or 0
    position = model.plan_text_position

    T = args.frames
    full = pattern.plan(T, model.tokens_per_frame(), step=args.step, text_tokens=text, text_position=position)
    print(f"{model.title} at {T} latent frames ({T / model.reference_frames:.1f}x its {model.reference_frames}-frame "
          f"training horizon), {model.tokens_per_frame()} tokens/frame, {full.q_len:,} tokens")
    print(f"LVSA pattern: window {pattern.window}, {pattern.n_first} first frame(s), keyframe interval (kfi) "
          f"{full.meta['kfi']}, rotation offset {full.meta['offset']}, "
          f"{len(full.meta['global_frames'])} global frames")
    print(f"density {full.density:.4f} (fraction of query-key pairs computed) -> ideal speedup "
          f"{1 / full.density:.2f}x over dense attention")
    if args.show_map:
        print(pattern.describe(T, args.step))
        print(full.describe())
    else:
        print("(--show-map prints the frame map)")

    def pick(value: Optional[int], key: str, full_value: int) -> int:
        return value if value is not None else (_CPU_GEOMETRY[key] if cpu else full_value)

    P = pick(args.tokens_per_frame, "tokens_per_frame", model.tokens_per_frame())
    H = pick(args.heads, "heads", model.heads)
    D = pick(args.head_dim, "head_dim", model.head_dim)
    run_T = args.run_frames or (min(T, _CPU_GEOMETRY["run_frames"]) if cpu else T)
    run_text = text if not text or P == model.tokens_per_frame() else max(1, text * P // model.tokens_per_frame())
    layout = pattern.plan(run_T, P, step=args.step, text_tokens=run_text, text_position=position)
    dtype = getattr(torch, dtype_name)
    threads = torch.get_num_threads()
    if cpu:
        torch.set_num_threads(1)  # tiny CPU tensors: more threads only add sync cost (much more on a busy CPU)
    try:
        status = _compare_backends(layout, args.batch, H, D, dtype, device, args.repeats or 10)
        if not args.no_svoo:
            status |= _svoo(device, dtype, args.repeats or 10)
    finally:
        torch.set_num_threads(threads)
    return status


# ------------------------------------------------------------------------------------------ table rows
_LABEL_WIDTH = 52


def _start_row(label: str) -> None:
    """Print the row's label before the backend runs (progress for slow runs), without a newline."""
    print(f"{label:<{_LABEL_WIDTH}}", end="", flush=True)


def _end_row(seconds: float, dense_s: Optional[float], err: Optional[float], rel: Optional[float],
             status: str) -> None:
    timing = (f"{seconds * 1e3:>10.3f}{dense_s / seconds:>9.2f}x" if dense_s is not None else f"{seconds:>8.2f}")
    e = "" if err is None else f"{err:.2e}"
    r = "" if rel is None else f"{rel:.2e}"
    print(f"{timing}{e:>10}{r:>10}  {status}", flush=True)


def _table_start(first: str, q: "torch.Tensor", k: "torch.Tensor", v: "torch.Tensor", device: "torch.device",
                 repeats: int) -> Optional[float]:
    """Print the table header; on CUDA also time dense SDPA as the baseline row and return its seconds."""
    speed = device.type == "cuda"
    timing = f"{'time ms':>10}{'vs dense':>10}" if speed else f"{'wall s':>8}"
    print(f"{first:<{_LABEL_WIDTH}}{timing}{'max err':>10}{'rel err':>10}  check")
    if not speed:
        return None
    _start_row("dense SDPA (no mask, baseline)")
    dense_s = _timed(lambda: _dense(q, k, v), device, repeats, speed)[1]
    _end_row(dense_s, dense_s, None, None, "baseline")
    return dense_s


def _timed(fn: Callable[[], "torch.Tensor"], device: "torch.device", repeats: int,
           speed: bool) -> Tuple["torch.Tensor", float]:
    """First result of ``fn`` (checked) and, when ``speed``, its median time over up to ``repeats`` calls
    after it (else the wall time of that one call)."""
    import torch

    from ..timing import median_seconds

    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    first = time.perf_counter() - t0
    if not speed:
        return out, first
    n = max(1, min(repeats, int(_TIME_BUDGET_S / max(first, 1e-9))))
    return out, median_seconds(fn, device, n, warmup=0)


def _errors(out: "torch.Tensor", ref: "torch.Tensor") -> Tuple[float, float]:
    """(max abs error, relative Frobenius error) of ``out`` vs the float32 reference."""
    diff = out.float() - ref
    return diff.abs().max().item(), (diff.norm() / ref.norm().clamp_min(1e-30)).item()


def _verdict(out: "torch.Tensor", rel: float, dtype: "torch.dtype") -> Tuple[bool, str]:
    import torch

    tol = _REL_TOL[str(dtype)[6:]]
    ok = bool(torch.isfinite(out).all()) and rel <= tol
    return ok, "ok" if ok else f"MISMATCH (rel tol {tol:g})"


def _dense(q: "torch.Tensor", k: "torch.Tensor", v: "torch.Tensor") -> "torch.Tensor":
    import torch.nn.functional as F

    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _speed_note(device: "torch.device") -> None:
    if device.type == "cpu":
        print("(CPU: a correctness check; wall s is one call"
              f"{', Triton in its interpreter' if _interpreting() else ''}, not kernel speed)")


def _compare_backends(layout: BlockSparseLayout, B: int, H: int, D: int, dtype: "torch.dtype",
                      device: "torch.device", repeats: int) -> int:
    """Run every registered backend that can run these inputs, one table row each; 1 if any disagrees."""
    import torch

    from ..api import block_sparse_attn
    from ..backends import registered_backends
    from ..reference import reference_attention

    S, speed = layout.q_len, device.type == "cuda"
    text = layout.meta["text_tokens"]
    print(f"\n{'timing' if speed else 'correctness check'}: B={B}, {layout.meta['frames']} latent frames x "
          f"{layout.meta['tokens_per_frame']} tokens{f' + {text} text' if text else ''} (S={S}), H={H}, D={D}, "
          f"{str(dtype)[6:]} on {device}, "
          f"layout density {layout.density:.4f}")
    _speed_note(device)
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, S, H, D, generator=g, device=device, dtype=dtype) for _ in range(3))
    ref = reference_attention(q.float(), k.float(), v.float(), layout)

    dense_s = _table_start("backend", q, k, v, device, repeats)
    skipped, failed = [], False
    for name, backend in registered_backends().items():
        reason = backend.unsupported_reason(q, k, layout, False)
        if reason:
            skipped.append((name, reason))
            continue
        what = _WHAT.get(name, "")
        if name == "triton" and _interpreting():
            what = "Triton kernel in the CPU interpreter"
        _start_row(f"{name:<11}{what}")
        out, t = _timed(lambda: block_sparse_attn(q, k, v, layout, backend=name), device, repeats, speed)
        err, rel = _errors(out, ref)
        ok, status = _verdict(out, rel, dtype)
        failed |= not ok
        _end_row(t, dense_s, err, rel, status)
    for name, reason in skipped:
        print(f"skipped {name}: {reason}")
    if failed:
        print("FAILED: a backend disagrees with reference_attention")
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------- SVOO
_SVOO_CUDA = dict(frames=21, tokens_per_frame=30 * 52, heads=12, head_dim=128, q_clusters=256, k_clusters=1024,
                  centres=64)
_SVOO_CPU = dict(frames=6, tokens_per_frame=64, heads=2, head_dim=16, q_clusters=8, k_clusters=24, centres=6)
_SVOO_SAMPLED_ROWS = 64  # query rows per head checked against the float32 reference


def _svoo(device: "torch.device", dtype: "torch.dtype", repeats: int) -> int:
    """SVOO on clustered q/k: plan, run every path that can, check sampled rows; 1 if a path disagrees."""
    from ..backends import BackendUnavailable
    from ..svoo_attention import SVOOPattern
    from ..svoo_eval import clustered_qkv, sampled_rows, selected_attention

    speed = device.type == "cuda"
    geo = _SVOO_CPU if not speed else _SVOO_CUDA
    S, H, D = geo["frames"] * geo["tokens_per_frame"], geo["heads"], geo["head_dim"]
    q, k, v = clustered_qkv(S, H, D, geo["centres"], device, dtype)
    pattern = SVOOPattern(top_p=0.9, q_clusters=geo["q_clusters"], k_clusters=geo["k_clusters"], warmup_steps=0)
    plan = pattern.plan(q, k, step=0, layer=0)  # clusters (cached: the calls below reuse them) + host layouts
    mask, cl = plan.layouts[0].to_block_mask(), plan.clustering
    rows = sampled_rows(S, _SVOO_SAMPLED_ROWS, device)
    ref, recall = selected_attention(q, k, v, cl, mask, rows)
    print(f"\nSVOO (online query/key co-clustering): {S} tokens of synthetic clustered "
          f"q/k, H={H}, D={D}, {str(dtype)[6:]} on {device}, {geo['q_clusters']} query / {geo['k_clusters']} key "
          f"clusters, top_p 0.9: density {plan.layouts[0].density:.3f}, recall {recall:.3f} (softmax mass of "
          f"the selected blocks, sampled rows)")
    _speed_note(device)

    dense_s = _table_start("SVOO path (one reuse-step call)", q, k, v, device, repeats)
    failed = False
    for name, what in (("triton", "cluster kernel, device plan"), ("flashinfer", "host layouts"),
                       ("reference", "host layouts")):
        if name == "triton" and _interpreting():
            what += ", CPU interpreter"
        label = f"{name} ({what})"
        _start_row(label)
        try:
            out, t = _timed(lambda: pattern.attention(q, k, v, step=0, layer=0, backend=name), device, repeats,
                            speed)
        except BackendUnavailable as exc:
            print(f"skipped: {str(exc).splitlines()[0].split(': ', 1)[-1]}")
            continue
        _, rel = _errors(out[0, rows], ref)
        ok, status = _verdict(out, rel, dtype)
        failed |= not ok
        _end_row(t, dense_s, None, rel, status)
    if speed:
        print("(one reuse-step call: centroid refresh, block selection, planning, attention)")
    if failed:
        print("FAILED: an SVOO path disagrees with the float32 reference on the sampled rows")
    return 1 if failed else 0
