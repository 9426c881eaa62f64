#!/usr/bin/env python3
"""One-call attention benchmark: every case x every method in one process, JSON + a compact table.

    python3 bench/run_gpu.py --out "$OUT" --time-budget 400          # GPU: all cases, default methods
    python3 bench/run_gpu.py --cases anchor --methods dense_cudnn,flashinfer,triton
    python3 bench/run_gpu.py --cpu-smoke                              # same plumbing on CPU, tiny float32 cases

Output folder: ``--out``, else ``$OUT``, else ``./bench_out`` (git-ignored); a ``--cpu-smoke`` run without
``--out`` writes to a fresh temporary folder (printed), since its CPU timings are not results.

Cases start in priority order and none starts after ``--time-budget`` seconds (those are recorded as skipped).
The JSON (``<out>/attention_bench.json``) is rewritten after every case, so a killed run keeps what it measured.
Exit status: 0 when every method that ran was correct and none raised, 1 otherwise, 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

JSON_NAME = "attention_bench.json"


def _parse(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=None, help="comma-separated case or group names (groups: all, anchor, wan, "
                   "wan-default, hy15, smoke); default all (smoke with --cpu-smoke)")
    p.add_argument("--methods", default=None, help="comma-separated methods; default "
                   "dense_cudnn,dense_flash,flex,flashinfer,triton,ours_flashinfer,fp8,int8_qk (CPU smoke: dense_sdpa,reference,triton)")
    p.add_argument("--time-budget", type=float, default=0.0, help="seconds; no case starts after this (0 = no limit)")
    p.add_argument("--out", default=os.environ.get("OUT"),
                   help="output folder (default $OUT, else ./bench_out; --cpu-smoke: a new temporary folder)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny float32 cases on CPU, Triton in its interpreter")
    p.add_argument("--warmup-ms", type=float, default=25.0)
    p.add_argument("--rep-ms", type=float, default=200.0, help="do_bench rep; raised to fit --min-iters calls")
    p.add_argument("--min-iters", type=int, default=5)
    p.add_argument("--ref-stride", type=int, default=1, help="check every n-th query block only (1 = all)")
    p.add_argument("--flex-mask", choices=("create_block_mask", "layout"), default="create_block_mask",
                   help="FlexAttention mask builder: torch create_block_mask(_compile=True) or lvsa_kernels.interop.to_flex_block_mask")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--interleave", default="triton,flashinfer",
                   help="methods also timed alternately in back-to-back bursts, A B then B A (CUDA; '' = off)")
    p.add_argument("--interleave-rounds", type=int, default=10)
    p.add_argument("--interleave-burst", type=int, default=3, help="calls per timed burst")
    return p.parse_args(argv)


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: str) -> Dict[str, Any]:
    """Date, device and versions recorded with the results."""
    import torch
    import triton

    import lvsa_kernels

    env: Dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "triton": triton.__version__, "lvsa_kernels": lvsa_kernels.__version__,
        "flashinfer": _version("flashinfer-python"), "cudnn": None, "device": "cpu",
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, sm_count=props.multi_processor_count, cc=f"{props.major}.{props.minor}",
                   gpu_mem_gib=round(props.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version())
    env["git_commit"], env["git_changed_files"] = _git_state(os.path.dirname(os.path.abspath(__file__)))
    env["env"] = {k: os.environ[k] for k in ("TRITON_INTERPRET", "LVSA_KERNELS_BACKEND", "FLASHINFER_CUDA_ARCH_LIST")
                  if k in os.environ}
    return env


def _git_state(cwd: str):
    """``(HEAD's short hash, number of tracked files changed since it)``; ``(None, None)`` outside a checkout. A
    device copy of a working tree can carry an older ``.git`` than its files, so the count says whether the
    hash alone names the code that ran."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=cwd).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD") or None
        return head, (len(git("status", "--porcelain", "--untracked-files=no").splitlines()) if head else None)
    except (OSError, subprocess.SubprocessError):
        return None, None


def _write_json(path: str, doc: Dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    os.replace(tmp, path)


def _table(doc: Dict[str, Any]) -> str:
    """Compact text table: one row per (case, method), then one summary line per case."""
    rows = [f"{'case':14s} {'method':16s} {'status':7s} {'ms':>9s} {'xdense':>7s} {'TF/s':>6s} {'MiB':>7s} "
            f"{'rel_err':>8s}"]
    notes: List[str] = []
    for c in doc["cases"]:
        name = c["case"]["name"]
        for m, r in c["methods"].items():
            if r["status"] in ("ok", "wrong"):
                mib = "-" if r.get("peak_extra_mib") is None else f"{r['peak_extra_mib']:.1f}"
                err = f"{r['rel_err']:.1e}" if "rel_err" in r else "-"
                sp = f"{r['speedup_vs_dense']:.2f}" if "speedup_vs_dense" in r else "-"
                rows.append(f"{name:14s} {m:16s} {r['status']:7s} {r['ms']:9.2f} {sp:>7s} {r['tflops']:6.0f} "
                            f"{mib:>7s} {err:>8s}")
            else:
                why = r.get("reason") or r.get("error", "")
                rows.append(f"{name:14s} {m:16s} {r['status']:7s} {why[:70]}")
        s = c.get("summary", {})
        parts = [f"density {c['layout']['density']:.3f} (ideal {c['layout']['ideal_speedup']:.2f}x)"]
        if "dense_best" in s:
            parts.append(f"best dense {s['dense_best']} {s['dense_best_ms']:.2f} ms")
        if "triton_time_over_flashinfer" in s:
            parts.append(f"triton/{s['flashinfer_method']} time {s['triton_time_over_flashinfer']:.3f}")
        if "triton_time_over_flashinfer_interleaved" in s:
            parts.append(f"interleaved {s['triton_time_over_flashinfer_interleaved']:.3f}")
        if "triton_speedup_vs_flex" in s:
            parts.append(f"triton vs flex {s['triton_speedup_vs_flex']:.2f}x")
        for eight_bit in ("fp8", "int8_qk"):
            if f"{eight_bit}_time_over_flashinfer" in s:
                parts.append(f"{eight_bit}/{s['flashinfer_method']} time {s[eight_bit + '_time_over_flashinfer']:.3f}")
        notes.append(f"{name}: " + "; ".join(parts))
    for sk in doc.get("skipped_cases", []):
        notes.append(f"{sk['name']}: not run ({sk['reason']})")
    return "\n".join(rows + [""] + notes)


def main(argv: Optional[List[str]] = None) -> int:
    args = _parse(argv)
    if args.cpu_smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel module is imported
    import torch

    from lvsa_kernels.bench import baselines, harness, shapes

    device = "cpu" if args.cpu_smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("run_gpu.py: no CUDA device; use --cpu-smoke on a CPU machine", file=sys.stderr)
        return 2
    methods_all = baselines.build_methods(args.flex_mask)
    method_names = (args.methods.split(",") if args.methods else
                    list(baselines.CPU_SMOKE_METHODS if args.cpu_smoke else baselines.GPU_DEFAULT_METHODS))
    unknown = [m for m in method_names if m not in methods_all]
    try:
        if unknown:
            raise ValueError(f"--methods: unknown {unknown}; known: {sorted(methods_all)}")
        cases = shapes.select_cases(args.cases or ("smoke" if args.cpu_smoke else "all"))
    except ValueError as exc:
        print(f"run_gpu.py: {exc}", file=sys.stderr)
        return 2
    methods = [methods_all[m] for m in method_names]
    settings = harness.Settings(device=device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms,
                                min_iters=args.min_iters, ref_stride=args.ref_stride, seed=args.seed,
                                interleave=tuple(m for m in args.interleave.split(",") if m),
                                interleave_rounds=args.interleave_rounds, interleave_burst=args.interleave_burst)
    if args.cpu_smoke:
        settings = harness.Settings(device="cpu", warmup_ms=0.0, rep_ms=0.0, min_iters=2,
                                    ref_stride=args.ref_stride, seed=args.seed)
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 reference must be float32
    if args.out is None:
        args.out = tempfile.mkdtemp(prefix="lvsa_bench_smoke_") if args.cpu_smoke else "bench_out"
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, JSON_NAME)
    doc: Dict[str, Any] = {
        "schema": "lvsa-attention-bench/1",
        "command": "python3 " + " ".join(shlex.quote(a) for a in [sys.argv[0]] + (sys.argv[1:] if argv is None else argv)),
        **environment(device),
        "settings": {**vars(settings), "methods": method_names, "flex_mask": args.flex_mask,
                     "time_budget_s": args.time_budget, "cpu_smoke": args.cpu_smoke},
        "cases": [], "skipped_cases": [],
    }
    print(f"run_gpu.py: {doc['device']} torch {doc['torch']} triton {doc['triton']} flashinfer {doc['flashinfer']}; "
          f"{len(cases)} cases x {len(methods)} methods -> {path}", flush=True)
    t0 = time.perf_counter()
    for case in cases:
        elapsed = time.perf_counter() - t0
        if args.time_budget and elapsed > args.time_budget:
            doc["skipped_cases"].append({"name": case.name, "reason": f"time budget {args.time_budget:.0f} s spent"})
            continue
        try:
            doc["cases"].append(harness.run_case(case, methods, settings, log=lambda s: print(s, flush=True)))
        except Exception as exc:  # noqa: BLE001 - inputs/reference failed: record, go on with the next case
            doc["skipped_cases"].append({"name": case.name, "reason": f"{type(exc).__name__}: {exc}"[:500],
                                         "error": True})
            print(f"[{case.name}] case failed: {type(exc).__name__}: {exc}", flush=True)
        doc["wall_s"] = round(time.perf_counter() - t0, 1)
        _write_json(path, doc)
    _write_json(path, doc)
    print("=" * 100)
    print(_table(doc))
    bad = [f"{c['case']['name']}/{m}" for c in doc["cases"] for m, r in c["methods"].items()
           if r["status"] in ("wrong", "error")] + [s["name"] for s in doc["skipped_cases"] if s.get("error")]
    print(f"total {doc.get('wall_s', 0)} s; wrong or failed: {bad or 'none'}; results: {path}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
